"""Submit runs to SLURM with submitit: one job (or a job array, one store per prompt), requeued on
timeout or preemption, resuming from the run store.

Resources, from the ``cluster`` section (one MPI rank per GPU; submitit starts the ranks with srun)::

    cluster key       submitit parameter            sbatch
    nodes             nodes                         --nodes
    gpus_per_node     tasks_per_node (+ gpus_per_node when request_gpus)
                                                    --ntasks-per-node, --gpus-per-node
    cpus_per_task     cpus_per_task                 --cpus-per-task
    mem_gb            mem_gb                        --mem=<mem_gb>GB (per node)
    timeout_min       timeout_min                   --time
    partition/account/qos/constraint  slurm_<same>  --partition ...
    setup             slurm_setup                   shell lines before srun (module load ...), then
                                                    ``hpcvideo clean-shm`` on every node (runtime/shm.py)
    mpi               slurm_srun_args ["--mpi=X"]   srun --mpi=pmi2|pmix
    sbatch_options    slurm_additional_parameters   any other #SBATCH --key=value
    signal_delay_s    slurm_signal_delay_s          --signal=USR2@<s>
    max_timeouts      slurm_max_num_timeout         (submitit: requeues after a timeout)

Preemption and time limits (:mod:`hpcvideo.runtime.preempt`): :class:`GenerateJob` replaces
submitit's USR2 handler on every rank by one that only sets a flag; the tick loop asks all ranks
at each tick boundary whether any got the signal; then rank 0 writes a "resume" checkpoint, every
rank raises ``Preempted``, and rank 0 hands over to submitit's own handler, which calls
:meth:`GenerateJob.checkpoint` (the same job again: the store holds the state), requeues the job
(``scontrol requeue``) and exits. The requeued job resumes from the store, so a run spread over
several allocations ends bit-identical to an uninterrupted one.

Everything is checked on the login node before ``sbatch`` (:func:`check_job`, i.e.
:func:`hpcvideo.check.validate_for_model` on the job's ranks, also behind ``hpcvideo sbatch``): the
whole config, a preset's placeholder model path, the rank count ``nodes * gpus_per_node`` against the
strategy and the model, the model's JSON configs against the video shape, an existing store against
the config, the memory plan against ``cluster.gpu_mem_gb`` (:mod:`hpcvideo.plan`). Then SLURM's presence is checked, and only then is the
run store created; if the submission fails, what this call created is removed.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from ..check import PLACEHOLDER_PREFIX, validate_for_model  # noqa: F401 (PLACEHOLDER_PREFIX: kept public here)
from ..config import ConfigError, RunConfig, load_config

log = logging.getLogger(__name__)

WAIT_FOR_REQUEUE_S = 300.0  # ranks other than 0 wait this long for SLURM to end the job after a stop


def num_ranks(cfg: RunConfig) -> int:
    """Ranks of a job: nodes x gpus_per_node (one rank per GPU)."""
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def log_folder(cfg: RunConfig) -> Path:
    """submitit's folder (job pickles, stdout/stderr per task): ``cluster.log_folder`` or ``<store>.slurm``."""
    return Path(cfg.cluster.log_folder or f"{cfg.store.path}.slurm").absolute()


def executor_parameters(cfg: RunConfig) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords for ``cfg.cluster`` (table in the module doc)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "name": "hpcvideo",
        "nodes": c.nodes,
        "tasks_per_node": c.gpus_per_node,
        "cpus_per_task": c.cpus_per_task,
        "mem_gb": c.mem_gb,
        "timeout_min": c.timeout_min,
        "slurm_srun_args": [f"--mpi={c.mpi}", "--kill-on-bad-exit=1"],
        "slurm_signal_delay_s": c.signal_delay_s,
    }
    if c.request_gpus:
        params["gpus_per_node"] = c.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key) is not None:
            params[f"slurm_{key}"] = getattr(c, key)
    # then, before the MPI step: this job's stale MPICH segments from an earlier allocation (runtime/shm.py)
    params["slurm_setup"] = [*c.setup, clean_shm_line(c.nodes, python=sys.executable)]
    if c.sbatch_options:
        params["slurm_additional_parameters"] = dict(c.sbatch_options)
    return params


def clean_shm_line(nodes: int | str, *, python: str | None = None) -> str:
    """The srun line that runs ``hpcvideo clean-shm`` once per node (a requeued job reuses its job
    id and step ids, and MPICH would open the segments the killed allocation left behind)."""
    command = f"{shlex.quote(python)} -m hpcvideo.cli clean-shm" if python else "hpcvideo clean-shm"
    return f"srun --ntasks={nodes} --ntasks-per-node=1 --mpi=none --kill-on-bad-exit=1 {command}"


class NotOnClusterError(RuntimeError):
    """No SLURM here (no sbatch/srun on PATH): ``hpcvideo submit`` must run on a login node."""


def slurm_missing() -> str | None:
    """None where SLURM's commands can be run from here, else one line saying what is missing."""
    missing = [exe for exe in ("sbatch", "srun") if shutil.which(exe) is None]
    if not missing:
        return None
    return (f"no SLURM here ({' and '.join(missing)} not found on PATH): run `hpcvideo submit` on the cluster's "
            "login node; `hpcvideo check CONFIG --ranks N` checks a config anywhere, `hpcvideo sbatch CONFIG` "
            "writes a job script, `hpcvideo generate CONFIG` runs locally")


def make_executor(cfg: RunConfig, *, folder: Path | None = None):
    """A submitit executor for SLURM with the resources of ``cfg.cluster`` (creates nothing).

    Raises :class:`NotOnClusterError` (one line) where SLURM's commands are not on PATH."""
    missing = slurm_missing()
    if missing:
        raise NotOnClusterError(missing)
    try:
        executor = submitit.AutoExecutor(
            folder=folder or log_folder(cfg), cluster="slurm", slurm_max_num_timeout=cfg.cluster.max_timeouts
        )
    except RuntimeError as error:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise NotOnClusterError(f"SLURM is not usable here ({error})") from None
    executor.update_parameters(**executor_parameters(cfg))
    return executor


class GenerateJob(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task (rank): ``generate`` on the stored config.

    Checkpointable (submitit requeues it after a timeout or preemption): the state lives in the run
    store, so the inherited ``checkpoint`` (resubmit this same callable) is all a requeue needs; see
    the module docstring for the stop path.
    Returns the store's status dict on rank 0, None on the other ranks.
    """

    def __init__(self, config: dict):
        self.config = config  # RunConfig.to_dict(): plain data, pickled by submitit

    def __call__(self) -> dict | None:
        from ..faults import FaultPlan
        from ..generate import generate
        from ..runtime.preempt import Preempted, StopRequest
        from .local import launcher_rank_and_size

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        cfg = RunConfig.from_dict(self.config)
        request = StopRequest(signals=(signal.SIGUSR2,)).install()  # this task's stop flag, handed down to the runner
        try:
            return generate(cfg, progress=False, stop=request, faults=FaultPlan.from_env())
        except Preempted as stop:
            rank = (launcher_rank_and_size() or (0, 1))[0]  # srun's task id, read where every launcher's is
            log.warning("rank %d: %s", rank, stop)
            # the requeue ends every task of the job: SIGTERM (which submitit's handler ignores), then SIGKILL
            # KillWait seconds later (SLURM's default: 30 s). The checkpoint is written: leave at the SIGTERM, so
            # the allocation is free at once.
            signal.signal(signal.SIGTERM, _leave_for_requeue)
            if rank == 0:  # submitit's handler: checkpoint() -> dump -> scontrol requeue -> sys.exit
                request.call_previous(signal.SIGUSR2)
            time.sleep(WAIT_FOR_REQUEUE_S)
            raise RuntimeError(f"rank {rank}: stopped for a requeue but SLURM did not end the job in {WAIT_FOR_REQUEUE_S} s")
        finally:
            request.uninstall()


def _leave_for_requeue(signum, frame) -> None:
    """SIGTERM handler of a rank that stopped for a requeue and waits for SLURM to end it: exit now (status 0)."""
    os._exit(0)


def check_job(cfg: RunConfig, world_size: int | None = None, *, what: str | None = None,
              check_memory: bool = True) -> RunConfig:
    """Every check of a job before it is queued: :func:`hpcvideo.check.validate_for_model` (paths, a preset's
    placeholder model path, the rank count against the strategy and the model, the model's JSON configs,
    an existing store, the memory plan), creating nothing and loading no weights.

    ``world_size``: the job's ranks (default: ``cluster.nodes x cluster.gpus_per_node``); ``what``:
    how the rank count is named in messages (default: the cluster keys). Returns ``cfg`` resolved for
    ``world_size`` (:func:`hpcvideo.layout.resolve_config`). Raises ConfigError listing every problem.
    """
    if world_size is None:
        world_size = num_ranks(cfg)
    if what is None:
        what = (f"cluster.nodes={cfg.cluster.nodes} x cluster.gpus_per_node={cfg.cluster.gpus_per_node} = "
                f"{world_size} rank(s): ")
    return validate_for_model(cfg, world_size, what=what, check_memory=check_memory)


def _new_root(path: Path) -> Path | None:
    """The topmost folder of ``path`` (absolute) that does not exist yet, or None if ``path`` exists."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def create_store(cfg: RunConfig) -> None:
    """Create the run store of a checked (:func:`check_job`) config, or grow an existing one for an
    extension. Raises ConfigError / StoreError."""
    from ..runner import create_store as create

    create(cfg)


def array_configs(cfg: RunConfig, prompts: list[str]) -> list[RunConfig]:
    """One config per prompt for a job array: ``runs/x.zarr`` -> ``runs/x-000.zarr``, ``runs/x-001.zarr``, ..."""
    base = str(cfg.store.path)
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    out = []
    for i, prompt in enumerate(prompts):
        d = cfg.to_dict()
        d["sampling"]["prompts"] = [{"from_frame": 0, "prompt": prompt}]
        d["store"]["path"] = f"{stem}-{i:03d}.zarr"
        if cfg.cluster.log_folder is None:
            d["cluster"]["log_folder"] = f"{base}.slurm"
        out.append(RunConfig.from_dict(d))
    return out


@dataclass(kw_only=True)
class Submitted:
    """What ``hpcvideo submit`` prints: one entry per job (array task)."""

    job: Any  # submitit Job
    store_path: str
    log_folder: Path

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def submit(cfg: RunConfig, *, prompts: list[str] | None = None, check_memory: bool = True) -> list[Submitted]:
    """Check every run (:func:`check_job`), make sure SLURM is here, create the store(s), then submit
    one job, or a job array with one store per prompt.

    Nothing is created or submitted when a check fails (ConfigError / StoreError) or SLURM is not
    here (:class:`NotOnClusterError`); when the submission itself fails, the stores and the log
    folder this call created are removed again (never anything that existed before) and the error
    is raised."""
    if prompts is not None and not prompts:
        raise ConfigError(["--prompts file holds no prompt; allowed: one prompt per non-empty line"])
    configs = array_configs(cfg, prompts) if prompts else [cfg]
    configs = [check_job(c, check_memory=check_memory) for c in configs]
    folder = log_folder(configs[0])
    executor = make_executor(cfg, folder=folder)  # NotOnClusterError off a cluster, before anything is created
    # what this call may create (the topmost folder of each path that does not exist yet), known before it does
    created = {root for root in (_new_root(folder), *(_new_root(Path(c.store.path)) for c in configs)) if root}
    try:
        for c in configs:
            if not Path(c.store.path).exists():  # an existing store was checked; the job itself grows it if needed
                create_store(c)
        if len(configs) == 1:
            jobs = [executor.submit(GenerateJob(configs[0].to_dict()))]
        else:
            with executor.batch():
                jobs = [executor.submit(GenerateJob(c.to_dict())) for c in configs]
    except BaseException:
        for path in sorted(created):  # only what this call created: a store that existed keeps everything
            shutil.rmtree(path, ignore_errors=True)
        raise
    return [Submitted(job=job, store_path=str(c.store.path), log_folder=log_folder(c)) for job, c in zip(jobs, configs)]


def load_submit_config(source: str, overrides: list[str], **shortcuts: Any) -> RunConfig:
    """``load_config`` without the path checks: :func:`check_job` makes them (the login node must see
    model and store folders), naming a preset's placeholder model path as such."""
    return load_config(source, overrides, check_paths=False, **shortcuts)
