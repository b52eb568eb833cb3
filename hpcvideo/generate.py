"""The main job on one rank: config -> models -> DualParal block queue -> streaming decode -> run store.

The run store is the single source of truth for progress (docs/DESIGN.md, section 3). Rerunning the same command
resumes from the last checkpoint; a larger ``video.num_frames`` on an existing store extends it, and
the result equals having asked for the longer video from the start. Any num_frames >= 1: the queue
generates whole blocks (:mod:`hpcvideo.layout`), the store keeps exactly num_frames frames:

* block j's denoising depends on its neighbours, and the last blocks of a video see no successor, so
  the queue state of a B-block run equals a longer run's state only up to the start of tick B (when
  block B would enter). That state is saved as the ``"extend"`` checkpoint; extending restarts from
  it, re-denoises the blocks that were still in flight then, and overwrites them (their done markers
  are cleared first, so the store never shows stale data as done).
* the last block's decoded frames do not depend on num_frames (same latents, same decoder carry);
  those past num_frames are kept whole in the store (``state/frames_tail``), so a larger num_frames on
  the same number of blocks (or a last block that left the queue before the extension tick) is
  completed by copying them, bit-identical to an uninterrupted run of the larger num_frames.
* every checkpoint is the executor state + the streaming decoder state, taken at a tick boundary,
  every ``store.checkpoint_every_ticks`` ticks or ``store.checkpoint_every_s`` seconds.
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
from .decode import StreamingDecoder
from .faults import fault
from .models import encode_prompts, ensure_tiny_wan, load_wan, load_wan_transformer_stage, read_model_info
from .noise import block_noise
from .progress import Heartbeat, new_attempt
from .schedulers import make_scheduler
from .store import ConfigMismatchError, RunStore, StoreError
from .launch.local import LOG_DIR_VAR, launcher_rank_and_size, redirect_rank_output
from .layout import RanksError, generated_latent_frames, model_num_layers, ranks_problem, resolve_config
from .runtime.control import bcast_object, gather_object
from .runtime.preempt import Preempted, should_stop
from .runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor
from .strategies.dualparal.pipeline import DualParalPipeline, split_layers
from .writer import BlockSink

log = logging.getLogger("hpcvideo")

LOG_EVERY_S = 30.0  # progress log interval when no progress bar is shown (not a terminal)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: RunConfig) -> Path:
    """``model.path`` as a folder: "tiny" builds/caches the tiny random-weight model; "demo" is the
    trained demo model shipped in the package (:mod:`hpcvideo.demo`)."""
    if cfg.model.path == "tiny":
        return Path(ensure_tiny_wan())
    if cfg.model.path == "demo":
        from .config import DEMO_WEIGHTS_DIR

        return DEMO_WEIGHTS_DIR
    return Path(cfg.model.path).expanduser().resolve()


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


def _load(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def open_or_create_store(cfg: RunConfig, info: dict, model_id: str) -> tuple[RunStore, bool]:
    """The run store of ``cfg``: created if missing; otherwise checked (config identity) and grown
    for an extension. Returns (store, created). Raises ConfigMismatchError / StoreError before any
    model weights are loaded."""
    path = Path(cfg.store.path)
    config = cfg.to_dict()
    scale = info["vae_scale_factor_spatial"]
    generated = generated_latent_frames(cfg)  # whole blocks; the store keeps exactly video.num_frames frames
    if not RunStore.exists(path):
        store = RunStore.create(
            path, config=config, num_latent_frames=generated, num_frames=cfg.video.num_frames,
            block_latent_frames=cfg.strategy.block_latent_frames, latent_channels=info["latent_channels"],
            latent_height=cfg.video.height // scale, latent_width=cfg.video.width // scale,
            height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps, model_id=model_id,
        )
        return store, True
    store = RunStore.open(path, mode="r+")
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


def _complete_cut_block(store: RunStore, first_stale: int) -> None:
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


def choose_checkpoint(store: RunStore, num_blocks: int):
    """The newest checkpoint whose state is a state of the ``num_blocks`` run (see module doc).

    Returns the decoded state dict or None (start from tick 0)."""
    resume = store.load_state("resume")
    if resume is not None:
        blob, meta = resume
        if meta["num_blocks"] == num_blocks or meta["tick"] <= meta["num_blocks"]:
            return _load(blob)
    extend = store.load_state("extend")
    if extend is not None:
        blob, meta = extend
        if meta["num_blocks"] <= num_blocks and meta["tick"] <= meta["num_blocks"]:
            return _load(blob)
    if resume is not None:
        raise StoreError(
            f"{store.path}: the last checkpoint (tick {resume[1]['tick']}, {resume[1]['num_blocks']} blocks) cannot be "
            f"extended to {num_blocks} blocks and no extension snapshot was found"
        )
    return None


def generate(cfg: RunConfig, *, progress: bool = True) -> dict | None:
    """Run (or resume, or extend) the job of ``cfg`` to completion on every rank of the MPI job
    (one rank: a plain process). Returns the store's status dict on rank 0, None elsewhere.

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
    monitor = start_failure_monitor(env)
    try:
        if cfg.strategy.name == "videoinfinity":  # clip parallelism: its own prepare/run (abort_on_failure inside)
            from .strategies.videoinfinity.run import run_videoinfinity

            return run_videoinfinity(cfg, env, progress=progress)
        setup = _prepare(cfg, env)
        with abort_on_failure(env):
            return _run(cfg, env, setup, progress=progress)
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


def check_model_fit(cfg: RunConfig, info: dict) -> list[str]:
    """Checks that need the model's config (read from JSON, no weights): resolution against the VAE
    and patch strides, and the attention window against the rotary table."""
    problems = []
    stride = info["vae_scale_factor_spatial"] * max(info["patch_size"][1], info["patch_size"][2])
    for key, value in (("video.height", cfg.video.height), ("video.width", cfg.video.width)):
        if value % stride:
            problems.append(f"{key}={value} is not a multiple of {stride} (VAE stride x patch size of {info['model_id']})")
    n, c = cfg.strategy.block_latent_frames, cfg.strategy.context_latent_frames
    longest = max(n + 2 * c, cfg.video.height // stride, cfg.video.width // stride)
    if longest > info["rope_max_seq_len"]:
        problems.append(
            f"strategy.block_latent_frames={n} + 2 x strategy.context_latent_frames={c} (or the latent height/width) "
            f"reach {longest} positions, beyond the model's rotary table of {info['rope_max_seq_len']}"
        )
    return problems


@dataclass
class _Setup:
    model_path: Path
    info: dict
    layers: list[range]
    store: RunStore | None  # rank 0 only


def _prepare(cfg: RunConfig, env) -> _Setup:
    """Rank 0 resolves the model, checks the stage split and opens/creates the store; the outcome,
    or the user error, is broadcast so every rank either goes on or raises the same error."""
    outcome = store = None
    if env.is_main:
        try:
            model_path = resolve_model_path(cfg)
            info = read_model_info(model_path)
            problems = check_model_fit(cfg, info)
            try:
                layers = split_layers(info["num_layers"], env.world_size, cfg.runtime.stage_layers)
            except ValueError as error:
                problems.append(str(error))
            if problems:
                raise ConfigError(problems)
            store, _ = open_or_create_store(cfg, info, info.get("model_id", model_path.name))
            outcome = ("ok", (str(model_path), info, layers))
        except (ConfigError, StoreError, FileNotFoundError) as error:
            if env.world_size > 1:
                bcast_object(env, ("error", None))
            raise  # rank 0 reports it
    if env.world_size > 1:
        outcome = bcast_object(env, outcome)
    kind, payload = outcome
    if kind == "error":
        raise SystemExit(2)  # rank 0 prints the error once
    model_path, info, layers = payload
    return _Setup(model_path=Path(model_path), info=info, layers=layers, store=store)


def _run(cfg: RunConfig, env, setup: _Setup, *, progress: bool) -> dict | None:
    started = time.perf_counter()
    timings = Timings()
    device = env.device
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    dtype = DTYPES[cfg.model.dtype]
    sampling, strategy, info, store = cfg.sampling, cfg.strategy, setup.info, setup.store
    main = env.is_main

    # text encoding once (rank 0), embeddings broadcast; VAE on rank 0 only
    t0 = time.perf_counter()
    do_cfg = sampling.guidance_scale > 1.0
    components = load_wan(setup.model_path, device=device, dtype=dtype,
                          parts=("vae", "text_encoder", "tokenizer") if main else ())
    embeddings = None
    if main:
        embeddings = encode_prompts(
            components, [p.prompt for p in sampling.prompts],
            negative_prompt=sampling.negative_prompt if do_cfg else None,
            max_sequence_length=sampling.max_sequence_length, device="cpu", dtype=dtype,
        )
        components.text_encoder = components.tokenizer = None  # not needed past this point
    if env.world_size > 1:
        embeddings = bcast_object(env, embeddings)
    prompt_embeds = [e.to(device) for e in embeddings[0]]
    negative_prompt_embeds = None if embeddings[1] is None else embeddings[1].to(device)
    timings.encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = setup.layers[env.rank]
    transformer = load_wan_transformer_stage(setup.model_path, layers, device=device, dtype=dtype)
    timings.load_s = time.perf_counter() - t0

    scale = info["vae_scale_factor_spatial"]
    latent_shape = (info["latent_channels"], cfg.video.height // scale, cfg.video.width // scale)

    def noise_fn(block_index: int) -> torch.Tensor:
        return block_noise(
            seed=sampling.seed, block_index=block_index, block_latent_frames=strategy.block_latent_frames,
            context_latent_frames=strategy.context_latent_frames, mode=strategy.noise_init,
            latent_channels=latent_shape[0], latent_height=latent_shape[1], latent_width=latent_shape[2],
        )

    template = make_scheduler(
        sampling.scheduler, scheduler_config=components.scheduler_config, flow_shift=sampling.flow_shift,
        num_inference_steps=sampling.num_inference_steps, device=device,
    )
    num_blocks = cfg.num_blocks
    executor = DualParalPipeline(
        env=env, layers=layers, latent_shape=latent_shape,
        transformer=transformer, scheduler_template=template, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=sampling.guidance_scale, num_blocks=num_blocks,
        block_latent_frames=strategy.block_latent_frames, context_latent_frames=strategy.context_latent_frames,
        feature_cache=strategy.feature_cache, noise_fn=noise_fn,
    )

    sink = None
    resume_tick = 0
    if main:
        decoder = StreamingDecoder(components.vae, device=device)
        state = choose_checkpoint(store, num_blocks)
        if state is not None:
            executor.load_state_dict(state["executor"])
            executor.num_blocks = int(state["executor"]["num_blocks"])
            executor.set_num_blocks(num_blocks)
            decoder.load_state_dict(state["decoder"])
            # blocks not finished at this tick will be recomputed: their markers go first
            stale = range(max(0, executor.tick - executor.num_inference_steps + 1), store.num_blocks)
            store.clear_done("frames", stale)
            store.clear_done("latents", stale)
            _complete_cut_block(store, stale.start)
            log.info("resuming %s at tick %d of %d on %d rank(s)", store.path, executor.tick, executor.num_ticks,
                     env.world_size)
        store.set_status("running")
        store.update_attrs(num_ranks=env.world_size, stage_layers=[len(r) for r in setup.layers])
        sink = BlockSink(store, decoder)
        resume_tick = executor.tick
    if env.world_size > 1:  # the other stages hold no state: they only need to know where to start
        resume_tick = bcast_object(env, resume_tick)
        executor.tick = resume_tick

    def checkpoint(kind: str) -> None:
        for block_index, latents in executor.drain():  # the state at the tick boundary
            sink.submit(block_index, latents)
        sink.flush()  # a checkpoint covers every block that left the queue before it
        t = time.perf_counter()
        blob = _dump({"executor": executor.state_dict(), "decoder": sink.decoder.state_dict()})
        store.save_state(blob, tick=executor.tick, num_blocks=num_blocks, kind=kind)
        timings.checkpoint_s += time.perf_counter() - t
        heartbeat.beat(executor.tick, force=True)  # `hpcvideo status` never shows a tick behind the checkpoint

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
    try:
        while True:
            if main and executor.tick == num_blocks:
                checkpoint("extend")
            if executor.done:
                break
            if should_stop(env):  # SLURM's USR2 on any rank: every rank stops at this tick (runtime.preempt)
                if main:
                    checkpoint("resume")
                raise Preempted(executor.tick)
            if main and (executor.tick - last_checkpoint_tick >= cfg.store.checkpoint_every_ticks or (
                time.monotonic() - last_checkpoint_time >= cfg.store.checkpoint_every_s
            )):
                checkpoint("resume")
                last_checkpoint_tick, last_checkpoint_time = executor.tick, time.monotonic()
            fault("tick", executor.tick, rank=env.rank)
            t = time.perf_counter()
            finished = executor.run_tick()
            timings.denoise_s += time.perf_counter() - t
            timings.ticks += 1
            heartbeat.beat(executor.tick, tick_s=time.perf_counter() - t)
            for block_index, latents in finished:
                sink.submit(block_index, latents)
            if bar is not None:
                if finished:
                    bar.set_postfix(block=finished[-1][0], refresh=False)
                bar.update(1)
            elif main and time.monotonic() - last_log >= LOG_EVERY_S:  # batch jobs: a log line, not a bar
                last_log = time.monotonic()
                done_ticks = executor.tick - first_tick
                eta_s = (time.perf_counter() - loop_start) / max(done_ticks, 1) * (executor.num_ticks - executor.tick)
                log.info("tick %d/%d, ETA %.0f s", executor.tick, executor.num_ticks, eta_s)
    finally:
        if bar is not None:
            bar.close()
        executor.close()
        if sink is not None:
            sink.close()
        heartbeat.beat(executor.tick, force=True, state="finished" if executor.done else "stopped")
    rank_stats = gather_object(env, {
        "rank": env.rank, "layers": [layers.start, layers.stop], **executor.stats,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    if not main:
        return None
    store.update_attrs(rank_stats=rank_stats)
    checkpoint("resume")
    timings.store_s, timings.decode_s = sink.wait_s, sink.decode_s
    timings.store_background_s = sink.write_s
    store.update_attrs(timings=timings.as_attrs(time.perf_counter() - started))
    store.set_status("complete")
    return store.status_dict()
