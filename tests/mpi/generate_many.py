"""Under mpiexec -n K: several ``hpcvideo generate`` runs one after the other in one launch (one interpreter and
one torch import per rank for all of them).

``python -m tests.mpi.generate_many REPORT.json ARGV_JSON [ARGV_JSON ...]``: each ARGV_JSON is a JSON list of CLI
arguments (``["generate", "tiny-test", "--output", ...]``). Every rank runs ``hpcvideo.cli.main(argv)`` for each
in order (a ``SystemExit`` of a rank that is told to stop counts as its exit code); rank 0 rewrites REPORT.json
after each run with a list of ``{"argv", "returncode", "stdout", "stderr"}`` (rank 0's output of that run).
Runs that end the job (faults) do not belong here: they have a launch of their own.
"""

import contextlib
import io
import json
import os
import sys

from mpi4py import MPI


def main(report_path: str, argvs: list[list[str]]) -> int:
    from hpcvideo.cli import main as cli_main

    comm = MPI.COMM_WORLD
    reports = []
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        comm.Barrier()  # the next run starts together on every rank
        if comm.Get_rank() == 0:
            reports.append({"argv": argv, "returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
            with open(report_path, "w") as file:
                json.dump(reports, file)
    return 0


def leave(code: int) -> None:
    """End this rank without the interpreter's teardown of torch, diffusers and transformers (about 1 s of CPU per
    rank, measured): output flushed, MPI finalized (mpiexec expects it of every rank), then ``os._exit``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1], [json.loads(a) for a in sys.argv[2:]]))
