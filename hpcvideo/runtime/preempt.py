"""Stop cleanly on SLURM's warning signal: a flag set by the signal, an agreement at a step boundary.

SLURM sends ``USR2`` ``cluster.signal_delay_s`` seconds before a job's time limit (``#SBATCH
--signal=USR2@S``, submitit's default signal) and, on clusters that preempt, before a preemption.
Every rank of the job step gets it, not necessarily at the same moment. What happens::

    signal on rank r           ->  StopRequest.requested = True on rank r   (the handler does nothing else)
    next step boundary, all    ->  request.should_stop(env): "did ANY rank get the signal?" (one small
                                   collective, the same answer on every rank, so all stop at the same step)
    stop                       ->  rank 0 writes its checkpoint, every rank raises Preempted
    Preempted                  ->  the caller requeues: the submitit job asks submitit to requeue it,
                                   ``hpcvideo generate`` exits with EXIT_REQUEUE (75) for sbatch scripts

The stop request is an object made at the edge (``hpcvideo generate`` under SLURM, the submitit job
:class:`hpcvideo.launch.slurm.GenerateJob`) and handed down (``generate(cfg, stop=request)`` ->
:func:`hpcvideo.runner.run`); nothing lives in this module between calls. Use at a step boundary::

    from hpcvideo.runtime.preempt import Preempted, StopRequest

    with StopRequest() as request:            # installs the handler, restores the previous one on exit
        ...
        if request.should_stop(env):          # collective: every rank calls it at the same boundary
            if env.is_main:
                checkpoint("resume")
            raise Preempted(step)

:func:`should_stop` ``(env, None)`` is a no-op returning False (no message), so plain local runs,
which get no request, pay nothing; give a request to every rank or to none (a rank without one would
skip the collective and the others would wait for it).

The agreement waits without spinning (non-blocking ``Iallreduce`` + ``Test`` + sleep; see
:mod:`hpcvideo.runtime.control` for why MPICH's blocking calls must be avoided).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

EXIT_REQUEUE = 75  # sysexits EX_TEMPFAIL: "stopped at a checkpoint, run me again"; slurm/*.sbatch requeue on it
STOPPED_FILE_VAR = "HPCVIDEO_STOPPED_FILE"  # set by slurm/*.sbatch: a file a stopped rank creates (see mark_stopped)


def mark_stopped(environ=None) -> None:
    """Create the file named by ``HPCVIDEO_STOPPED_FILE`` (if set): "this rank stopped at a checkpoint".

    The sbatch scripts requeue when srun exits with :data:`EXIT_REQUEUE` *or* this file exists: with
    ``srun --kill-on-bad-exit=1`` the first rank to exit 75 makes srun terminate the others while they
    are still leaving, and srun then exits with their signal's code (143), not 75 (measured on the
    two-node lab: the job was not requeued). The scripts name a file on the batch node, where rank 0
    runs; any rank may create it. Errors creating it are ignored (the exit code still says 75).
    """
    import os

    environ = os.environ if environ is None else environ
    path = environ.get(STOPPED_FILE_VAR)
    if path:
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError:
            pass


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
    """One process's stop flag: ``signals`` set ``requested`` once :meth:`install` ed; ``previous`` maps each
    signal to the handler it replaced (restored by :meth:`uninstall`). Also a context manager (install on
    enter, uninstall on exit). ``poll_s``: seconds between two tests of the agreement's pending collective."""

    signals: tuple[int, ...] = (signal.SIGUSR2,)
    requested: bool = False
    received: str | None = None  # name of the first signal received
    agreed: str | None = None  # after a stop agreement: the signal every rank stops for (the highest number received)
    lag: int = 0  # 1: decide at each boundary on the flags of the boundary before (see should_stop)
    _pending: Any = field(default=None, repr=False)
    previous: dict[int, Any] = field(default_factory=dict)
    installed: bool = False
    poll_s: float = 0.001

    def _handle(self, signum: int, frame: Any = None) -> None:  # only sets the flag: safe at any bytecode
        if not self.requested:
            self.received = signal.Signals(signum).name
        self.requested = True

    def install(self) -> StopRequest:
        """Make ``signals`` set this request's flag (main thread only); returns ``self``. The replaced handlers
        are kept in ``previous`` (under submitit: its checkpoint-and-requeue handler for USR2, which
        :mod:`hpcvideo.launch.slurm` calls once every rank stopped). Raises RuntimeError if already installed."""
        if self.installed:
            raise RuntimeError("this stop request is already installed")
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._handle)
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Restore the handlers :meth:`install` replaced (idempotent)."""
        if not self.installed:
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.installed = False

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def call_previous(self, signum: int) -> None:
        """Run the handler this one replaced (submitit's checkpoint-and-requeue) as if ``signum`` arrived."""
        handler: Callable | Any = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)

    def should_stop(self, env) -> bool:
        """True on every rank when any rank's request got a stop signal (collective).

        Every rank must call it at the same step boundary, as for any collective. World 1 (``env.comm``
        None or ``env.world_size`` 1): the local flag, nothing sent.

        ``lag`` 1: the flags are posted at each boundary without waiting, and the answer is that of the
        boundary before (False at the first), so every rank stops one boundary later than with ``lag`` 0 but
        no rank waits for another at a boundary: DualParal's rank 0 runs into tick t+1 while the last stage
        still finishes tick t, and a per-tick wait for the last stage would cost that overlap; by the time
        rank 0 ends a tick, every rank has passed the boundary before it, so the answer is there.
        """
        if env.comm is None or env.world_size == 1:
            self.agreed = self.received if self.requested else None
            return self.requested
        import numpy as np
        from mpi4py import MPI

        # the signal's number, not just a flag: every rank learns which signal stops the job (USR2: requeue)
        local = np.array([_signum(self.received) if self.requested else 0], dtype=np.int32)
        agreed = np.zeros(1, dtype=np.int32)
        pending = env.comm.Iallreduce(local, agreed, op=MPI.MAX)
        if self.lag:  # answer with the boundary before; this one's is read at the next boundary
            (pending, local, agreed), self._pending = (self._pending or (None, None, None)), (pending, local, agreed)
            if pending is None:
                self.agreed = None
                return False
        while not pending.Test():  # MPICH's blocking Allreduce would busy-poll a core
            time.sleep(self.poll_s)
        self.agreed = signal.Signals(int(agreed[0])).name if agreed[0] > 0 else None
        return bool(agreed[0])


def settle(request: StopRequest | None, timeout_s: float = 60.0) -> None:
    """After the last boundary, on every rank (collective: all made the same number of :func:`should_stop`
    calls): with ``lag`` 1 the last boundary's agreement is still posted; wait for it (test + sleep, at most
    ``timeout_s``), so that no request on the communicator outlives the run (MPICH reports one at
    ``MPI_Finalize``: "Builtin communicator ... has pending 1 references"). Nothing to do otherwise."""
    pending = None if request is None or request._pending is None else request._pending[0]
    if pending is None:
        return
    deadline = time.monotonic() + timeout_s
    while not pending.Test():
        if time.monotonic() > deadline:
            return  # a rank that stopped answering: the failure monitor names it, the run does not wait here
        time.sleep(request.poll_s)
    request._pending = None


def _signum(name: str | None) -> int:
    """The number of signal ``name`` ("SIGUSR2"); SIGUSR2's for a flag set without a signal name."""
    try:
        return int(signal.Signals[name])
    except KeyError:
        return int(signal.SIGUSR2)


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> StopRequest:
    """A new :class:`StopRequest` for ``signals``, installed (main thread only). Undo with
    :func:`uninstall_stop_handler` (or ``request.uninstall()``)."""
    return StopRequest(signals=tuple(signals)).install()


def uninstall_stop_handler(request: StopRequest | None) -> None:
    """Restore the handlers ``request`` replaced (idempotent; None: nothing to do)."""
    if request is not None:
        request.uninstall()


def should_stop(env, request: StopRequest | None) -> bool:
    """``request.should_stop(env)`` (collective: every rank at the same boundary); False at once, sending
    nothing, when ``request`` is None (no stop handler in this run)."""
    return False if request is None else request.should_stop(env)
