"""The public entry point: :func:`generate` runs (or resumes, or extends) a job on every rank.

It is the edge of a run: it refuses a rank count the run cannot use before MPI starts, starts the rank
environment (MPI + torch.distributed, the device), resolves what depends on the rank count, sends each
rank's log to ``RUN.zarr.logs/rank<R>.log``, watches for failed ranks, and hands the job to
:func:`hpcvideo.runner.run`, which drives the strategy's executor (:mod:`hpcvideo.strategies`). See
:mod:`hpcvideo.runner` for what a run does with the store (resume, extension, checkpoints).
"""

from __future__ import annotations

import os

from .config import RunConfig
from .faults import FaultPlan
from .layout import RanksError, model_num_layers, ranks_problem, resolve_config
from .models.family import resolve_model_path  # noqa: F401  (public: the model folder of a config)
from .runner import run
from .runtime import init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor
from .runtime.env import launcher_rank_and_size
from .runtime.output import LOG_DIR_VAR, redirect_rank_output
from .runtime.preempt import StopRequest


def generate(cfg: RunConfig, *, progress: bool = True, stop: StopRequest | None = None,
             faults: FaultPlan | None = None) -> dict | None:
    """Run (or resume, or extend) the job of ``cfg`` to completion on every rank of the MPI job
    (one rank: a plain process). Returns the store's status dict on rank 0, None elsewhere.

    ``stop``: an installed :class:`hpcvideo.runtime.preempt.StopRequest` (under SLURM; give one on every rank
    or on none): a stop signal on any rank makes every rank checkpoint at the next tick and raise
    :class:`hpcvideo.runtime.preempt.Preempted`. None: never preempted. ``faults``: the tests' planned fault
    (:class:`hpcvideo.faults.FaultPlan`; None: read once from ``HPCVIDEO_FAULT`` when the run starts).

    Errors (raised on every rank, before any weights are loaded): RanksError (a rank count the run cannot
    use, :func:`hpcvideo.layout.ranks_problem`: raised on rank 0 before MPI starts, the other ranks exit 2),
    ConfigMismatchError (the store was
    made with a different config; lists the keys), StoreError (shorter --frames, corrupt store),
    ConfigError (a stage split that does not fit the model or the rank count), RuntimeError (device
    unavailable). A failure after that aborts the whole job with a message naming the failed rank
    (:mod:`hpcvideo.runtime.failure`).
    """
    _check_world_size(cfg, launcher_rank_and_size())  # before MPI/torch.distributed start: fail fast on every rank
    env = init_rank_env(device=cfg.runtime.device, timeout_s=cfg.runtime.timeout_s)
    _check_world_size(cfg, (env.rank, env.world_size))  # the launcher's real count (no collective needed)
    cfg = resolve_config(cfg, env.world_size)  # Video-Infinity: a null clip length derived from the ranks
    if env.world_size > 1:  # logs per rank: RUN.zarr.logs/rank<R>.log (rank 0 also on the terminal)
        redirect_rank_output(env, os.environ.get(LOG_DIR_VAR) or f"{cfg.store.path}.logs")
    monitor = start_failure_monitor(env, heartbeat_timeout_s=cfg.runtime.heartbeat_timeout_s)
    try:
        return run(cfg, env, progress=progress, stop=stop, faults=faults, monitor=monitor)
    finally:
        stop_failure_monitor(monitor)
        shutdown_rank_env(env)


def _check_world_size(cfg: RunConfig, rank_and_size: tuple[int, int] | None) -> None:
    """Refuse a rank count the run cannot use: rank 0 raises :class:`hpcvideo.layout.RanksError`
    (one line), every other rank exits 2 quietly (they all reach the same verdict from the same inputs)."""
    if rank_and_size is None:
        return
    rank, world_size = rank_and_size
    problem = ranks_problem(cfg, world_size, num_layers=model_num_layers(cfg))
    if problem:
        if rank == 0:
            raise RanksError([f"{world_size} rank(s): {problem}"])
        raise SystemExit(2)
