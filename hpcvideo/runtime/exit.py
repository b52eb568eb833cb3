"""End the ``hpcvideo`` program without the interpreter's teardown.

When a process that imported torch, diffusers and transformers exits normally, Python clears every module and
frees every object, and the libraries' C++ destructors run: about 1 s of CPU per process on this project's
2-core test machine (measured: 5.3 s of CPU for a tiny-test ``generate`` process, 4.0 s of it with this exit),
paid by every rank of every run. Nothing of a finished command needs it: the run store's writes have returned,
the ranks' process group is shut down. :func:`leave` does what a normal exit must still do, then ``os._exit``:

* flushes ``sys.stdout``/``sys.stderr`` (on a rank these may be its log file, :mod:`hpcvideo.runtime.output`)
  and the logging handlers (``logging.shutdown``);
* finalizes MPI where this process initialized it (mpiexec and srun expect ``MPI_Finalize`` of every rank);
  a process that never imported ``mpi4py.MPI`` does not import it here.

Only the program's entry (``hpcvideo ...``, ``python -m hpcvideo.cli ...``) calls it, with main()'s exit status;
``hpcvideo.cli.main(argv)`` called from Python returns as before. An exception that escapes main() ends the
process the normal way (traceback, exit 1).
"""

from __future__ import annotations

import logging
import os
import sys


def leave(code: int) -> None:
    """Flush output and logs, finalize MPI if this process initialized it, and exit with ``code`` (never returns)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
            pass
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))
