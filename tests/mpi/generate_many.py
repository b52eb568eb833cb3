"""Under mpiexec -n K: several ``hpcvideo generate`` runs one after the other in one launch (one interpreter and
one torch import per rank for all of them).

``python -m tests.mpi.generate_many REPORT.json [--scenario SCENARIO ...] ARGV_JSON [ARGV_JSON ...] [--last-with-fault
FAULT ARGV_JSON]``: each ARGV_JSON
is a JSON list of CLI arguments (``["generate", "tiny-test", "--output", ...]``). Every rank first runs the
scenarios of tests/mpi/scenarios.py given with ``--scenario`` (in order, in a rank environment of their own; rank 0
prints their ``SCENARIO`` lines to stdout, as scenarios.py does), then ``hpcvideo.cli.main(argv)`` for each ARGV_JSON
in order (a ``SystemExit`` of a rank that is told to stop counts as its exit code); rank 0 rewrites REPORT.json
after each run with a list of ``{"argv", "returncode", "stdout", "stderr"}`` (rank 0's output of that run).
Runs that end the job (faults) do not belong here, except one last run given with ``--last-with-fault``: it runs
with ``HPCVIDEO_FAULT=FAULT`` (for it alone) after all the others, and its kill ends the launch.
"""

import contextlib
import io
import json
import os
import sys

from mpi4py import MPI


def main(report_path: str, argvs: list[list[str]], scenarios: list[str] = (), last: tuple | None = None) -> int:
    from hpcvideo.cli import main as cli_main

    if scenarios:
        from tests.mpi.scenarios import main as run_scenarios

        run_scenarios(list(scenarios))
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
    if last is not None:  # (fault, argv): the run that ends the launch
        fault, argv = last
        os.environ["HPCVIDEO_FAULT"] = fault
        try:
            return cli_main(argv)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def leave(code: int) -> None:
    """End this rank without the interpreter's teardown of torch, diffusers and transformers (about 1 s of CPU per
    rank, measured): output flushed, MPI finalized (mpiexec expects it of every rank), then ``os._exit``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)


def parse(args: list[str]) -> tuple[str, list[list[str]], list[str], tuple | None]:
    """(REPORT.json, argvs, scenarios, (fault, argv) of the last run or None) of the command line."""
    report, rest, argvs, scenarios, last = args[0], list(args[1:]), [], [], None
    while rest:
        arg = rest.pop(0)
        if arg == "--scenario":
            scenarios.append(rest.pop(0))
        elif arg == "--last-with-fault":
            last = (rest.pop(0), json.loads(rest.pop(0)))
        else:
            argvs.append(json.loads(arg))
    return report, argvs, scenarios, last


if __name__ == "__main__":
    leave(main(*parse(sys.argv[1:])))
