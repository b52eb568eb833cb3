"""The run loop every strategy shares: config -> model family -> strategy executor -> sink -> run store.

:func:`run` drives any strategy (:mod:`hpcvideo.strategies`: an executor + a spec) on one rank of a
started job (:class:`hpcvideo.runtime.RankEnv`). It owns, once for all strategies:

* preparation on rank 0 (model folder and JSON facts, the spec's checks, the spec's plan, the store
  created/reopened/extended) and its broadcast: every rank goes on, or every rank raises the same user
  error before any weights load (rank 0 reports it, the others exit 2);
* prompt encoding on rank 0 (text encoder loaded there only), embeddings broadcast;
* resume: :func:`choose_checkpoint` on rank 0 (every done unit is read back against the checksum in its
  marker; the newest checkpoint that recomputes the first unit not done and intact is taken, or none:
  :mod:`hpcvideo.store.recovery`); the state goes to rank 0's executor, or (strategies
  whose every rank holds state, ``spec.every_rank_writes``) each rank gets its own; units that will be
  produced again lose their done markers first; a unit still not done at the end is an error naming it;
* checkpoints at tick boundaries: the ``"extend"`` snapshot at the executor's ``extend_tick``, and every
  ``store.checkpoint_every_ticks`` ticks or ``store.checkpoint_every_s`` seconds (rank 0 decides; the
  decision is broadcast when every rank's state is gathered); a final one after the last tick, before
  the sink's end-of-run writes;
* preemption and clean stops: at every tick boundary all ranks agree (:func:`hpcvideo.runtime.preempt.should_stop`
  on the stop request the caller passed: USR2, SIGINT, SIGTERM, :mod:`hpcvideo.runtime.signals`), checkpoint and
  raise :class:`~hpcvideo.runtime.preempt.Preempted` naming the signal;
* the store's one-writer lock, held by rank 0 for the job (:mod:`hpcvideo.store.lock`);
* heartbeats (:class:`hpcvideo.progress.Heartbeat`), the progress bar or log lines, :class:`Timings`
  and the per-rank ``rank_stats``.

The run store is the single source of truth for progress. Rerunning the same command resumes from the
last checkpoint; for an extendable strategy (DualParal) a larger ``video.num_frames`` extends the store
and the result equals having asked for the longer video from the start:

* block j's denoising depends on its neighbours, and the last blocks of a video see no successor, so
  the queue state of a B-block run equals a longer run's state only up to the start of tick B (when
  block B would enter). That state is saved as the ``"extend"`` checkpoint; extending restarts from
  it, re-denoises the blocks that were still in flight then, and overwrites them (their done markers
  are cleared first, so the store never shows stale data as done).
* the last block's decoded frames do not depend on num_frames (same latents, same decoder carry);
  those past num_frames are kept whole in the store (``state/frames_tail``), so a larger num_frames on
  the same number of blocks (or a last block that left the queue before the extension tick) is
  completed by copying them, bit-identical to an uninterrupted run of the larger num_frames.
* every checkpoint is ``{"executor": state (rank 0's, or the list of every rank's), "sink": the sink's
  state (the streaming decoder's carry) or None}``, taken at a tick boundary after the sink flushed.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import IDENTITY_IGNORED, ConfigError, RunConfig
from .faults import FaultPlan
from .layout import generated_latent_frames
from .models.family import DTYPES, family_of
from .models.weights import weight_file_problems
from .progress import Heartbeat, new_attempt
from .runtime import abort_on_failure
from .runtime.control import bcast_object, gather_object, scatter_object
from .runtime.preempt import Preempted, StopRequest, settle, should_stop
from .store import RunStore, StoreError
from .store.lock import StoreLock
from .store.recovery import plan_resume
from .strategies import spec_for
from .strategies.base import BuildContext

log = logging.getLogger("hpcvideo")

LOG_EVERY_S = 30.0  # progress log interval when no progress bar is shown (not a terminal)


@dataclass
class Timings:
    """Wall seconds by phase (written to the store's attrs)."""

    load_s: float = 0.0
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    store_s: float = 0.0
    store_background_s: float = 0.0
    checkpoint_s: float = 0.0
    ticks: int = 0

    def as_attrs(self, total_s: float) -> dict:
        return {
            "load_s": round(self.load_s, 4), "encode_s": round(self.encode_s, 4),
            "denoise_s": round(self.denoise_s, 4), "decode_s": round(self.decode_s, 4),
            "store_s": round(self.store_s, 4),
            "store_background_s": round(self.store_background_s, 4), "checkpoint_s": round(self.checkpoint_s, 4),
            "ticks": self.ticks, "total_s": round(total_s, 4),
            "seconds_per_tick": round(self.denoise_s / max(self.ticks, 1), 6),
        }


def _dump(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load_checkpoint(blob: bytes) -> dict:
    """A checkpoint blob as ``{"executor", "sink"}``; also reads the layouts of earlier versions."""
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if "decoder" in payload:  # DualParal, before the runner: {"executor", "decoder"}
        return {"executor": payload["executor"], "sink": payload["decoder"]}
    if "clips" in payload:  # Video-Infinity, before the runner: {"step", "clips": [{"latents", "scheduler"}]}
        return {"executor": [{"step": payload["step"], **clip} for clip in payload["clips"]], "sink": None}
    return payload


def open_or_create_store(cfg: RunConfig, info: dict, spec=None) -> tuple[RunStore, bool]:
    """The run store of ``cfg`` (resolved: :func:`hpcvideo.layout.resolve_config`): created if missing;
    otherwise checked (config identity) and, for an extendable strategy, grown to a larger
    ``video.num_frames``. ``info``: the model's JSON facts (:meth:`hpcvideo.models.family.ModelFamily.info`).
    Returns (store, created). Raises ConfigMismatchError / StoreError / ConfigError before any model
    weights are loaded."""
    spec = spec or spec_for(cfg)
    path = Path(cfg.store.path)
    config = cfg.to_dict()
    scale = info["vae_scale_factor_spatial"]
    unit = spec.unit_latent_frames(cfg)
    generated = generated_latent_frames(cfg)  # whole units; the store keeps exactly video.num_frames frames
    if not RunStore.exists(path):
        store = RunStore.create(
            path, config=config, num_latent_frames=generated, num_frames=cfg.video.num_frames,
            block_latent_frames=unit, latent_channels=info["latent_channels"],
            latent_height=cfg.video.height // scale, latent_width=cfg.video.width // scale,
            height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps, model_id=info["model_id"],
            vae_temporal_stride=info["vae_temporal_stride"],
        )
        return store, True
    store = RunStore.open(path, mode="r+")
    if not spec.extendable and store.num_frames != cfg.video.num_frames:  # before the config check: a derived
        raise StoreError(                                                  # unit length follows num_frames
            f"video.num_frames={cfg.video.num_frames} differs from the store's {store.num_frames} frames ({path}); "
            f"a {spec.title} run cannot be extended or shortened: use the same length, or a new --output")
    store.check_config(config, ignore=IDENTITY_IGNORED)
    if cfg.video.num_frames < store.num_frames:
        raise StoreError(
            f"video.num_frames={cfg.video.num_frames} is shorter than the store's {store.num_frames} frames "
            f"({path}); a run cannot be shortened: pass --frames {store.num_frames} or more, or a new --output"
        )
    removed = store.sweep_orphans()
    if removed:
        log.info("swept %d orphaned partial files from %s", len(removed), path)
    if cfg.video.num_frames > store.num_frames or generated > store.num_latent_frames:
        log.info("extending %s from %d to %d frames", path, store.num_frames, cfg.video.num_frames)
        store.resize(generated, cfg.video.num_frames)
    store.update_config(config)
    return store, False


def model_problems(cfg: RunConfig, world_size: int) -> tuple[list[str], dict]:
    """(problems, info): what stops the resolved ``cfg`` from running on ``world_size`` ranks with its model
    (the strategy's checks against the model's JSON configs, no weights), and the model's facts.
    Raises FileNotFoundError / ValueError for a model folder of the wrong kind."""
    family = family_of(cfg)
    info = family.info(family.path(cfg))
    return spec_for(cfg).problems(cfg, family, info, world_size), info


def create_store(cfg: RunConfig) -> RunStore:
    """Create the run store of a checked, resolved config, or reopen (and grow) an existing one: what
    the first rank of a job does before any weights load (job submission calls it up front)."""
    family = family_of(cfg)
    with StoreLock.acquire(cfg.store.path):  # not while a run writes it
        store, _ = open_or_create_store(cfg, family.info(family.path(cfg)))
    return store


def complete_cut_block(store: RunStore, first_stale: int) -> None:
    """Write the frames a longer video.num_frames adds to a block that will not be recomputed.

    Blocks before ``first_stale`` left the queue before the checkpoint and have their frames written,
    except a last block that was cut at a shorter num_frames (its marker cleared by the store's
    resize): its decoded frames are the same for any num_frames (the same latents and decoder
    carry), kept whole as the store's frames tail, so they are copied from there."""
    done = store.done("frames")
    for j in range(min(first_stale, store.num_blocks)):
        if done[j]:
            continue
        if not store.fill_frames_from_tail(j):
            raise StoreError(f"{store.path}: the frames of block {j} are incomplete and its decoded frames were not "
                             "kept; generate into a new --output")
        log.info("completed the frames of block %d from the kept decode", j)


def choose_checkpoint(store: RunStore, num_units: int, *, verify: bool = True) -> dict | None:
    """The newest checkpoint whose state is a state of the ``num_units`` run (see the module doc) and that
    recomputes every block not done and intact (``verify``: every done block is read back against its
    checksum first; :func:`hpcvideo.store.recovery.plan_resume`). Says in the log which blocks do not
    verify and where the run restarts. Returns the checkpoint ``{"executor", "sink"}`` or None (start from
    tick 0)."""
    plan = plan_resume(store, num_units, verify=verify, repair=True)  # also repairs pointers, drops undecodable chunks
    for line in plan.repairs:
        log.warning("run store %s: %s", store.path, line)
    message = plan.describe(store)
    if message:
        log.warning("%s", message)
    if plan.blob is not None and plan.kind == "extend" and not message:
        log.info("%s: resuming from the extension snapshot (tick %d)", store.path, plan.meta["tick"])
    if plan.unverified:
        log.info("run store %s was made before done markers kept checksums: its done blocks are trusted unverified",
                 store.path)
    return None if plan.blob is None else _load_checkpoint(plan.blob)


@dataclass
class _Setup:
    model_path: Path
    info: dict
    plan: object
    store: RunStore | None  # rank 0, and every rank when every rank writes
    lock: StoreLock | None = None  # rank 0: the store's one-writer lock, held for the job


def run(cfg: RunConfig, env, *, progress: bool = True, spec=None, family=None, stop: StopRequest | None = None,
        faults: FaultPlan | None = None, monitor=None) -> dict | None:
    """Run (or resume, or extend) the job of the resolved ``cfg`` on this rank of a started job. Returns
    the store's status dict on rank 0, None elsewhere. User errors (ConfigError, StoreError incl.
    ConfigMismatchError, FileNotFoundError, ValueError) are raised on rank 0 before any weights load,
    the other ranks exit 2; a failure after that aborts every rank (:func:`hpcvideo.runtime.abort_on_failure`).
    ``spec`` / ``family``: the strategy spec and model family (default: those ``cfg`` names; tests pass fakes).
    ``stop``: the installed stop request (:class:`hpcvideo.runtime.preempt.StopRequest`) of the caller, the same
    on every rank or None on every rank (None: the run is never preempted, no collective per tick). ``faults``:
    the tests' planned fault (:class:`hpcvideo.faults.FaultPlan`; None: read from ``HPCVIDEO_FAULT`` here, once).
    ``monitor``: this rank's running :class:`hpcvideo.runtime.FailureMonitor` (lets a lost connection be named)."""
    spec, family = spec or spec_for(cfg), family or family_of(cfg)
    faults = FaultPlan.from_env() if faults is None else faults
    setup = _prepare(cfg, env, spec, family)
    try:
        with abort_on_failure(env, monitor=monitor):
            return _run(cfg, env, spec, family, setup, progress=progress, stop=stop, faults=faults)
    finally:
        if setup.lock is not None:
            setup.lock.release()  # rank 0 held the store's lock for the job (hpcvideo.store.lock)


def _prepare(cfg: RunConfig, env, spec, family) -> _Setup:
    """Rank 0 resolves the model, runs the spec's checks and plan and opens/creates the store; the outcome,
    or the user error, is broadcast so every rank either goes on or raises the same error."""
    outcome = store = lock = None
    if env.is_main:
        try:
            model_path = family.path(cfg)
            info = family.info(model_path)
            problems = spec.problems(cfg, family, info, env.world_size)
            problems += [f"model.path={str(model_path)!r}: {problem}" for problem in weight_file_problems(model_path)]
            if problems:
                raise ConfigError(problems)
            plan = spec.plan(cfg, info, env.world_size)
            lock = StoreLock.acquire(cfg.store.path)  # one writer: a live holder is refused here, by name
            store, _ = open_or_create_store(cfg, info, spec)
            outcome = ("ok", (str(model_path), info, plan))
        except (ConfigError, StoreError, FileNotFoundError, ValueError):
            if lock is not None:
                lock.release()
            if env.world_size > 1:
                bcast_object(env, ("error", None))
            raise  # rank 0 reports it
    if env.world_size > 1:
        outcome = bcast_object(env, outcome)
    kind, payload = outcome
    if kind == "error":
        raise SystemExit(2)  # rank 0 prints the error once
    model_path, info, plan = payload
    if store is None and spec.every_rank_writes:
        store = RunStore.open(cfg.store.path, mode="r+")
    return _Setup(model_path=Path(model_path), info=info, plan=plan, store=store, lock=lock)


def _free_memory(device) -> None:
    """Return what the dropped text encoder held: cyclic garbage, and the CUDA allocator's cached blocks."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _encode_prompts(cfg: RunConfig, env, family, model_path: Path, dtype):
    """Rank 0 loads the text encoder (on ``model.text_encoder_device``: its device or the CPU) and encodes
    the prompt schedule, then frees it; every rank gets the embeddings on its device:
    ([(1, L, D) per prompt], (1, L, D) or None)."""
    embeddings = None
    if env.is_main:
        device = "cpu" if cfg.model.text_encoder_device == "cpu" else env.device
        components = family.load(model_path, device=device, dtype=dtype, text=True)
        embeddings = family.encode_prompts(components, cfg, dtype=dtype)
        del components  # not needed past this point: freed before any weights of the run load
        _free_memory(device)
    elif hasattr(family, "warm_up"):
        family.warm_up()  # the other ranks import the model's code while rank 0 encodes (not in the critical path)
    if env.world_size > 1:
        embeddings = bcast_object(env, embeddings)
    prompt_embeds = [e.to(env.device) for e in embeddings[0]]
    negative = None if embeddings[1] is None else embeddings[1].to(env.device)
    return prompt_embeds, negative


def _run(cfg: RunConfig, env, spec, family, setup: _Setup, *, progress: bool, stop: StopRequest | None,
         faults: FaultPlan) -> dict | None:
    started = time.perf_counter()
    timings = Timings()
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    elif getattr(env, "local_world_size", 1) > 1 and torch.device(env.device).type == "cpu" and (
            "OMP_NUM_THREADS" not in os.environ):  # ranks on a node share its cores (unless the user said)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env.local_world_size))
    dtype = DTYPES[cfg.model.dtype]
    main, store = env.is_main, setup.store
    every_rank = spec.every_rank_writes
    saves = main or every_rank  # the ranks that take part in a checkpoint

    t0 = time.perf_counter()
    prompt_embeds, negative = _encode_prompts(cfg, env, family, setup.model_path, dtype)
    timings.encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ctx = BuildContext(cfg=cfg, env=env, family=family, model_path=setup.model_path, info=setup.info, dtype=dtype,
                       prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, store=store, plan=setup.plan,
                       faults=faults)
    executor, sink = spec.build(ctx)
    timings.load_s = time.perf_counter() - t0

    # resume: rank 0 picks the checkpoint; the state goes where the strategy keeps it
    saved = choose_checkpoint(store, executor.num_units) if main else None
    if every_rank:
        states = None if saved is None else saved["executor"]
        if env.world_size > 1 and bcast_object(env, states is not None):
            states = scatter_object(env, states)
        elif states is not None:
            states = states[0]
        if states is not None:
            executor.load_state_dict(states)
    else:
        if saved is not None:
            executor.load_state_dict(saved["executor"])
        if env.world_size > 1:  # the other ranks hold no state: they only need to know where to start
            executor.tick = bcast_object(env, executor.tick)
    if main:
        if saved is not None:
            if sink is not None and saved.get("sink") is not None:
                sink.load_state_dict(saved["sink"])
            # units not finished at this tick will be produced again: their markers go first
            stale = range(executor.stale_from, store.num_blocks)
            store.clear_done("frames", stale)
            store.clear_done("latents", stale)
            complete_cut_block(store, stale.start)
            log.info("resuming %s at tick %d of %d on %d rank(s)", store.path, executor.tick, executor.num_ticks,
                     env.world_size)
        else:
            store.clear_all_done()  # from scratch: every unit is produced again (after damage, or no checkpoint)
        store.set_status("running")
        store.update_attrs(num_ranks=env.world_size, **ctx.run_attrs)

    def checkpoint(kind: str) -> None:
        """Collective among the ranks that save (rank 0, or every rank when every rank holds state)."""
        for unit, latents in executor.drain():  # the state at the tick boundary
            sink.submit(unit, latents)
        if sink is not None:
            sink.flush()  # a checkpoint covers every unit that was finished before it
        t = time.perf_counter()
        state = executor.state_dict()
        if every_rank:
            state = gather_object(env, state)
        if main:
            blob = _dump({"executor": state, "sink": None if sink is None else sink.state_dict()})
            store.save_state(blob, tick=executor.tick, num_blocks=executor.num_units, kind=kind,
                             stale_from=executor.stale_from, frames_from_latents=getattr(sink, "frames_from_latents", None))
        timings.checkpoint_s += time.perf_counter() - t
        if main:
            heartbeat.beat(executor.tick, force=True)  # `hpcvideo status` never shows a tick behind the checkpoint

    def checkpoint_due() -> bool:
        due = main and (executor.tick - last_checkpoint_tick >= cfg.store.checkpoint_every_ticks or (
            time.monotonic() - last_checkpoint_time >= cfg.store.checkpoint_every_s))
        if every_rank and env.world_size > 1:
            due = bcast_object(env, due)  # rank 0's clock decides for everyone
        return due

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=executor.num_ticks, initial=executor.tick, unit="tick", desc="denoise", dynamic_ncols=True)
    last_checkpoint_tick, last_checkpoint_time = executor.tick, time.monotonic()
    first_tick, loop_start, last_log = executor.tick, time.perf_counter(), time.monotonic()
    heartbeat = Heartbeat(cfg.store.path, rank=env.rank, num_ticks=executor.num_ticks,
                          interval_s=cfg.store.heartbeat_every_s, store=store if main else None,
                          world_size=env.world_size, attempt=new_attempt(env))  # new_attempt: collective
    heartbeat.beat(executor.tick)  # per-rank record for `hpcvideo status`, throttled (hpcvideo.progress)
    finished_loop = False
    try:
        while True:
            if saves and executor.tick == executor.extend_tick:
                checkpoint("extend")
            if executor.done:
                break
            if should_stop(env, stop):  # SLURM's USR2 on any rank: every rank stops at this tick (runtime.preempt)
                if saves:
                    checkpoint("resume")
                raise Preempted(executor.tick, (getattr(stop, "agreed", None) or "USR2").removeprefix("SIG"))
            if checkpoint_due():
                checkpoint("resume")
                last_checkpoint_tick, last_checkpoint_time = executor.tick, time.monotonic()
            faults.fire("tick", executor.tick, rank=env.rank)
            t = time.perf_counter()
            finished = executor.run_tick()
            timings.denoise_s += time.perf_counter() - t
            timings.ticks += 1
            heartbeat.beat(executor.tick, tick_s=time.perf_counter() - t)
            for unit, latents in finished:
                sink.submit(unit, latents)
            if hasattr(sink, "poll"):
                sink.poll()  # a sink that decodes on every rank takes its blocks between ticks
            if bar is not None:
                if finished:
                    bar.set_postfix(unit=finished[-1][0], refresh=False)
                bar.update(1)
            elif main and time.monotonic() - last_log >= LOG_EVERY_S:  # batch jobs: a log line, not a bar
                last_log = time.monotonic()
                done_ticks = executor.tick - first_tick
                eta_s = (time.perf_counter() - loop_start) / max(done_ticks, 1) * (executor.num_ticks - executor.tick)
                log.info("tick %d/%d, ETA %.0f s", executor.tick, executor.num_ticks, eta_s)
        finished_loop = True
        settle(stop)  # the last boundary's stop agreement, still posted (lag 1), completes on every rank
    finally:
        if bar is not None:
            bar.close()
        executor.close()
        if not finished_loop and sink is not None:
            sink.close()  # what was already submitted is written; nothing waits for the end of the run
        heartbeat.beat(executor.tick, force=True, state="running" if finished_loop else "stopped")

    if saves:
        checkpoint("resume")  # the last one: before the end-of-run writes, so a kill there redoes only them
    if sink is not None:
        try:
            sink.finish()
        finally:
            sink.close()
    heartbeat.beat(executor.tick, force=True, state="finished")
    rank_stats = gather_object(env, {
        "rank": env.rank, **executor.stats, **getattr(sink, "stats", {}),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_s": round(time.process_time(), 2),  # this rank's process CPU seconds (user + system), all threads
    })
    if not main:
        return None
    store.update_attrs(rank_stats=rank_stats)
    timings.store_s, timings.decode_s = sink.wait_s, sink.decode_s
    timings.store_background_s = sink.write_s
    store.update_attrs(timings=timings.as_attrs(time.perf_counter() - started))
    store.require_complete()  # a block that is still not done is an error naming it, never a silent exit 0
    store.set_status("complete")
    return store.status_dict()
