"""The main job on one rank: config -> models -> DualParal block queue -> streaming decode -> run store.

The run store is the single source of truth for progress (DESIGN.md §4). Rerunning the same command
resumes from the last checkpoint; a larger ``video.num_frames`` on an existing store extends it, and
the result equals having asked for the longer video from the start:

* block j's denoising depends on its neighbours, and the last blocks of a video see no successor, so
  the queue state of a B-block run equals a longer run's state only up to the start of tick B (when
  block B would enter). That state is saved as the ``"extend"`` checkpoint; extending restarts from
  it, re-denoises the blocks that were still in flight then, and overwrites them (their done markers
  are cleared first, so the store never shows stale data as done).
* every checkpoint is the executor state + the streaming decoder state, taken at a tick boundary,
  every ``store.checkpoint_every_ticks`` ticks or ``store.checkpoint_every_s`` seconds.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import IDENTITY_IGNORED, RunConfig
from .decode import StreamingDecoder, to_uint8
from .faults import fault
from .models import encode_prompts, ensure_tiny_wan, load_wan, read_model_info
from .noise import block_noise
from .schedulers import make_scheduler
from .store import ConfigMismatchError, RunStore, StoreError
from .strategies.dualparal.reference import DualParalReference
from .writer import BlockWriter

log = logging.getLogger("hpcvideo")

LOG_EVERY_S = 30.0  # progress log interval when no progress bar is shown (not a terminal)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: RunConfig) -> Path:
    """``model.path`` as a folder: "tiny" builds/caches the tiny random-weight model."""
    if cfg.model.path == "tiny":
        return Path(ensure_tiny_wan())
    return Path(cfg.model.path).expanduser().resolve()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device='cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


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
    if not RunStore.exists(path):
        store = RunStore.create(
            path, config=config, num_latent_frames=cfg.num_latent_frames,
            block_latent_frames=cfg.strategy.block_latent_frames, latent_channels=info["latent_channels"],
            latent_height=cfg.video.height // scale, latent_width=cfg.video.width // scale,
            height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps, model_id=model_id,
        )
        return store, True
    store = RunStore.open(path, mode="r+")
    store.check_config(config, ignore=IDENTITY_IGNORED)
    if cfg.num_latent_frames < store.num_latent_frames:
        raise StoreError(
            f"video.num_frames={cfg.video.num_frames} is shorter than the store's {store.num_frames} frames "
            f"({path}); a run cannot be shortened: pass --frames {store.num_frames} or more, or a new --output"
        )
    removed = store.sweep_orphans()
    if removed:
        log.info("swept %d orphaned partial files from %s", len(removed), path)
    if cfg.num_latent_frames > store.num_latent_frames:
        log.info("extending %s from %d to %d frames", path, store.num_frames, cfg.video.num_frames)
        store.resize(cfg.num_latent_frames)
    store.update_config(config)
    return store, False


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


def generate(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Run (or resume, or extend) the job of ``cfg`` to completion; returns the store's status dict.

    Errors: ConfigError (bad config, raised by load_config before this), ConfigMismatchError (the
    store was made with a different config; lists the keys), StoreError (shorter --frames, corrupt
    store), RuntimeError (device unavailable).
    """
    started = time.perf_counter()
    timings = Timings()
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    model_path = resolve_model_path(cfg)
    info = read_model_info(model_path)
    store, _ = open_or_create_store(cfg, info, info.get("model_id", model_path.name))

    t0 = time.perf_counter()
    dtype = DTYPES[cfg.model.dtype]
    components = load_wan(model_path, device=device, dtype=dtype)
    timings.load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sampling = cfg.sampling
    do_cfg = sampling.guidance_scale > 1.0
    prompt_embeds, negative_prompt_embeds = encode_prompts(
        components, [p.prompt for p in sampling.prompts],
        negative_prompt=sampling.negative_prompt if do_cfg else None,
        max_sequence_length=sampling.max_sequence_length, device=device, dtype=dtype,
    )
    components.text_encoder = None  # not needed past this point
    timings.encode_s = time.perf_counter() - t0

    strategy = cfg.strategy
    scale = info["vae_scale_factor_spatial"]
    latent_shape = dict(
        latent_channels=info["latent_channels"], latent_height=cfg.video.height // scale,
        latent_width=cfg.video.width // scale,
    )

    def noise_fn(block_index: int) -> torch.Tensor:
        return block_noise(
            seed=sampling.seed, block_index=block_index, block_latent_frames=strategy.block_latent_frames,
            context_latent_frames=strategy.context_latent_frames, mode=strategy.noise_init, **latent_shape,
        )

    template = make_scheduler(
        sampling.scheduler, scheduler_config=components.scheduler_config, flow_shift=sampling.flow_shift,
        num_inference_steps=sampling.num_inference_steps, device=device,
    )
    num_blocks = cfg.num_blocks
    executor = DualParalReference(
        transformer=components.transformer, scheduler_template=template, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=sampling.guidance_scale, num_blocks=num_blocks,
        block_latent_frames=strategy.block_latent_frames, context_latent_frames=strategy.context_latent_frames,
        feature_cache=strategy.feature_cache, noise_fn=noise_fn, device=device,
    )
    decoder = StreamingDecoder(components.vae, device=device)

    state = choose_checkpoint(store, num_blocks)
    if state is not None:
        executor.load_state_dict(state["executor"])
        executor.num_blocks = int(state["executor"]["num_blocks"])
        executor.set_num_blocks(num_blocks)
        decoder.load_state_dict(state["decoder"])
        # blocks not finished at this tick will be recomputed: their markers go first
        first_unfinished = max(0, executor.tick - executor.num_inference_steps + 1)
        stale = range(first_unfinished, store.num_blocks)
        store.clear_done("frames", stale)
        store.clear_done("latents", stale)
        log.info("resuming %s at tick %d of %d", store.path, executor.tick, executor.num_ticks)
    store.set_status("running")

    writer = BlockWriter(store)

    def checkpoint(kind: str) -> None:
        writer.flush()  # a checkpoint covers every block that left the queue before it
        t = time.perf_counter()
        blob = _dump({"executor": executor.state_dict(), "decoder": decoder.state_dict()})
        store.save_state(blob, tick=executor.tick, num_blocks=num_blocks, kind=kind)
        timings.checkpoint_s += time.perf_counter() - t

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=executor.num_ticks, initial=executor.tick, unit="tick", desc="denoise", dynamic_ncols=True)
    last_checkpoint_tick, last_checkpoint_time = executor.tick, time.monotonic()
    first_tick, loop_start, last_log = executor.tick, time.perf_counter(), time.monotonic()
    try:
        while True:
            if executor.tick == num_blocks:
                checkpoint("extend")
            if executor.done:
                break
            if executor.tick - last_checkpoint_tick >= cfg.store.checkpoint_every_ticks or (
                time.monotonic() - last_checkpoint_time >= cfg.store.checkpoint_every_s
            ):
                checkpoint("resume")
                last_checkpoint_tick, last_checkpoint_time = executor.tick, time.monotonic()
            fault("tick", executor.tick)
            t = time.perf_counter()
            finished = executor.run_tick()
            timings.denoise_s += time.perf_counter() - t
            timings.ticks += 1
            for block_index, latents in finished:
                writer.submit("latents", block_index, latents[0].permute(1, 0, 2, 3).float().cpu().numpy().copy())
                t = time.perf_counter()
                frames = to_uint8(decoder.decode_block(latents))
                timings.decode_s += time.perf_counter() - t
                writer.submit("frames", block_index, frames)
            if bar is not None:
                if finished:
                    bar.set_postfix(block=finished[-1][0], refresh=False)
                bar.update(1)
            elif time.monotonic() - last_log >= LOG_EVERY_S:  # batch jobs: a log line instead of a bar
                last_log = time.monotonic()
                done_ticks = executor.tick - first_tick
                eta_s = (time.perf_counter() - loop_start) / max(done_ticks, 1) * (executor.num_ticks - executor.tick)
                log.info("tick %d/%d, ETA %.0f s", executor.tick, executor.num_ticks, eta_s)
    finally:
        if bar is not None:
            bar.close()
        executor.close()
        writer.close()
    checkpoint("resume")
    timings.store_s, timings.store_background_s = writer.wait_s, writer.write_s
    store.update_attrs(timings=timings.as_attrs(time.perf_counter() - started))
    store.set_status("complete")
    return store.status_dict()
