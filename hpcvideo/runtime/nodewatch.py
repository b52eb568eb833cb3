"""Heartbeats between nodes: a rank on another node that stops answering is named within seconds.

A rank's failure monitor (:mod:`hpcvideo.runtime.failure`) sees its own node's peers in ``/proc``, but
not the ranks of other nodes. When a whole node is lost (its processes killed, the machine gone) the
ranks elsewhere do not learn it from MPI: a rank waiting in a control message (``Iprobe`` loops of
:mod:`hpcvideo.runtime.control`) waits forever, and UCX over TCP reports nothing (measured on the
two-node lab, slurm/lab/nodes.sh: the other node's ranks sat silent until SLURM declared the node
down). So when a job spans several nodes, every rank's monitor thread also

* increments its own counter ``hpcvideo/alive/<rank>`` in the rendezvous store (the torch.distributed
  ``TCPStore`` that rank 0 serves at ``master_addr:master_port``; a client connection of its own) every
  ``interval_s``, and
* reads the counters of the ranks on other nodes (``add(key, 0)``: never blocks on a missing key); a
  counter that has not moved for ``timeout_s`` seconds (``runtime.heartbeat_timeout_s``) means that
  rank is lost, and a store that cannot be reached means rank 0's process (which serves it) is gone.

Time is measured on each reader's own clock (no clock agreement between nodes is needed). The
monitor then prints which ranks on which nodes are lost and ends the process with exit status 1; the
launcher (srun ``--kill-on-bad-exit``) ends the rest of the job.

Rank 0's process serves the store, so at the clean end it must be the last to use it:
:func:`hpcvideo.runtime.failure.stop_failure_monitor` stops every other rank's monitor before rank 0's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .env import RankEnv

KEY = "hpcvideo/alive/{rank}"


def spans_nodes(env: RankEnv) -> bool:
    """True when the job's ranks are on more than one node (``env.peers`` hostnames)."""
    return len({node for node, _ in env.peers}) > 1


class StoreUnreachable(RuntimeError):
    """The rendezvous store (served by rank 0's process) did not answer."""


@dataclass(kw_only=True)
class NodeWatch:
    """One rank's heartbeat: :meth:`beat` counts this rank alive, :meth:`lost` names the silent remote ranks.

    ``timeout_s``: seconds without a change of a remote rank's counter before it is lost (> 0).
    Built with :func:`open_node_watch`; used from one thread only (the failure monitor's).
    """

    env: RankEnv
    timeout_s: float
    store: Any = None  # torch.distributed.TCPStore client (its own connection)
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict)  # rank -> (counter, monotonic time it changed)

    def remote_ranks(self) -> list[int]:
        return [rank for rank, (node, _) in enumerate(self.env.peers) if node != self.env.node]

    def beat(self) -> None:
        """Increment this rank's counter. Raises :class:`StoreUnreachable` when the store does not answer."""
        self._call(self.store.add, KEY.format(rank=self.env.rank), 1)

    def lost(self, now: float | None = None) -> list[int]:
        """Remote ranks whose counter has not moved for ``timeout_s`` (the first reading starts each clock),
        and with them the ranks of the same nodes silent for half of it (a node's ranks go together, but
        their last beats are up to a beat interval apart). Raises :class:`StoreUnreachable` when the
        store does not answer."""
        now = time.monotonic() if now is None else now
        silent: dict[int, float] = {}
        for rank in self.remote_ranks():
            count = int(self._call(self.store.add, KEY.format(rank=rank), 0))
            previous = self._seen.get(rank)
            if previous is None or previous[0] != count:
                self._seen[rank] = (count, now)
            silent[rank] = now - self._seen[rank][1]
        lost_nodes = {self.env.peers[rank][0] for rank, seconds in silent.items() if seconds >= self.timeout_s}
        return [rank for rank, seconds in silent.items()
                if self.env.peers[rank][0] in lost_nodes and seconds >= self.timeout_s / 2]

    def _call(self, method, *args):
        try:
            return method(*args)
        except Exception as error:  # noqa: BLE001 - torch raises RuntimeError/DistNetworkError/DistStoreError
            raise StoreUnreachable(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error


def open_node_watch(env: RankEnv, *, timeout_s: float) -> NodeWatch | None:
    """A :class:`NodeWatch` with its own client of the rendezvous store, or None when the job runs on one
    node (the ``/proc`` watch covers it) or has no process group. Raises ValueError for ``timeout_s <= 0``."""
    if timeout_s <= 0:
        raise ValueError(f"runtime.heartbeat_timeout_s={timeout_s!r} is not allowed; allowed: a number of seconds > 0")
    if env.master_addr is None or env.master_port is None or not spans_nodes(env):
        return None
    import torch.distributed as dist

    store = dist.TCPStore(env.master_addr, env.master_port, is_master=False,
                          timeout=timedelta(seconds=max(1.0, min(10.0, timeout_s / 2))), wait_for_workers=False)
    return NodeWatch(env=env, timeout_s=timeout_s, store=store)


def describe_lost(env: RankEnv, ranks: list[int], timeout_s: float) -> str:
    """``"rank 2 (pid 11) and rank 3 (pid 12) on node2 sent no heartbeat for 10 s: node2 was lost or its processes killed"``
    (one clause per node)."""
    by_node: dict[str, list[str]] = {}
    for rank in ranks:
        node, pid = env.peers[rank]
        by_node.setdefault(node, []).append(f"rank {rank} (pid {pid})")
    return "; ".join(f"{' and '.join(entries)} on {node} sent no heartbeat for {timeout_s:g} s: {node} was lost "
                     "or its processes were killed" for node, entries in by_node.items())
