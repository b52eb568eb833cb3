"""The Video-Infinity job on one rank: clip r on rank r, all clips denoised in lock-step.

Rank layout (``strategy.clip_latent_frames`` = F, T = num_latent_frames, world_size = ceil(T / F); a null
F is derived from the rank count as ceil(T / world_size), see :mod:`hpcvideo.layout`; the clips cover
world_size * F >= T latent frames, the store keeps the latents of every clip and exactly
``video.num_frames`` pixel frames)::

    rank 0   clip 0: latent frames [0, F)    encodes the prompts (broadcast), creates the store,
                                             saves the checkpoints (every rank's state, gathered)
    rank r   clip r: latent frames [rF, (r+1)F)   writes its clip's latents chunk and done marker;
                                             unet3d: decodes its own clip (per-frame VAE) and writes
                                             its frames chunk; wan: rank 0 decodes all clips in order
                                             (causal VAE, streaming decoder)

Per step (the loop of ``TextToVideoSDPipeline`` / ``WanPipeline``; model -> guidance ->
scheduler.step): every rank runs the patched model on its clip with the same timestep (the patched
layers exchange halos, the global set and GroupNorm statistics); the scheduler of each rank steps
its own clip. Every ``store.checkpoint_every_ticks`` steps (a "tick" is one denoising step of all
clips here) or ``store.checkpoint_every_s`` seconds (rank 0 decides and broadcasts, so all ranks
agree), each rank's latents and scheduler state are gathered to rank 0 and saved; a rerun resumes
from there bit-identically. The last checkpoint is taken after the last step and before any write,
so a run killed while writing redoes only the writes.

Noise: :func:`hpcvideo.noise.frame_noise` (a generator per latent frame), so the initial video is
the same for any split. Prompts: clip r takes the prompt of its first frame (prompt schedule).
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import torch

from ...config import IDENTITY_IGNORED, ConfigError, RunConfig
from ...faults import fault
from ...noise import frame_noise
from ...progress import Heartbeat, new_attempt
from ...runtime import abort_on_failure
from ...runtime.control import bcast_object, gather_object
from ...runtime.preempt import Preempted, should_stop
from ...schedulers import fresh_copy, load_scheduler_state, make_scheduler, scheduler_state
from ...layout import generated_latent_frames, ranks_problem, resolve_config
from ...store import RunStore, StoreError
from .clips import ClipComm, ClipLayout, DualScope
from .reference import patch_functions

log = logging.getLogger("hpcvideo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNET3D_SCHEDULERS = ("ddim", "dpmsolver")
DECODE_FRAMES = 8  # frames per 2-D VAE decode call (unet3d): bounds decode memory, as diffusers' VAE slicing


def scope_of(cfg: RunConfig) -> DualScope:
    s = cfg.strategy
    return DualScope(local_frames=s.local_frames, global_frames=s.global_frames,
                     switch_timestep=s.switch_timestep, global_bias=s.global_bias)


def model_path(cfg: RunConfig) -> Path:
    """``model.path`` as a folder; "tiny" builds/caches the tiny model of the family, "demo" is the
    shipped demo model (a Wan; :func:`hpcvideo.generate.resolve_model_path`)."""
    if cfg.model.path == "demo":
        from ...config import DEMO_WEIGHTS_DIR

        return DEMO_WEIGHTS_DIR
    if cfg.model.path != "tiny":
        return Path(cfg.model.path).expanduser().resolve()
    if cfg.model.family == "unet3d":
        from ...models.unet3d import ensure_tiny_unet3d

        return Path(ensure_tiny_unet3d())
    from ...models import ensure_tiny_wan

    return Path(ensure_tiny_wan())


def model_info(cfg: RunConfig, path: Path) -> dict:
    """latent_channels, vae_scale_factor_spatial, spatial stride the video size must divide, model_id, ..."""
    if cfg.model.family == "unet3d":
        from ...models.unet3d import read_unet3d_info

        info = read_unet3d_info(path)
        info["stride"] = info["vae_scale_factor_spatial"] * info["spatial_multiple"]
        info["vae_temporal_stride"] = 1
    else:
        from ...models import read_model_info

        info = read_model_info(path)
        info["stride"] = info["vae_scale_factor_spatial"] * max(info["patch_size"][1:])
        info["vae_temporal_stride"] = info["vae_scale_factor_temporal"]
    return info


def check_fit(cfg: RunConfig, info: dict, world_size: int) -> list[str]:
    """Problems that need the model's config or the rank count (no weights read)."""
    problems = []
    problem = ranks_problem(cfg, world_size)  # a mismatch would hang the clip exchange
    if problem:
        problems.append(problem)
    for key, value in (("video.height", cfg.video.height), ("video.width", cfg.video.width)):
        if value % info["stride"]:
            problems.append(f"{key}={value} is not a multiple of {info['stride']} (VAE x UNet/patch stride of "
                            f"{info['model_id']})")
    if cfg.model.family == "wan":
        total = generated_latent_frames(cfg, world_size)
        reach = total + min(cfg.strategy.global_frames, total)
        if reach > info["rope_max_seq_len"]:
            problems.append(f"video.num_frames={cfg.video.num_frames} + strategy.global_frames need {reach} rotary "
                            f"positions, beyond the model's rope_max_seq_len={info['rope_max_seq_len']}")
    return problems


def _open_store(cfg: RunConfig, info: dict) -> RunStore:
    """Create or reopen the store of a resolved ``cfg`` (clip length set: :func:`hpcvideo.layout.resolve_config`)."""
    if cfg.strategy.clip_latent_frames is None:
        raise ConfigError(["strategy.clip_latent_frames=None: the store needs the clip length the ranks will use; "
                           "resolve it first (hpcvideo.layout.resolve_config(cfg, world_size))"])
    path = Path(cfg.store.path)
    scale = info["vae_scale_factor_spatial"]
    if not RunStore.exists(path):
        return RunStore.create(
            path, config=cfg.to_dict(), num_latent_frames=generated_latent_frames(cfg),
            num_frames=cfg.video.num_frames,
            block_latent_frames=cfg.strategy.clip_latent_frames, latent_channels=info["latent_channels"],
            latent_height=cfg.video.height // scale, latent_width=cfg.video.width // scale,
            height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps, model_id=info["model_id"],
            vae_temporal_stride=info["vae_temporal_stride"])
    store = RunStore.open(path, mode="r+")
    if store.num_frames != cfg.video.num_frames:  # before the config check: the derived clip length follows it
        raise StoreError(f"video.num_frames={cfg.video.num_frames} differs from the store's {store.num_frames} frames "
                         f"({path}); a Video-Infinity run cannot be extended or shortened (every clip sees the "
                         "whole video): use the same length, or a new --output")
    store.check_config(cfg.to_dict(), ignore=IDENTITY_IGNORED)
    store.sweep_orphans()
    return store


def _prepare(cfg: RunConfig, env) -> tuple[Path, dict]:
    """Rank 0 checks the model fit and opens/creates the store; every rank gets the outcome (or exits 2)."""
    outcome = None
    if env.is_main:
        try:
            path = model_path(cfg)
            info = model_info(cfg, path)
            problems = check_fit(cfg, info, env.world_size)
            if problems:
                raise ConfigError(problems)
            _open_store(cfg, info)
            outcome = ("ok", (str(path), info))
        except (ConfigError, StoreError, FileNotFoundError, ValueError):
            if env.world_size > 1:
                bcast_object(env, ("error", None))
            raise
    if env.world_size > 1:
        outcome = bcast_object(env, outcome)
    if outcome[0] == "error":
        raise SystemExit(2)
    return Path(outcome[1][0]), outcome[1][1]


def run_videoinfinity(cfg: RunConfig, env, *, progress: bool = True) -> dict | None:
    """Run (or resume) the Video-Infinity job of ``cfg`` on this rank. Returns the store's status
    dict on rank 0, None elsewhere. Raises ConfigError / StoreError before any weights load
    (rank count that does not match the clips, a size the model cannot take, a store of another
    config); a failure after that aborts every rank. A null ``strategy.clip_latent_frames`` is derived
    from ``env.world_size`` (:func:`hpcvideo.layout.resolve_config`)."""
    cfg = resolve_config(cfg, env.world_size)
    path, info = _prepare(cfg, env)
    with abort_on_failure(env):
        return _run(cfg, env, path, info, progress=progress)


def _dump(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _make_scheduler(cfg: RunConfig, scheduler_config: dict, device):
    s = cfg.sampling
    if cfg.model.family == "wan":
        return make_scheduler(s.scheduler, scheduler_config=scheduler_config, flow_shift=s.flow_shift,
                              num_inference_steps=s.num_inference_steps, device=device)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if s.scheduler == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    else:  # deterministic multistep DPM-Solver++ (the paper's SDE variant would need per-step noise)
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(s.num_inference_steps, device=device)
    return scheduler


def _load(cfg: RunConfig, env, path: Path, dtype):
    """(model, vae or None, scheduler_config, prompt embeds of this clip, negative embeds or None)."""
    s, main = cfg.sampling, env.is_main
    do_cfg = s.guidance_scale > 1.0
    prompts = [p.prompt for p in s.prompts]
    if cfg.model.family == "unet3d":
        from ...models.unet3d import encode_prompts_unet3d, load_unet3d

        parts = ("unet", "vae") + (("text_encoder", "tokenizer") if main else ())
        c = load_unet3d(path, device=env.device, dtype=dtype, parts=parts)
        model, vae = c.unet, c.vae
        if cfg.model.fps_condition is not None:  # VideoCrafter2 conversions
            from ...models.unet3d import apply_fps_condition

            apply_fps_condition(model, path, cfg.model.fps_condition)
        encode = lambda: encode_prompts_unet3d(c, prompts, negative_prompt=s.negative_prompt if do_cfg else None,  # noqa: E731
                                               device="cpu", dtype=dtype)
    else:
        from ...models import encode_prompts, load_wan

        parts = ("transformer",) + (("vae", "text_encoder", "tokenizer") if main else ())
        c = load_wan(path, device=env.device, dtype=dtype, parts=parts)
        model, vae = c.transformer, c.vae
        encode = lambda: encode_prompts(c, prompts, negative_prompt=s.negative_prompt if do_cfg else None,  # noqa: E731
                                        max_sequence_length=s.max_sequence_length, device="cpu", dtype=dtype)
    embeddings = encode() if main else None
    c.text_encoder = c.tokenizer = None
    if env.world_size > 1:
        embeddings = bcast_object(env, embeddings)
    prompt_embeds = embeddings[0][cfg.prompt_index_for_block(env.rank)].to(env.device)
    negative = None if embeddings[1] is None else embeddings[1].to(env.device)
    return model, vae, c.scheduler_config, prompt_embeds, negative


def _denoise_step(cfg: RunConfig, model, scheduler, latents, t, prompt_embeds, negative, dtype):
    """One step of this clip: model -> classifier-free guidance -> scheduler.step. latents (1, C, F, h, w) float32."""
    g = cfg.sampling.guidance_scale
    if cfg.model.family == "unet3d":  # as TextToVideoSDPipeline: batch [uncond, cond]
        model_in = torch.cat([latents, latents]) if negative is not None else latents
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        text = torch.cat([negative, prompt_embeds]) if negative is not None else prompt_embeds
        noise_pred = model(model_in, t, encoder_hidden_states=text, return_dict=False)[0].float()
        if negative is not None:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + g * (cond - uncond)
    else:  # as WanPipeline: cond, then uncond
        timestep = t.expand(latents.shape[0])
        noise_pred = model(latents.to(dtype), timestep, prompt_embeds, return_dict=False)[0].float()
        if negative is not None:
            uncond = model(latents.to(dtype), timestep, negative, return_dict=False)[0].float()
            noise_pred = uncond + g * (noise_pred - uncond)
    return scheduler.step(noise_pred, t, latents, return_dict=False)[0]


@torch.no_grad()
def _run(cfg: RunConfig, env, path: Path, info: dict, *, progress: bool) -> dict | None:
    started = time.perf_counter()
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    dtype = DTYPES[cfg.model.dtype]
    main = env.is_main
    layout = ClipLayout(rank=env.rank, world_size=env.world_size, clip_frames=cfg.strategy.clip_latent_frames)
    model, vae, scheduler_config, prompt_embeds, negative = _load(cfg, env, path, dtype)
    template = _make_scheduler(cfg, scheduler_config, env.device)
    scale = info["vae_scale_factor_spatial"]
    shape = dict(latent_channels=info["latent_channels"], latent_height=cfg.video.height // scale,
                 latent_width=cfg.video.width // scale)
    store = RunStore.open(cfg.store.path, mode="r+")

    state = None
    if main:
        saved = store.load_state("resume")
        state = None if saved is None else torch.load(io.BytesIO(saved[0]), map_location="cpu", weights_only=True)
    if env.world_size > 1:  # each rank gets only its own clip's state
        parts = None if state is None else [{"step": state["step"], "clip": clip} for clip in state["clips"]]
        if bcast_object(env, parts is not None):
            state = env.comm.scatter(parts, root=0)
    elif state is not None:
        state = {"step": state["step"], "clip": state["clips"][0]}
    if state is None:
        step = 0
        scheduler = fresh_copy(template)  # the template stays at step 0: checkpoints store the difference
        latents = frame_noise(seed=cfg.sampling.seed, start=layout.start, stop=layout.stop, **shape).to(env.device)
        latents = latents * getattr(template, "init_noise_sigma", 1.0)
    else:
        step = int(state["step"])
        mine = state["clip"]
        latents = mine["latents"].to(env.device)
        scheduler = load_scheduler_state(template, mine["scheduler"], device=env.device)
        if main:
            log.info("resuming %s at step %d of %d on %d rank(s)", store.path, step, cfg.sampling.num_inference_steps,
                     env.world_size)
    if main:
        store.set_status("running")
        store.update_attrs(num_ranks=env.world_size)

    comm = ClipComm(layout, sync=cfg.strategy.sync_clips)  # sync_clips false: independent clips (baseline)
    apply, remove = patch_functions(cfg.model.family)
    apply(model, comm=comm, scope=scope_of(cfg))
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=step, unit="step", desc="denoise", dynamic_ncols=True)
    denoise_s = checkpoint_s = 0.0
    last_checkpoint = time.monotonic()
    heartbeat = Heartbeat(cfg.store.path, rank=env.rank, num_ticks=num_steps,
                          interval_s=cfg.store.heartbeat_every_s, store=store if main else None,
                          world_size=env.world_size, attempt=new_attempt(env))  # new_attempt: collective
    heartbeat.beat(step)  # per-rank record for `hpcvideo status` (hpcvideo.progress); a tick = one step here
    try:
        while step < num_steps:
            fault("tick", step, rank=env.rank)
            t0 = time.perf_counter()
            latents = _denoise_step(cfg, model, scheduler, latents, timesteps[step], prompt_embeds, negative, dtype)
            denoise_s += time.perf_counter() - t0
            step += 1
            heartbeat.beat(step, tick_s=time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
            # SLURM's USR2 on any rank: all ranks checkpoint this step and stop (runtime.preempt; collective)
            stop = step < num_steps and should_stop(env)
            save = stop or step == num_steps or step % cfg.store.checkpoint_every_ticks == 0 or (
                main and time.monotonic() - last_checkpoint >= cfg.store.checkpoint_every_s)
            if env.world_size > 1:
                save = bcast_object(env, save)  # rank 0's clock decides for everyone
            if save:
                t0 = time.perf_counter()
                mine = {"latents": latents.cpu(), "scheduler": scheduler_state(scheduler, template)}
                clips = gather_object(env, mine)
                if main:
                    store.save_state(_dump({"step": step, "clips": clips}), tick=step, num_blocks=env.world_size)
                    heartbeat.beat(step, force=True)  # `hpcvideo status` never shows a step behind the checkpoint
                last_checkpoint = time.monotonic()
                checkpoint_s += time.perf_counter() - t0
            if stop:
                raise Preempted(step)
    finally:
        remove(model)
        if bar is not None:
            bar.close()
        heartbeat.beat(step, force=True, state="stopped" if step < num_steps else "running")

    t0 = time.perf_counter()
    _write(cfg, env, store, vae, latents, info)
    write_s = time.perf_counter() - t0
    heartbeat.beat(step, force=True, state="finished")
    stats = gather_object(env, {"rank": env.rank, "clip": [layout.start, layout.stop], "bytes_sent": comm.bytes_sent,
                                "bytes_received": comm.bytes_received, "denoise_s": round(denoise_s, 4)})
    if not main:
        return None
    store.update_attrs(rank_stats=stats, timings={
        "denoise_s": round(denoise_s, 4), "checkpoint_s": round(checkpoint_s, 4), "write_s": round(write_s, 4),
        "total_s": round(time.perf_counter() - started, 4), "steps": num_steps})
    store.set_status("complete")
    return store.status_dict()


def _write(cfg: RunConfig, env, store: RunStore, vae, latents: torch.Tensor, info: dict) -> None:
    """Latents of each clip by its rank (data, then done marker); frames as the VAE allows."""
    from ...decode import to_uint8

    rank = env.rank
    store.write_block_latents(rank, latents[0].permute(1, 0, 2, 3).float().cpu().numpy())  # (F, C, h, w)
    fault("latents", rank, rank=rank)
    store.mark_done("latents", rank)
    if cfg.model.family == "unet3d":  # per-frame VAE: every rank decodes its own clip
        frames = latents[0].permute(1, 0, 2, 3).to(vae.device, vae.dtype) / info["scaling_factor"]  # (F, C, h, w)
        video = torch.cat([vae.decode(part, return_dict=False)[0] for part in frames.split(DECODE_FRAMES)])  # (F, 3, H, W)
        store.write_block_frames(rank, to_uint8(video.permute(1, 0, 2, 3).unsqueeze(0)), keep_tail=False)
        fault("frames", rank, rank=rank)
        store.mark_done("frames", rank)
        return
    clips = gather_object(env, latents.cpu())  # Wan's causal VAE: rank 0 decodes the clips in order
    if env.is_main:
        from ...decode import StreamingDecoder

        decoder = StreamingDecoder(vae, device=env.device)
        for index, clip in enumerate(clips):
            store.write_block_frames(index, to_uint8(decoder.decode_block(clip)), keep_tail=False)
            fault("frames", index, rank=0)
            store.mark_done("frames", index)
