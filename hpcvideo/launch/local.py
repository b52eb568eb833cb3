"""Local launch: ``hpcvideo generate ... --ranks N`` outside any MPI launcher re-runs itself under mpiexec.

The parent (not an MPI rank) runs ``mpiexec -n N python <same program> <same args without --ranks>``
and returns mpiexec's exit code (Ctrl-C / SIGTERM go to the ranks, which stop at a checkpoint;
:func:`hpcvideo.runtime.signals.supervise`); the children see the launcher's variables (``PMI_RANK``, ...), so
:func:`maybe_relaunch` returns None in them and they go on as ranks. mpiexec is the one of the
installed MPI library: the one next to ``sys.executable`` (the mpich wheel puts it in the venv's
bin/), then ``mpiexec`` on PATH. MPICH (hydra) needs no flags (it oversubscribes cores by itself);
Open MPI gets ``--oversubscribe`` and, as root, ``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1``.

Per-rank logs are written by the ranks themselves (not by mpiexec flags, which differ between MPI
libraries and cannot put stdout and stderr into one file): the parent passes the folder in the
environment variable :data:`LOG_DIR_VAR` and each rank calls :func:`redirect_rank_output` (both in
:mod:`hpcvideo.runtime.output`; importable from here too) right
after ``init_rank_env``:

* rank R != 0: its file descriptors 1 and 2 are pointed at ``log_dir/rank<R>.log`` (everything,
  also C-level output such as NCCL/gloo warnings, goes to the file and nothing to the terminal);
* rank 0: ``sys.stdout``/``sys.stderr`` are teed at the Python level into ``log_dir/rank0.log`` and
  the terminal, so the user keeps seeing rank 0's progress; C-level output of rank 0 reaches only
  the terminal.

Only rank 0 talks to the terminal then; a failing rank R's traceback is in ``rank<R>.log``, and rank
0's failure monitor prints ``rank 0: stopping because rank R failed: <error>`` on the terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..runtime.env import (  # noqa: F401  (launcher_rank_and_size, RELAUNCHED_VAR: public here too)
    MPI_HELP, RELAUNCHED_VAR, MPIUnavailable, launcher_rank_and_size, mpi_available, under_mpi_launcher,
)
from ..runtime.output import LOG_DIR_VAR, RankOutput, redirect_rank_output  # noqa: F401  (public here too)
from ..runtime.signals import supervise

logger = logging.getLogger(__name__)



def find_mpiexec() -> Path:
    """The ``mpiexec`` of the installed MPI: next to ``sys.executable`` first, then on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found:
        return Path(found)
    raise MPIUnavailable(
        f"--ranks needs an MPI launcher but no mpiexec was found (not next to {sys.executable}, not on PATH); "
        f"{MPI_HELP}; or run with --ranks 1 (a single rank needs no MPI)"
    )


def mpi_flavour(mpiexec: Path) -> str:
    """"mpich" (hydra: MPICH, Intel MPI, MVAPICH) | "openmpi" | "unknown", from ``mpiexec --version``."""
    try:
        result = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (result.stdout + result.stderr).lower()
    if "hydra" in text or "mpich" in text or "intel" in text:
        return "mpich"
    if "open mpi" in text or "open-mpi" in text or "openrte" in text or "prte" in text:
        return "openmpi"
    return "unknown"


def strip_ranks_option(argv: list[str]) -> list[str]:
    """``argv`` without ``--ranks N`` / ``--ranks=N`` (tokens after a bare ``--`` are left alone)."""
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            out.append(token)
            out.extend(tokens)
            break
        if token == "--ranks":
            next(tokens, None)
            continue
        if token.startswith("--ranks="):
            continue
        out.append(token)
    return out


def current_program() -> list[str]:
    """How this Python program was started, minus its arguments: ``["-m", module]`` or ``[script]``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__") if spec.name.endswith(".__main__") else spec.name
        return ["-m", name]
    if sys.argv and sys.argv[0] and Path(sys.argv[0]).is_file():
        return [str(Path(sys.argv[0]).resolve())]
    raise RuntimeError("cannot tell how this program was started to relaunch it under mpiexec; pass program=")


def relaunch_under_mpiexec(
    num_ranks: int, argv: list[str], *, log_dir: Path | None, program: list[str] | None = None
) -> int:
    """Run ``mpiexec -n num_ranks python <program> <argv without --ranks>``; return its exit code.

    ``argv``: the program's arguments (``sys.argv[1:]``); ``program``: what follows ``python``
    (default: this process's own ``-m module`` or script). ``log_dir``: per-rank logs
    ``rank<R>.log`` (see the module docstring), or None for all ranks on the terminal.
    """
    if num_ranks < 1:
        raise ValueError(f"--ranks={num_ranks} is not allowed; use a number of ranks >= 1")
    mpiexec = find_mpiexec()
    problem = mpi_available()  # before any rank starts: every rank would die in MPI_Init otherwise
    if problem is not None:
        raise MPIUnavailable(f"--ranks {num_ranks} needs MPI, but {problem}; {MPI_HELP}; "
                             "or run with --ranks 1 (a single rank needs no MPI)")
    flavour = mpi_flavour(mpiexec)
    flags: list[str] = []
    environ = dict(os.environ)
    environ[RELAUNCHED_VAR] = "1"
    if flavour == "openmpi":
        flags.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            environ["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            environ["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    if log_dir is not None:
        log_dir = Path(log_dir).resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        environ[LOG_DIR_VAR] = str(log_dir)
    else:
        environ.pop(LOG_DIR_VAR, None)
    command = [str(mpiexec), *flags, "-n", str(num_ranks), sys.executable, *(program or current_program()), *strip_ranks_option(argv)]
    logger.info("launching %d ranks: %s", num_ranks, " ".join(command))
    # signals forwarded to the ranks, ranks that stop when this process dies, shared memory cleaned up
    return supervise(command, environ)


def maybe_relaunch(args_ranks: int | None, argv: list[str], *, log_dir: Path | None = None, program: list[str] | None = None) -> int | None:
    """For the CLI: the exit code of a relaunch under mpiexec, or None to go on in this process.

    None when ``--ranks`` was not given, is 1, or this process already is a rank (started by
    mpiexec/mpirun/srun or by a relaunch); a ``--ranks`` that disagrees with the launcher's number of
    ranks is then ignored with a warning (the launcher decides).
    """
    if args_ranks is None:
        return None
    if args_ranks < 1:
        raise ValueError(f"--ranks={args_ranks} is not allowed; use a number of ranks >= 1")
    if under_mpi_launcher() or os.environ.get(RELAUNCHED_VAR) == "1":
        launched = _launcher_world_size()
        if launched is not None and launched != args_ranks:
            logger.warning("--ranks=%d ignored: the MPI launcher started %d ranks", args_ranks, launched)
        return None
    if args_ranks == 1:
        return None
    return relaunch_under_mpiexec(args_ranks, argv, log_dir=log_dir, program=program)


def _launcher_world_size() -> int | None:
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def planned_world_size(args_ranks: int | None) -> int:
    """The number of ranks a ``generate`` command will run on: the launcher's count under a launcher,
    else ``--ranks`` (may be < 1: the caller refuses it), else 1."""
    launched = launcher_rank_and_size()
    if launched is not None:
        return launched[1]
    return 1 if args_ranks is None else args_ranks


def check_launch(cfg, args_ranks: int | None) -> None:
    """Refuse (:class:`hpcvideo.layout.RanksError`, one line) a rank count ``cfg`` cannot run on,
    before any rank starts: ``--ranks`` < 1, more DualParal stages than transformer blocks, a
    stage split of another length, Video-Infinity clips that do not fit. Under a launcher the
    launcher's count is checked; ranks other than 0 then exit 2 (SystemExit) without a message."""
    from ..layout import check_ranks

    from ..layout import RanksError

    world_size = planned_world_size(args_ranks)
    launched = launcher_rank_and_size()
    what = f"--ranks {world_size}: " if launched is None and args_ranks is not None else f"{world_size} rank(s): "
    try:
        check_ranks(cfg, world_size, what=what)
    except RanksError:
        if launched is not None and launched[0] != 0:
            raise SystemExit(2) from None  # every rank reaches the same verdict; rank 0 says it once
        raise
