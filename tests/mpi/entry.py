"""A tiny program with the CLI's ``--ranks N`` behaviour: ``python -m tests.mpi.entry --ranks 3 [--log-dir D]``.

Outside MPI it relaunches itself under mpiexec; as a rank it builds the RankEnv, sends its output to
the per-rank logs when asked, and runs rank_env.py's checks (rank 0 prints them after ``REPORTS``).
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=None)
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--expect", type=int, required=True, help="world size the ranks must see")
    args = parser.parse_args(argv)

    from hpcvideo.launch import maybe_relaunch, redirect_rank_output

    code = maybe_relaunch(args.ranks, argv, log_dir=args.log_dir)
    if code is not None:
        return code

    import json

    from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor
    from tests.mpi.rank_env import exchange_report

    env = init_rank_env(device="cpu", timeout_s=30)
    output = redirect_rank_output(env)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env):
        assert env.world_size == args.expect, (env.world_size, args.expect)
        reports = exchange_report(env)
        print(f"rank {env.rank}/{env.world_size}: addr={env.master_addr}", flush=True)
        print(f"rank {env.rank}: a line on stderr", file=sys.stderr, flush=True)
        if env.is_main:
            print("REPORTS " + json.dumps(reports), flush=True)
    stop_failure_monitor(monitor)
    if output is not None:
        output.close()
    shutdown_rank_env(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
