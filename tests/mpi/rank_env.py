"""Under mpiexec -n K: build the RankEnv, exchange tensors with torch.distributed, rank 0 prints one JSON line.

Checks: RankEnv fields, backend, rendezvous address broadcast (every rank got rank 0's choice),
a ring send/recv and an all_reduce. Run plainly (world 1) it reports backend None.
"""

import json
import sys

import torch
import torch.distributed as dist

from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor


def exchange_report(env) -> list[dict] | None:
    """Every rank's fields and the results of a ring send/recv and an all_reduce; rank 0 gets the list."""
    report = {
        "rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
        "local_world_size": env.local_world_size, "node": env.node, "device": str(env.device),
        "backend": env.backend, "is_main": env.is_main, "addr": env.master_addr, "port": env.master_port,
    }
    if env.world_size > 1:
        assert dist.get_rank() == env.rank and dist.get_world_size() == env.world_size
        # ring: send my rank to the next, receive from the previous
        received = torch.zeros(3)
        nxt, prev = (env.rank + 1) % env.world_size, (env.rank - 1) % env.world_size
        if env.rank % 2 == 0:
            dist.send(torch.full((3,), float(env.rank)), dst=nxt)
            dist.recv(received, src=prev)
        else:
            dist.recv(received, src=prev)
            dist.send(torch.full((3,), float(env.rank)), dst=nxt)
        report["received"] = received.tolist()
        total = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(total)
        report["all_reduce"] = total.item()
    return env.comm.gather(report, root=0) if env.comm is not None else [report]


def main() -> int:
    env = init_rank_env(device="cpu", timeout_s=30)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env):
        reports = exchange_report(env)
        if env.is_main:
            print(json.dumps(reports), flush=True)
    stop_failure_monitor(monitor)
    shutdown_rank_env(env)
    shutdown_rank_env(env)  # idempotent
    return 0


if __name__ == "__main__":
    sys.exit(main())
