"""Rank environment (MPI for control, torch.distributed for tensors) and failure handling.

Use::

    env = init_rank_env(device="auto", timeout_s=60)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env, monitor=monitor):
        ...  # the rank's work
    stop_failure_monitor(monitor)
    shutdown_rank_env(env)
"""

from .env import RankEnv, check_world_size, init_rank_env, shutdown_rank_env, under_mpi_launcher
from .failure import FAIL_TAG, FailureMonitor, abort_on_failure, notify_failure, start_failure_monitor, stop_failure_monitor

__all__ = [
    "FAIL_TAG",
    "FailureMonitor",
    "RankEnv",
    "abort_on_failure",
    "check_world_size",
    "init_rank_env",
    "notify_failure",
    "shutdown_rank_env",
    "start_failure_monitor",
    "stop_failure_monitor",
    "under_mpi_launcher",
]
