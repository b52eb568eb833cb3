"""Under mpiexec -n K: several scenarios in one launch (one MPI world, one interpreter and torch import per rank).

``python -m tests.mpi.scenarios SCENARIO [SCENARIO ...]``, in the given order, on every rank:

* ``exchange``: rank_env.py's RankEnv fields, ring send/recv and all_reduce;
* ``preempt:R:S``: preempt.py's stop agreement, rank R signalled during step S;
* ``vi_forward:OUT:UNET3D_DIR:WAN_DIR``: videoinfinity_forward.py's clip-parallel forwards, saved to OUT.
* ``experts:OUT:WAN22_DIR``: experts.py's two-expert runs of both strategies, stores next to OUT (their paths
  are the report).

Rank 0 prints one line ``SCENARIO <scenario> <json>`` per scenario (the json: rank 0's result, or null).
A failure on any rank ends the whole job (abort_on_failure), as in the one-scenario scripts.
"""

import json
import os
import sys

from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor
from tests.mpi.experts import run_experts
from tests.mpi.preempt import stop_agreement
from tests.mpi.rank_env import exchange_report
from tests.mpi.videoinfinity_forward import forward_all


def run_scenario(env, scenario: str):
    name, *args = scenario.split(":")
    if name == "exchange":
        return exchange_report(env)
    if name == "preempt":
        return stop_agreement(env, int(args[0]), int(args[1]))
    if name == "vi_forward":
        forward_all(env, *args)
        return None
    if name == "experts":
        return run_experts(env, *args)
    raise ValueError(f"unknown scenario {scenario!r}; allowed: exchange, preempt:R:S, vi_forward:OUT:UNET3D_DIR:WAN_DIR, "
                     "experts:OUT:WAN22_DIR")


def main(scenarios: list[str]) -> int:
    env = init_rank_env(device="cpu", timeout_s=120)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env):
        for scenario in scenarios:
            result = run_scenario(env, scenario)
            env.comm.barrier()  # the next scenario starts together on every rank
            if env.is_main:
                print(f"SCENARIO {scenario} {json.dumps(result)}", flush=True)
    stop_failure_monitor(monitor)
    shutdown_rank_env(env)
    return 0


def leave(code: int) -> None:
    """End this rank without the interpreter's teardown of torch, diffusers and transformers (about 1 s of CPU per
    rank, measured): output flushed, MPI finalized (mpiexec expects it of every rank), then ``os._exit``."""
    from mpi4py import MPI

    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
