"""A rank's output: ``redirect_rank_output`` sends it to ``log_dir/rank<R>.log`` (rank 0: also the terminal).

The launcher (:mod:`hpcvideo.launch.local`) passes the folder to the ranks it starts in the environment
variable :data:`LOG_DIR_VAR`; each rank calls :func:`redirect_rank_output` right after ``init_rank_env``:

Each start of the job appends to the logs, after a line naming the time, rank and pid (:func:`start_line`),
so the log of a run that was stopped and resumed keeps every attempt.

* rank R != 0: its file descriptors 1 and 2 are pointed at ``log_dir/rank<R>.log`` (everything,
  also C-level output such as NCCL/gloo warnings, goes to the file and nothing to the terminal);
* rank 0: ``sys.stdout``/``sys.stderr`` are teed at the Python level into ``log_dir/rank0.log`` and
  the terminal, so the user keeps seeing rank 0's progress; C-level output of rank 0 reaches only
  the terminal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .env import RankEnv

LOG_DIR_VAR = "HPCVIDEO_RANK_LOG_DIR"  # per-rank log folder, set by the parent for its ranks


class _Tee:
    """A text stream that writes to the terminal stream and the log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@dataclass(kw_only=True)
class RankOutput:
    """Where a rank's output went; :meth:`close` flushes (and on rank 0 restores sys.stdout/stderr)."""

    path: Path
    log: TextIO
    teed: bool

    def close(self) -> None:
        if self.teed:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        else:
            sys.stdout.flush()
            sys.stderr.flush()
        self.log.flush()


def first_process_of_job() -> bool:
    """True in the one process of a job that reports what every rank would (config warnings): a process outside
    any launcher (a one-rank run, or the parent of a local ``--ranks N`` job), or rank 0 under a launcher that
    no parent of ours started (srun, a user's mpiexec). False in every other rank."""
    from .env import RELAUNCHED_VAR, launcher_rank_and_size

    if os.environ.get(RELAUNCHED_VAR) == "1":
        return False  # the parent that started this job's mpiexec reported them already
    launched = launcher_rank_and_size()
    return launched is None or launched[0] == 0


def start_line(env: RankEnv) -> str:
    """The line that opens one attempt's part of a rank log: ``==== <UTC time> rank R of N, pid P on HOST ====``."""
    import socket
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"==== {when} rank {env.rank} of {env.world_size}, pid {os.getpid()} on {socket.gethostname()} ====\n"


def redirect_rank_output(env: RankEnv, log_dir: Path | str | None = None) -> RankOutput | None:
    """Send this rank's output to ``log_dir/rank<R>.log`` (rank 0: also to the terminal).

    ``log_dir`` None: the folder from :data:`LOG_DIR_VAR` (set by :func:`relaunch_under_mpiexec`);
    neither: nothing changes and None is returned. Call it once, right after ``init_rank_env``.
    """
    log_dir = log_dir if log_dir is not None else os.environ.get(LOG_DIR_VAR)
    if not log_dir:
        return None
    path = Path(log_dir) / f"rank{env.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # line-buffered; closed at exit
    log.write(start_line(env))  # appended: a rerun (resume) keeps the logs of the earlier attempts above its own
    if env.rank == 0:
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        return RankOutput(path=path, log=log, teed=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):  # a file is block-buffered: keep lines even if the rank is killed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    return RankOutput(path=path, log=log, teed=False)
