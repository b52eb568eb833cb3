"""Under mpiexec -n 3: one rank fails while the others wait for it in torch.distributed.

``python fail.py raise R``: rank R raises ValueError inside abort_on_failure.
``python fail.py kill R``: rank R SIGKILLs itself (says nothing).
``python fail.py kill-unnoticed R``: the same, but the other ranks ignore SIGUSR1, the signal hydra
sends to the survivors under ``-disable-auto-cleanup`` (Python's default action for it is to die
silently); so the launcher does nothing, as ``srun`` without ``--kill-on-bad-exit``.
``python fail.py hang R``: rank R stays alive but never sends (stuck); the others' recv times out (3 s).
The other ranks block in ``dist.recv(src=R)``; every rank should exit non-zero within seconds.
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor


def main(mode: str, failing: int) -> int:
    if mode == "kill-unnoticed":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    env = init_rank_env(device="cpu", timeout_s=3 if mode == "hang" else 30)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env):
        env.comm.barrier()
        print(f"rank {env.rank}: ready", flush=True)
        if env.rank == failing:
            time.sleep(0.5)  # let the others block in recv first
            print(f"rank {env.rank}: failing at {time.time():.3f}", file=sys.stderr, flush=True)
            if mode == "raise":
                raise ValueError(f"injected failure on rank {env.rank}")
            if mode == "hang":
                time.sleep(120)
            os.kill(os.getpid(), signal.SIGKILL)  # kill, kill-unnoticed
        buffer = torch.zeros(4)
        dist.recv(buffer, src=failing)  # never satisfied
        print(f"rank {env.rank}: recv returned (unexpected)", flush=True)
    stop_failure_monitor(monitor)
    shutdown_rank_env(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
