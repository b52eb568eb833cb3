"""Stop cleanly on SLURM's warning signal: a flag set by the signal, an agreement at a step boundary.

SLURM sends ``USR2`` ``cluster.signal_delay_s`` seconds before a job's time limit (``#SBATCH
--signal=USR2@S``, submitit's default signal) and, on clusters that preempt, before a preemption.
Every rank of the job step gets it, not necessarily at the same moment. What happens::

    signal on rank r           ->  StopRequest.requested = True on rank r   (the handler does nothing else)
    next step boundary, all    ->  stop = should_stop(env): "did ANY rank get the signal?" (one small
                                   collective, the same answer on every rank, so all stop at the same step)
    stop                       ->  rank 0 writes its checkpoint, every rank raises Preempted
    Preempted                  ->  the caller requeues: the submitit job asks submitit to requeue it,
                                   ``hpcvideo generate`` exits with EXIT_REQUEUE (75) for sbatch scripts

Use at a step boundary (DualParal: the tick loop of ``generate._run``; Video-Infinity: its step
loop)::

    from hpcvideo.runtime.preempt import Preempted, should_stop

    if should_stop(env):          # collective: every rank calls it at the same boundary
        if env.is_main:
            checkpoint("resume")
        raise Preempted(step)

``should_stop`` is a no-op returning False (no message) unless :func:`install_stop_handler` was
called in this process, so plain local runs pay nothing; install it on every rank or on none (a
rank without it would skip the collective and the others would wait for it).

The agreement waits without spinning (non-blocking ``Iallreduce`` + ``Test`` + sleep; see
:mod:`hpcvideo.runtime.control` for why MPICH's blocking calls must be avoided).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

EXIT_REQUEUE = 75  # sysexits EX_TEMPFAIL: "stopped at a checkpoint, run me again"; slurm/*.sbatch requeue on it


class Preempted(SystemExit):
    """Every rank stopped at the same step boundary after a stop signal; the run store holds a
    checkpoint of that step. Raised on all ranks at once, so it is a clean exit (``code`` 0 for
    :func:`hpcvideo.runtime.abort_on_failure`, which lets it pass without aborting the MPI job);
    callers turn it into a requeue (:data:`EXIT_REQUEUE`, or submitit's requeue)."""

    def __init__(self, step: int, signal_name: str = "USR2"):
        super().__init__(0)
        self.step = step
        self.signal_name = signal_name

    def __str__(self) -> str:
        return f"stopped at step {self.step} after {self.signal_name}: checkpoint written, requeue to continue"

    def __reduce__(self):
        return (type(self), (self.step, self.signal_name))


@dataclass(kw_only=True)
class StopRequest:
    """The process's stop flag and the handlers it replaced (``previous``: signal -> old handler)."""

    signals: tuple[int, ...]
    requested: bool = False
    received: str | None = None  # name of the first signal received
    previous: dict[int, Any] = field(default_factory=dict)
    poll_s: float = 0.001

    def _handle(self, signum: int, frame: Any = None) -> None:  # only sets the flag: safe at any bytecode
        if not self.requested:
            self.received = signal.Signals(signum).name
        self.requested = True

    def call_previous(self, signum: int) -> None:
        """Run the handler this one replaced (submitit's checkpoint-and-requeue) as if ``signum`` arrived."""
        handler: Callable | Any = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)


_ACTIVE: StopRequest | None = None


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> StopRequest:
    """Make ``signals`` set the stop flag of this process (main thread only); returns the request.

    The replaced handlers are kept in ``request.previous`` (under submitit: its checkpoint-and-
    requeue handler for USR2, which :mod:`hpcvideo.launch.slurm` calls once every rank stopped).
    """
    global _ACTIVE
    request = StopRequest(signals=tuple(signals))
    for signum in request.signals:
        request.previous[signum] = signal.signal(signum, request._handle)
    _ACTIVE = request
    return request


def uninstall_stop_handler() -> None:
    """Restore the handlers replaced by :func:`install_stop_handler` (idempotent)."""
    global _ACTIVE
    if _ACTIVE is None:
        return
    for signum, handler in _ACTIVE.previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    _ACTIVE = None


def active_stop_request() -> StopRequest | None:
    return _ACTIVE


def should_stop(env) -> bool:
    """True on every rank when any rank got a stop signal since it was installed (collective).

    Every rank must call it at the same step boundary, as for any collective. Without an installed
    handler it returns False at once and sends nothing. World 1: the local flag.
    """
    request = _ACTIVE
    if request is None:
        return False
    if env.comm is None or env.world_size == 1:
        return request.requested
    import numpy as np
    from mpi4py import MPI

    local = np.array([1 if request.requested else 0], dtype=np.int32)
    agreed = np.zeros(1, dtype=np.int32)
    pending = env.comm.Iallreduce(local, agreed, op=MPI.MAX)
    while not pending.Test():  # MPICH's blocking Allreduce would busy-poll a core
        time.sleep(request.poll_s)
    return bool(agreed[0])
