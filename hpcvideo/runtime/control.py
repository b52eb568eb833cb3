"""Control messages over MPI that wait without spinning.

MPICH's blocking calls busy-poll: a rank waiting in ``comm.bcast`` while rank 0 loads a text encoder
burns a whole core. On an oversubscribed CPU node (tests: 4 ranks on 2 cores) that starves the rank
doing the work by an order of magnitude. :func:`bcast_object`, :func:`gather_object` and
:func:`scatter_object` wait with ``Iprobe``/``Test`` + sleep instead.
"""

from __future__ import annotations

import time
from typing import Any

BCAST_TAG = 7102  # distinct from runtime.failure.FAIL_TAG


def bcast_object(env, obj: Any = None, *, root: int = 0, poll_s: float = 0.01) -> Any:
    """``comm.bcast(obj, root)`` for picklable objects, without busy-waiting on the receivers.

    Every rank must call it in the same order (as with a collective). World 1 returns ``obj``.
    """
    if env.comm is None or env.world_size == 1:
        return obj
    comm = env.comm
    if env.rank == root:
        requests = [comm.isend(obj, dest=peer, tag=BCAST_TAG) for peer in range(env.world_size) if peer != root]
        while not all(request.Test() for request in requests):
            time.sleep(poll_s)
        return obj
    while not comm.Iprobe(source=root, tag=BCAST_TAG):
        time.sleep(poll_s)
    return comm.recv(source=root, tag=BCAST_TAG)


GATHER_TAG = 7103


def gather_object(env, obj: Any, *, root: int = 0, poll_s: float = 0.01) -> list[Any] | None:
    """``comm.gather(obj, root)`` without busy-waiting: the list of every rank's ``obj`` on ``root``
    (in rank order), None elsewhere. World 1 returns ``[obj]``."""
    if env.comm is None or env.world_size == 1:
        return [obj]
    comm = env.comm
    if env.rank != root:
        request = comm.isend(obj, dest=root, tag=GATHER_TAG)
        while not request.Test():
            time.sleep(poll_s)
        return None
    gathered = []
    for peer in range(env.world_size):
        if peer == root:
            gathered.append(obj)
            continue
        while not comm.Iprobe(source=peer, tag=GATHER_TAG):
            time.sleep(poll_s)
        gathered.append(comm.recv(source=peer, tag=GATHER_TAG))
    return gathered


SCATTER_TAG = 7104


def scatter_object(env, objs: list[Any] | None, *, root: int = 0, poll_s: float = 0.01) -> Any:
    """``comm.scatter(objs, root)`` without busy-waiting: rank r gets ``objs[r]`` (``objs``: one object per
    rank, given on ``root``; ignored elsewhere). World 1 returns ``objs[0]``."""
    if env.comm is None or env.world_size == 1:
        return objs[0]
    comm = env.comm
    if env.rank == root:
        if len(objs) != env.world_size:
            raise ValueError(f"scatter_object: {len(objs)} objects for {env.world_size} ranks")
        requests = [comm.isend(objs[peer], dest=peer, tag=SCATTER_TAG) for peer in range(env.world_size) if peer != root]
        while not all(request.Test() for request in requests):
            time.sleep(poll_s)
        return objs[root]
    while not comm.Iprobe(source=root, tag=SCATTER_TAG):
        time.sleep(poll_s)
    return comm.recv(source=root, tag=SCATTER_TAG)
