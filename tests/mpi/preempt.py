"""Under mpiexec -n K: step loop with the stop agreement of hpcvideo.runtime.preempt.

``preempt.py SIGNAL_RANK SIGNAL_STEP``: rank SIGNAL_RANK sends itself USR2 during step SIGNAL_STEP
(delivered at once, between two bytecodes); every rank must stop at the same boundary, the next
one. Rank 0 prints one JSON line: the step at which each rank stopped and whether each saw the
signal itself. A sleep on the other ranks makes them reach the boundary at different times.
"""

import json
import os
import signal
import sys
import time

from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env
from hpcvideo.runtime.control import gather_object
from hpcvideo.runtime.preempt import Preempted, StopRequest


def stop_agreement(env, signal_rank: int, signal_step: int) -> list[dict] | None:
    """The step loop on every rank of ``env``; rank 0 gets every rank's report (the others None)."""
    stopped = None
    with StopRequest() as request:
        try:
            for step in range(50):
                if request.should_stop(env):
                    raise Preempted(step)
                if step == signal_step and env.rank == signal_rank:
                    os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.05 * (env.rank + 1))  # ranks arrive at each boundary at different times
        except Preempted as stop:
            stopped = stop.step
    return gather_object(env, {"rank": env.rank, "stopped": stopped, "signalled": request.requested,
                               "received": request.received})


def main() -> None:
    signal_rank, signal_step = int(sys.argv[1]), int(sys.argv[2])
    env = init_rank_env(device="cpu", timeout_s=60, announce=False)
    with abort_on_failure(env):
        reports = stop_agreement(env, signal_rank, signal_step)
    if env.rank == 0:
        print(json.dumps(reports), flush=True)
    shutdown_rank_env(env)


if __name__ == "__main__":
    main()
