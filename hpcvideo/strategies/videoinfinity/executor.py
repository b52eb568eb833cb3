"""Video-Infinity's executor and spec: clip r on rank r, all clips denoised in lock-step.

Rank layout (``strategy.clip_latent_frames`` = F, T = num_latent_frames, world_size = ceil(T / F); a null
F is derived from the rank count as ceil(T / world_size), see :mod:`hpcvideo.layout`; the clips cover
world_size * F >= T latent frames, the store keeps the latents of every clip and exactly
``video.num_frames`` pixel frames)::

    rank 0   clip 0: latent frames [0, F)    (the runner: encodes the prompts, creates the store,
                                             saves the checkpoints of every rank's state, gathered)
    rank r   clip r: latent frames [rF, (r+1)F)   writes its clip's latents chunk and done marker
                                             (:class:`hpcvideo.writer.ClipSink`); a per-frame VAE
                                             (UNet3D): decodes its own clip; a causal VAE (Wan): rank 0
                                             decodes all clips in order (streaming decoder)

A tick is one denoising step of all clips (the loop of ``TextToVideoSDPipeline`` / ``WanPipeline``:
model -> guidance -> scheduler.step): every rank runs the patched model on its clip with the same
timestep (the patched layers exchange halos, the global set and GroupNorm statistics); the scheduler
of each rank steps its own clip. The state of a rank is its clip's latents and scheduler; the runner
gathers them for a checkpoint and hands each rank its own on resume. The clips are written after the
last checkpoint (the sink waits for the end of the run), so a run killed while writing redoes only
the writes. The frame count of a store is fixed (every clip sees the whole video).

Noise: :func:`hpcvideo.noise.frame_noise` (a generator per latent frame), so the initial video is
the same for any split. Prompts: clip r takes the prompt of its first frame (prompt schedule).
"""

from __future__ import annotations

import math
import time

import torch

from ...conditioning import NO_CONDITION, FrameCondition, frame_condition, frame_levels, token_timesteps
from ...config import ConfigError
from ...layout import ranks_problem
from ...models.experts import Experts
from ...noise import frame_noise
from ...schedulers import fresh_copy, load_scheduler_state, scheduler_state
from ..base import BuildContext, StrategySpec
from .clips import ClipComm, ClipLayout, DualScope
from .config_rules import model_problems
from .masks import switch_timestep_for
from .reference import patch_functions


def scope_of(cfg, timesteps=None) -> DualScope:
    """The :class:`.clips.DualScope` of ``cfg.strategy``. ``timesteps``: the run's schedule (the scheduler's
    timesteps in step order), which turns ``strategy.switch_fraction`` into a raw-timestep threshold
    (:func:`.masks.switch_timestep_for`); None where only shapes matter (the plan's dry run): then a fraction
    gives the local phase throughout. With ``switch_fraction`` null the threshold is ``strategy.switch_timestep``."""
    s = cfg.strategy
    switch = s.switch_timestep
    if s.switch_fraction is not None:
        switch = switch_timestep_for(s.switch_fraction, timesteps) if timesteps is not None else math.inf
    return DualScope(local_frames=s.local_frames, global_frames=s.global_frames, switch_timestep=switch,
                     global_bias=s.global_bias, exempt_own_frame=s.exempt_own_frame)


class ClipExecutor:
    """One rank's clip of a Video-Infinity run (:class:`hpcvideo.strategies.base.Executor`).

    ``family``: the model family (its ``noise_pred`` is the pipeline's forward); ``model``: the denoiser,
    patched here for clip parallelism (``close`` removes the patches); ``template``: a scheduler at step
    0; ``latents``: the clip's initial latents (1, C, F, h, w) float32 (scaled by the scheduler's initial
    sigma); ``prompt_embeds`` (1, L, D) of this clip, ``negative_prompt_embeds`` or None (no CFG).
    Two experts (Wan2.2 A14B): ``models`` holds every expert (each patched), ``experts`` picks the one
    of each step's timestep (:class:`hpcvideo.models.experts.Experts`) and ``guidance_scale_2`` is the
    low-noise expert's scale (None: ``guidance_scale``); every clip takes the same step, so every rank
    uses the same expert at a tick.
    ``expand_timesteps``: the model takes one timestep per token (Wan2.2 TI2V; fixed frames at 0);
    ``condition``: video latent frames fixed to clean latents (:class:`hpcvideo.conditioning.FrameCondition`).
    """

    def __init__(self, *, family, model, template, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor | None, guidance_scale: float, dtype: torch.dtype,
                 layout: ClipLayout, comm: ClipComm, scope: DualScope, models: list | None = None,
                 experts: Experts | None = None, guidance_scale_2: float | None = None,
                 expand_timesteps: bool = False, condition: FrameCondition = NO_CONDITION) -> None:
        self.family, self.model, self.template = family, model, template
        self.models = list(models) if models else [model]
        self.experts = experts or Experts()
        if len(self.experts.names) != len(self.models):
            raise ValueError(f"experts {self.experts.names} but {len(self.models)} model(s) given")
        self.guidance_scale_2 = guidance_scale_2
        self.scheduler = fresh_copy(template)  # the template stays at step 0: checkpoints store the difference
        self.latents = latents
        self.prompt_embeds, self.negative_prompt_embeds = prompt_embeds, negative_prompt_embeds
        self.guidance_scale, self.dtype = guidance_scale, dtype
        self.layout, self.comm = layout, comm
        self.expand_timesteps, self.condition = expand_timesteps, condition
        self.timesteps = self.scheduler.timesteps
        self.num_ticks = len(self.timesteps)
        self.num_units = layout.world_size
        self.extend_tick = None  # a run cannot be extended
        self.stale_from = 0  # the clips are written after the last step: every unit is (re)written at the end
        self.tick = 0
        self.denoise_s = 0.0
        self._handed_out = False
        self._apply, self._remove = patch_functions(family.name)
        for each in self.models:
            self._apply(each, comm=comm, scope=scope)
        self._patched = True

    @property
    def done(self) -> bool:
        return self.tick >= self.num_ticks

    @property
    def stats(self) -> dict:
        return {"clip": [self.layout.start, self.layout.stop], "bytes_sent": self.comm.bytes_sent,
                "bytes_received": self.comm.bytes_received, "denoise_s": round(self.denoise_s, 4)}

    @torch.no_grad()
    def run_tick(self) -> list[tuple[int, torch.Tensor]]:
        """One denoising step of this clip (collective: every rank steps at once); returns [(rank,
        latents)] after the last step, else []."""
        if self.done:
            raise RuntimeError("the clip has finished")
        start = time.perf_counter()
        t = self.timesteps[self.tick]
        model = self.models[self.experts.index(t)]  # the expert of this step's timestep
        # the diffusers loop: model -> classifier-free guidance -> scheduler.step (TI2V: fixed frames replaced in
        # the model's input, their tokens at timestep 0, as WanImageToVideoPipeline with expand_timesteps)
        latents, timestep = self.latents, t
        if self.condition:
            latents = self.condition.apply(latents, self.layout.start)
        if self.expand_timesteps:
            frames, tokens_per_frame = latents.shape[2], (latents.shape[3] // 2) * (latents.shape[4] // 2)
            levels = frame_levels([t] * frames, self.condition.mask(self.layout.start, frames))
            timestep = token_timesteps(levels, tokens_per_frame)
        cond, uncond = self.family.noise_pred(model, latents, timestep, self.prompt_embeds,
                                              self.negative_prompt_embeds, self.scheduler, self.dtype)
        guidance_scale = self.experts.guidance_scale(t, self.guidance_scale, self.guidance_scale_2)
        noise_pred = cond if uncond is None else uncond + guidance_scale * (cond - uncond)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]
        self.tick += 1
        self.denoise_s += time.perf_counter() - start
        return self.drain()

    def drain(self) -> list[tuple[int, torch.Tensor]]:
        """Nothing runs in the background; after the last step, the finished clip (once)."""
        if not self.done or self._handed_out:
            return []
        self._handed_out = True
        latents = self.condition.apply(self.latents, self.layout.start) if self.condition else self.latents
        return [(self.layout.rank, latents)]

    def state_dict(self) -> dict:
        return {"step": self.tick, "latents": self.latents.cpu(), "scheduler": scheduler_state(self.scheduler, self.template)}

    def load_state_dict(self, state: dict) -> None:
        self.tick = int(state["step"])
        self.latents = state["latents"].to(self.latents.device)
        self.scheduler = load_scheduler_state(self.template, state["scheduler"], device=self.latents.device)

    def close(self) -> None:
        if self._patched:
            for each in self.models:
                self._remove(each)
            self._patched = False


def check_fit(cfg, info: dict, world_size: int) -> list[str]:
    """Problems that need the model's config (``ModelFamily.info``) or the rank count (no weights read): the
    rank layout (:func:`hpcvideo.layout.ranks_problem`; a mismatch would hang the clip exchange), then the
    config rules' model checks (:func:`.config_rules.model_problems`)."""
    problem = ranks_problem(cfg, world_size)
    return ([problem] if problem else []) + model_problems(cfg, info, world_size)


class VideoInfinitySpec(StrategySpec):
    name, title = "videoinfinity", "Video-Infinity"
    every_rank_writes = True
    extendable = False

    def unit_latent_frames(self, cfg) -> int:
        if cfg.strategy.clip_latent_frames is None:
            raise ConfigError(["strategy.clip_latent_frames=None: the store needs the clip length the ranks will use; "
                               "resolve it first (hpcvideo.layout.resolve_config(cfg, world_size))"])
        return cfg.strategy.clip_latent_frames

    def problems(self, cfg, family, info, world_size):
        return check_fit(cfg, info, world_size)

    def build(self, ctx: BuildContext):
        cfg, env, family, info = ctx.cfg, ctx.env, ctx.family, ctx.info
        # a per-frame VAE decodes on every rank (its own clip); a causal one on rank 0 only
        components = family.load(ctx.model_path, device=env.device, dtype=ctx.dtype, denoiser=True,
                                 vae=env.is_main or family.vae_kind == "per_frame")
        model = components.model
        for each in components.models:  # every expert (Wan2.2 A14B: two)
            family.prepare_denoiser(each, ctx.model_path, cfg)
        template = family.make_scheduler(cfg, components.scheduler_config, env.device)
        layout = ClipLayout(rank=env.rank, world_size=env.world_size, clip_frames=cfg.strategy.clip_latent_frames)
        scale = info["vae_scale_factor_spatial"]
        latents = frame_noise(seed=cfg.sampling.seed, start=layout.start, stop=layout.stop,
                              latent_channels=info["latent_channels"], latent_height=cfg.video.height // scale,
                              latent_width=cfg.video.width // scale).to(env.device)
        latents = latents * getattr(template, "init_noise_sigma", 1.0)
        executor = ClipExecutor(
            family=family, model=model, template=template, latents=latents,
            prompt_embeds=ctx.prompt_embeds[cfg.prompt_index_for_block(env.rank)],
            negative_prompt_embeds=ctx.negative_prompt_embeds, guidance_scale=cfg.sampling.guidance_scale,
            dtype=ctx.dtype, layout=layout,
            comm=ClipComm(layout, sync=cfg.strategy.sync_clips),  # sync_clips false: independent clips (baseline)
            scope=scope_of(cfg, template.timesteps), models=components.models, experts=family.experts(info),
            guidance_scale_2=cfg.sampling.guidance_scale_2, expand_timesteps=info.get("expand_timesteps", False),
            condition=frame_condition(cfg, info, components.vae if layout.start == 0 else None, env.device),
        )
        from ...writer import ClipSink

        sink = ClipSink(ctx.store, components.vae, env, vae_kind=family.vae_kind, scaling_factor=info.get("scaling_factor"),
                        faults=ctx.faults)
        return executor, sink
