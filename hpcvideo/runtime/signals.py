"""Clean stops on SIGINT and SIGTERM (Ctrl-C, ``kill``, ``scancel``), for one rank and for a local ``--ranks N`` job.

A rank (``hpcvideo generate``, one process or one rank of an MPI job) installs a :class:`CleanStop`: a
:class:`hpcvideo.runtime.preempt.StopRequest` for SIGINT and SIGTERM (and SLURM's USR2 under SLURM). The
stop goes through the same agreement as SLURM's USR2::

    SIGINT / SIGTERM on any rank  ->  the flag is set (a terminal gets one line: "stopping at the next tick ...")
    next tick boundary, all ranks ->  they agree to stop and on the signal (the highest number any rank got);
                                      on several ranks the answer is read one boundary later, so stopping
                                      never makes a rank wait for another (StopRequest.lag)
    stop                          ->  checkpoint, Preempted on every rank, one line "... rerun the same command
                                      to resume", exit :func:`exit_code` (SIGINT 130, SIGTERM 143, USR2 75)
    a second SIGINT / SIGTERM     ->  exit at once with the same code (nothing more is written; the store
                                      keeps its last checkpoint, as after a kill)

No ``KeyboardInterrupt`` traceback: the handler replaces Python's; an interrupt before it is installed
(interpreter start, imports) ends the command with status 130 and one line (:mod:`hpcvideo.cli`).

A local ``--ranks N`` job (:mod:`hpcvideo.launch.local`) is one parent process, ``mpiexec`` and N ranks.
:func:`supervise` runs mpiexec for the parent:

* mpiexec starts in a session of its own, so a terminal's Ctrl-C reaches only the parent (hydra would
  answer it by killing every rank: "BAD TERMINATION"); the parent forwards SIGINT / SIGTERM to the ranks
  themselves (the processes below mpiexec that run this Python), which stop together as above;
  a second signal is forwarded too (the ranks exit at once) and mpiexec is killed if they have not after
  :data:`FORCE_AFTER_S`;
* the ranks watch the parent (:data:`LAUNCHER_VAR`, :func:`watch_launcher`): if it dies, even by
  SIGKILL, they stop at the next tick boundary as if they got SIGHUP (checkpoint, exit 129), so no rank
  keeps running without it;
* when mpiexec has ended, however it ended, the MPICH shared-memory segments that appeared during the
  job and that no process maps any more are removed (:func:`hpcvideo.runtime.shm.remove_unused_segments`).
  Ranks that end normally remove their own; a killed rank (SIGKILL, out of memory) leaves them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .preempt import EXIT_REQUEUE, StopRequest

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LAUNCHER_VAR = "HPCVIDEO_RELAUNCHED_BY"  # "<pid>:<start>" of the parent that started mpiexec, for its ranks
FORCE_AFTER_S = 10.0  # after a second signal: seconds the ranks get to exit before mpiexec is killed
WATCH_EVERY_S = 1.0  # how often a rank checks that its parent still runs


def exit_code(signal_name: str | None) -> int:
    """The exit status of a run stopped by ``signal_name`` ("SIGINT", "INT", ...): 75 for USR2 (requeue me,
    :data:`hpcvideo.runtime.preempt.EXIT_REQUEUE`), 128 + the signal's number otherwise (SIGINT 130,
    SIGTERM 143, SIGHUP 129: the shell's convention for "ended by that signal"), 1 for an unknown name."""
    name = "SIG" + (signal_name or "").removeprefix("SIG")
    if name == "SIGUSR2":
        return EXIT_REQUEUE
    try:
        return 128 + int(signal.Signals[name])
    except KeyError:
        return 1


@dataclass(kw_only=True)
class CleanStop(StopRequest):
    """A :class:`StopRequest` for SIGINT and SIGTERM (plus ``signals``' others, e.g. USR2 under SLURM) whose
    second SIGINT / SIGTERM exits the process at once (``os._exit(128 + signum)``, a line on stderr).
    ``announce``: write one line on a terminal when the first signal arrives."""

    signals: tuple[int, ...] = STOP_SIGNALS
    announce: bool = True
    lag: int = 1  # several ranks stop at the second boundary after the signal, never waiting for each other
    interrupts: int = 0  # SIGINT / SIGTERM received so far
    _launcher_watch: threading.Thread | None = field(default=None, repr=False)

    def _handle(self, signum: int, frame=None) -> None:
        name = signal.Signals(signum).name
        self.interrupts += signum in STOP_SIGNALS
        if self.interrupts >= 2 and signum in STOP_SIGNALS:
            _say(f"hpcvideo: second {name}: exiting at once; the store keeps its last checkpoint, rerun the same "
                 "command to resume from it", always=True)
            os._exit(exit_code(name))
        first = not self.requested
        super()._handle(signum, frame)
        if first and self.announce and signum in STOP_SIGNALS:
            again = "Ctrl-C" if signum == signal.SIGINT else name
            _say(f"hpcvideo: {name}: stopping every rank at a tick boundary and writing a checkpoint "
                 f"({again} again to exit at once)")

    def request(self, signal_name: str) -> None:
        """Set the flag as if ``signal_name`` ("SIGHUP") arrived, from any thread, with no other effect."""
        if not self.requested:
            self.received = signal_name
        self.requested = True

    def watch_launcher(self, environ=None) -> None:
        """If this rank was started by a local ``--ranks N`` parent (:data:`LAUNCHER_VAR`), check every
        :data:`WATCH_EVERY_S` that the parent still runs; when it is gone, :meth:`request` a stop ("SIGHUP")."""
        value = (os.environ if environ is None else environ).get(LAUNCHER_VAR)
        if not value or self._launcher_watch is not None:
            return
        pid, _, start = value.partition(":")
        record = {"host": _hostname(), "pid": int(pid), "proc_start": int(start) if start.isdigit() else None}

        def watch() -> None:
            from ..progress import process_gone

            while self.installed and not self.requested:
                if process_gone(record):
                    self.request("SIGHUP")
                    return
                time.sleep(WATCH_EVERY_S)

        self._launcher_watch = threading.Thread(target=watch, name="launcher-watch", daemon=True)
        self._launcher_watch.start()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _say(line: str, *, always: bool = False) -> None:
    """One line on stderr from a signal handler (``os.write``: no buffered stream that may be mid-write);
    only on a terminal unless ``always``."""
    try:
        if always or os.isatty(2):
            os.write(2, (line + "\n").encode())
    except OSError:
        pass


def launcher_value() -> str:
    """This process's ``<pid>:<start>`` for :data:`LAUNCHER_VAR` (start: clock ticks since boot, tells a reused pid)."""
    from ..progress import _proc_start

    info = _proc_start(os.getpid())
    return f"{os.getpid()}:{'' if info is None else info[0]}"


# ------------------------------------------------------------------------------------------ the parent's side

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def rank_processes(pid: int) -> list[int]:
    """The processes below ``pid`` (mpiexec) that run this Python interpreter: the ranks it started.
    Empty where ``/proc`` cannot tell."""
    try:
        ours = os.readlink("/proc/self/exe")
        children = _children_map()
    except OSError:
        return []
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo.extend(children.get(child, []))
        try:
            if os.readlink(f"/proc/{child}/exe") == ours:
                found.append(child)
        except OSError:
            continue
    return sorted(found)


def forward(process: subprocess.Popen, signum: int) -> list[int]:
    """Send ``signum`` to the ranks below ``process`` (mpiexec); to mpiexec itself when none is found
    (hydra passes SIGINT and SIGTERM on to its ranks). Returns the pids signalled."""
    ranks = rank_processes(process.pid)
    for pid in ranks:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    if not ranks and process.poll() is None:
        process.send_signal(signum)
        return [process.pid]
    return ranks


def supervise(command: list[str], environ: dict[str, str]) -> int:
    """Run ``command`` (mpiexec and its arguments) as a local job's parent (see the module doc) and return its
    exit status (that of the ranks: 130 / 143 after a clean stop on SIGINT / SIGTERM)."""
    from .shm import list_segments, remove_unused_segments

    before = list_segments()
    environ = {**environ, LAUNCHER_VAR: launcher_value()}
    received: list[int] = []

    def handle(signum, frame) -> None:  # only records: the loop below forwards
        received.append(signum)

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    process = subprocess.Popen(command, env=environ, stdin=subprocess.DEVNULL, start_new_session=True)
    forwarded, force_at = 0, None
    try:
        while True:
            try:
                code = process.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            while forwarded < len(received):
                forward(process, received[forwarded])
                forwarded += 1
                if forwarded >= 2 and force_at is None:
                    force_at = time.monotonic() + FORCE_AFTER_S
            if force_at is not None and time.monotonic() > force_at:
                process.kill()  # the ranks did not exit on the second signal: hydra kills them
                force_at = float("inf")
    finally:
        if process.poll() is None:  # the parent itself fails: take the job down with it
            process.kill()
            process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        removed = remove_unused_segments(list_segments() - before)
        if removed:
            print(f"hpcvideo: removed {len(removed)} shared-memory segment(s) the stopped ranks left: "
                  f"{', '.join(sorted(p.name for p in removed))}", file=sys.stderr)
    if received and code < 0:  # killed by a signal (mpiexec itself): report it as the shell would
        code = 128 - code
    return code


# ------------------------------------------------------------------------------------------ the command's side

def clean_stop_for_cli(environ=None) -> CleanStop:
    """The stop request ``hpcvideo generate`` installs on every rank: SIGINT and SIGTERM, plus USR2 under
    SLURM (``$SLURM_JOB_ID``: the time-limit warning); it watches the local parent if there is one.
    Undo with ``uninstall()``."""
    environ = os.environ if environ is None else environ
    signals = STOP_SIGNALS + ((signal.SIGUSR2,) if environ.get("SLURM_JOB_ID") else ())
    request = CleanStop(signals=signals).install()
    request.watch_launcher(environ)
    return request


def stopped_line(stop) -> tuple[str, int]:
    """(the line to print, the exit status) for a :class:`hpcvideo.runtime.preempt.Preempted` ``stop``."""
    code = exit_code(stop.signal_name)
    if code == EXIT_REQUEUE:
        return f"{stop} (exit {code})", code
    name = "SIG" + stop.signal_name.removeprefix("SIG")
    why = " (the parent hpcvideo process ended)" if name == "SIGHUP" else ""
    return (f"stopped at tick {stop.step} after {name}{why}: checkpoint written; rerun the same command to resume "
            f"from it (exit {code})"), code
