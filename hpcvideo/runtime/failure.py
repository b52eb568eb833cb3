"""No hangs: when one rank fails, every rank exits non-zero within seconds, naming the failed rank.

Three ways a rank can go, and what the others see:

* **It raises** (inside :func:`abort_on_failure`): it logs ``rank R failed: <traceback>`` to
  stderr, sends a notice ``(R, message)`` with tag :data:`FAIL_TAG` to every other rank
  (non-blocking), waits up to ``notice_wait_s`` (2 s) for the notices to go out, then calls
  ``comm.Abort(1)``, which makes the launcher kill the whole job, so no rank stays blocked in a
  gloo/NCCL collective. The others' failure monitors (:func:`start_failure_monitor`) print
  ``rank Q: stopping because rank R failed: ...`` and leave with ``os._exit(1)`` before that.
* **It is killed** (SIGKILL, OOM killer, node loss): it says nothing. MPICH's mpiexec (hydra)
  notices the dead process, prints ``BAD TERMINATION ... PID p RUNNING AT node ... EXIT CODE: 9``
  and SIGKILLs the other ranks within ~10 ms (measured: all gone 0.04-0.06 s after the kill), too
  soon for them to say anything. Beware: the PID in hydra's message is *a* process of the job, not
  reliably the dead one (seen: any of ranks 0-2 for a kill of rank 2); rank 0's start-up line
  (``init_rank_env(announce=True)``) maps PIDs to ranks. ``mpiexec -disable-auto-cleanup`` does not
  help: hydra sends the survivors SIGUSR1 (whose default action ends Python silently) and, even with
  it ignored, they were still SIGKILLed within ~10-50 ms in 3 of 4 runs (measured). Under srun,
  ``--kill-on-bad-exit=1`` does the clean-up and srun names the task (``task 2: Killed``). Where no
  launcher cleans up (srun's default), every rank's failure monitor watches the processes of its
  node's peers (``/proc``, every ``poll_s``): a peer gone before the run's clean end
  (:func:`stop_failure_monitor` is a barrier, so no rank leaves early) makes it print ``rank Q:
  stopping because rank R (pid p on node) is no longer running`` and exit 1. Peers on other nodes
  cannot be watched in ``/proc``: when the job spans several nodes the monitor also exchanges
  heartbeats with them through the rendezvous store (:mod:`hpcvideo.runtime.nodewatch`) and names the
  ranks of a node that went silent for ``runtime.heartbeat_timeout_s`` (``rank Q: stopping because
  rank 2 (pid p) and rank 3 (pid p) on node2 sent no heartbeat for 30 s ...``), then exits 1. Their
  torch.distributed calls may also raise first (gloo: "Connection closed by peer" when the lost node's
  processes were killed and their sockets closed): inside :func:`abort_on_failure` this becomes the
  first case, and the message names the peers of this node that are no longer running
  (:func:`gone_peers`). When none is, and the job spans nodes, the rank first gives its monitor the
  heartbeat timeout (plus two beats) to name the lost ranks of the other node, as above, before it
  aborts (measured on the two-node lab: either error can come first, depending on what the ranks were
  doing when the node was lost).
* **It exits non-zero** (``sys.exit(3)``): inside :func:`abort_on_failure` a ``SystemExit`` with
  a non-zero code is a failure like any exception. Outside it, mpi4py still finalises MPI at exit
  and hydra does *not* end the job (measured: the other rank went on for its full 20 s), so peers
  waiting on that rank in an MPI call would hang: keep the whole of a rank's work in the guard.

The raising case ends fast because the peers' ``os._exit(1)`` is itself a bad termination for
hydra, which then kills the failing rank before its own Abort (measured: all 3 ranks gone 0.35 s
after the raise).

Threads: mpi4py initialises MPI with ``MPI_THREAD_MULTIPLE`` by default (``mpi4py.rc.thread_level
= "multiple"``; ``MPI.Query_thread()`` returns ``MPI.THREAD_MULTIPLE`` with the mpich wheel), which
the monitor thread needs: it calls ``Iprobe`` while the main thread may sit in ``bcast``. If the
MPI library grants less, :func:`start_failure_monitor` warns and runs no monitor (the launcher's
kill and ``Abort`` still end the job; the peers then die without their own message).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .env import RankEnv
from .nodewatch import NodeWatch, StoreUnreachable, describe_lost, open_node_watch

logger = logging.getLogger(__name__)

FAIL_TAG = 31_000  # MPI tag of failure notices (below 32767, the smallest MPI_TAG_UB the standard allows)


@dataclass(kw_only=True)
class FailureMonitor:
    """A daemon thread that ends this process when another rank reports a failure (:data:`FAIL_TAG`)
    or when a peer on this node is no longer running (killed without a word; ``watch_peers``).

    A peer's process ending is a failure only before the run's clean end: :func:`stop_failure_monitor`
    waits for every rank (a barrier) before it stops watching, so no rank exits while another still
    watches it. (A "this rank ended cleanly" MPI message per rank would also work, but messages left
    unreceived when a rank finalises made MPICH kill clean 4-rank jobs, measured.)
    """

    env: RankEnv
    poll_s: float = 0.2
    watch_peers: bool = True
    node_watch: NodeWatch | None = None  # ranks on other nodes (a job on several nodes); None: one node
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _check_heartbeats(self) -> None:
        """Beat, then end this process if ranks of another node went silent or rank 0's store is gone."""
        try:
            self.node_watch.beat()
            lost = self.node_watch.lost()
        except StoreUnreachable as error:
            if self._stop.is_set():
                return
            node, pid = self.env.peers[0]
            _stderr(f"rank {self.env.rank}: stopping because the rendezvous store of rank 0 (pid {pid} on {node}, "
                    f"tcp://{self.env.master_addr}:{self.env.master_port}) does not answer ({error}): {node} was lost "
                    "or rank 0 was killed")
            os._exit(1)
        if lost and not self._stop.is_set():
            _stderr(f"rank {self.env.rank}: stopping because {describe_lost(self.env, lost, self.node_watch.timeout_s)}")
            os._exit(1)

    def _run(self) -> None:
        from mpi4py import MPI

        comm = self.env.comm
        status = MPI.Status()
        beat_every = max(self.poll_s, min(1.0, self.node_watch.timeout_s / 4)) if self.node_watch else 0.0
        next_beat = 0.0
        while not self._stop.is_set():
            if self.node_watch is not None and time.monotonic() >= next_beat:
                self._check_heartbeats()
                next_beat = time.monotonic() + beat_every
            # the peers' processes first, before an MPI call that may end this process once a peer died
            gone = gone_peers(self.env) if self.watch_peers else []
            if gone and not self._stop.is_set():
                for peer in gone:
                    node, pid = self.env.peers[peer]
                    _stderr(f"rank {self.env.rank}: stopping because rank {peer} (pid {pid} on {node}) is no longer "
                            "running: it was killed or died without a word (SIGKILL, out of memory?)")
                os._exit(1)
            # Iprobe, not a posted irecv: nothing is left pending (to cancel) when the monitor stops.
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=FAIL_TAG, status=status):
                failed_rank, message = comm.recv(source=status.Get_source(), tag=FAIL_TAG)
                _stderr(f"rank {self.env.rank}: stopping because rank {failed_rank} failed: {message}")
                os._exit(1)
            self._stop.wait(self.poll_s)

    def await_remote_verdict(self) -> None:
        """Wait (without spinning) as long as the heartbeats need to name a lost rank of another node:
        ``timeout_s`` plus two beat intervals. Returns at once when the job runs on one node or the monitor
        does not run; otherwise returns only if the monitor named nothing (it ends the process when it does)."""
        if self.node_watch is None or self._thread is None or not self._thread.is_alive():
            return
        beat_every = max(self.poll_s, min(1.0, self.node_watch.timeout_s / 4))
        self._thread.join(self.node_watch.timeout_s + 2 * beat_every)

    def stop(self) -> None:
        """Stop polling (clean end of the run); returns when the thread is gone. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def start_failure_monitor(env: RankEnv, *, poll_s: float = 0.2, watch_peers: bool = True,
                          heartbeat_timeout_s: float = 30.0) -> FailureMonitor:
    """Start watching for failure notices of other ranks, for this node's peers' processes and, when the
    job spans several nodes, for heartbeats of the other nodes' ranks (silent for ``heartbeat_timeout_s``
    seconds: lost). A no-op monitor when world_size == 1. Every rank must end it with
    :func:`stop_failure_monitor`. Raises ValueError for ``heartbeat_timeout_s <= 0``."""
    monitor = FailureMonitor(env=env, poll_s=poll_s, watch_peers=watch_peers)
    if env.comm is None or env.world_size == 1:
        return monitor
    monitor.node_watch = open_node_watch(env, timeout_s=heartbeat_timeout_s)
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        logger.warning(
            "MPI granted thread level %d < MPI_THREAD_MULTIPLE; no failure monitor thread "
            "(peers of a failed rank are still killed by the launcher, without their own message)",
            MPI.Query_thread(),
        )
        return monitor
    monitor._thread = threading.Thread(target=monitor._run, name=f"hpcvideo-failure-monitor-{env.rank}", daemon=True)
    monitor._thread.start()
    return monitor


def stop_failure_monitor(monitor: FailureMonitor) -> None:
    """At the clean end of a run, on every rank (a collective): wait until every rank got here
    (without spinning; the monitor keeps watching meanwhile, so a rank that dies now is still
    noticed), then stop the monitor. No receive is left posted."""
    env = monitor.env
    if monitor._thread is not None and env.comm is not None and env.world_size > 1:
        from .control import bcast_object, gather_object

        gather_object(env, None)
        bcast_object(env, None)
        if monitor.node_watch is not None:  # rank 0 serves the heartbeat store: it stops last
            if env.rank != 0:
                monitor.stop()
            gather_object(env, None)
    monitor.stop()


def notify_failure(env: RankEnv, message: str, *, wait_s: float = 2.0) -> None:
    """Send ``(env.rank, message)`` to every other rank and wait up to ``wait_s`` for the sends to complete."""
    if env.comm is None or env.world_size == 1:
        return
    deadline = time.monotonic() + wait_s
    _wait_all([env.comm.isend((env.rank, message), dest=peer, tag=FAIL_TAG) for peer in range(env.world_size) if peer != env.rank], wait_s)
    # Give the receivers' monitors (polling every ~0.2 s) time to print before Abort kills them.
    time.sleep(max(0.0, deadline - time.monotonic()))


def _wait_all(requests: list, wait_s: float) -> bool:
    """Test the requests until all completed or ``wait_s`` passed; True when all completed."""
    deadline = time.monotonic() + wait_s
    pending = list(requests)
    while pending and time.monotonic() < deadline:
        pending = [request for request in pending if not request.Test()]
        if pending:
            time.sleep(0.01)
    return not pending


@contextmanager
def abort_on_failure(env: RankEnv, *, notice_wait_s: float = 2.0, monitor: FailureMonitor | None = None) -> Iterator[None]:
    """Run a rank's main work; on any exception tell the other ranks and abort the whole MPI job.

    ``SystemExit(0)``/``SystemExit(None)`` pass through (a clean early exit). In a single process
    (world 1, or no MPI) the exception propagates unchanged. ``monitor``: this rank's running
    :class:`FailureMonitor`; when the error looks like a lost connection, no peer of this node is gone and
    the job spans nodes, it gets the time to name the lost ranks of another node first
    (:meth:`FailureMonitor.await_remote_verdict`).
    """
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) and error.code in (0, None):
            raise
        if env.comm is None or env.world_size == 1:
            raise
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
        _stderr(f"rank {env.rank} failed: {detail}")
        gone = gone_peers(env)
        deadline = time.monotonic() + 1.0  # a killed peer's sockets close before it is reaped: look again briefly
        while not gone and _looks_like_lost_peer(error) and time.monotonic() < deadline:
            time.sleep(0.05)
            gone = gone_peers(env)
        if not gone and _looks_like_lost_peer(error) and monitor is not None and monitor.node_watch is not None:
            _stderr(f"rank {env.rank}: a connection was lost and no rank of this node is gone: waiting up to "
                    f"{monitor.node_watch.timeout_s:g} s for the heartbeats to name the lost ranks of another node")
            monitor.await_remote_verdict()
        suspects = "".join(
            f"; rank {peer} (pid {env.peers[peer][1]} on {env.peers[peer][0]}) is no longer running: it failed first"
            for peer in gone
        )
        if suspects:
            _stderr(f"rank {env.rank}: {suspects[2:]}")
            # the rank that failed first told the others; its exit already ends the job (srun --kill-on-bad-exit,
            # hydra). No MPI call towards a dead process here: MPICH crashed in it (a segmentation fault after a
            # lost node, seen in the two-node lab), where exit 1 is what the job's log should show
            _stderr(f"rank {env.rank}: exiting (exit 1)")
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(1)
        summary = f"{type(error).__name__}: {error}"[:2000] + suspects
        try:
            notify_failure(env, summary, wait_s=notice_wait_s)
        finally:
            _stderr(f"rank {env.rank}: aborting the MPI job (MPI_Abort)")
            env.comm.Abort(1)


def _looks_like_lost_peer(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("connection closed", "connection reset", "broken pipe", "timed out", "timeout"))


def gone_peers(env: RankEnv) -> list[int]:
    """Ranks on this node whose process no longer runs (gone or a zombie); remote ranks cannot be checked.

    When a peer dies without a word (SIGKILL, OOM killer) the first sign on the others is a
    torch.distributed error ("Connection closed by peer") or a timeout; this names the culprit.
    """
    gone = []
    for peer, (node, pid) in enumerate(env.peers):
        if peer == env.rank or node != env.node:
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                state = stat.read().rsplit(")", 1)[-1].split()[0]
            alive = state not in ("Z", "X")
        except FileNotFoundError:
            alive = False
        except OSError:  # no /proc (macOS): existence only
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            gone.append(peer)
    return gone


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing else to say it with
        pass
