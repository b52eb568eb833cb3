"""Latent frames fixed by a condition, and the per-frame timesteps of a window.

A run may fix some latent frames of the video to given clean latents: Wan2.2 TI2V started from an image
fixes latent frame 0 to the image's VAE latent (as diffusers' ``WanImageToVideoPipeline`` with
``expand_timesteps``: the denoised latents keep their own values there, but every forward sees the
image latent, and the final latents take it). :class:`FrameCondition` holds those frames; the executors
ask it for a window's latents (:meth:`FrameCondition.apply`) and, for a model with per-token
timesteps (``expand_timesteps``), for the window's per-frame timesteps (:func:`frame_levels`).

Per-frame timesteps of a window (``expand_timesteps`` models only; others take one timestep per
forward): a fixed frame is at 0; a frame of the block being denoised at the block's timestep t; a
DualParal context frame at its own block's level at the start of the tick (the previous block is one
step ahead: ``timesteps[s + 1]``, or 0 once it has taken its last step). With one block and no context
this is exactly the mask diffusers builds (``mask * t``), so a one-block video equals the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FrameCondition:
    """Video latent frames fixed to clean latents.

    ``frames``: the fixed video latent frame indices (known on every rank); ``latents``: index -> (1, C, 1,
    h, w) float32, on the ranks that hold latents (may be empty elsewhere).
    """

    frames: frozenset[int] = frozenset()
    latents: dict[int, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.frames)

    def apply(self, latents: torch.Tensor, start: int) -> torch.Tensor:
        """``latents`` (1, C, F, h, w) covering video latent frames [start, start + F) with the fixed frames
        replaced (a new tensor when one is replaced, else ``latents`` itself)."""
        inside = [f for f in sorted(self.frames) if start <= f < start + latents.shape[2]]
        if not inside:
            return latents
        out = latents.clone()
        for f in inside:
            out[:, :, f - start : f - start + 1] = self.latents[f].to(out.device, out.dtype)
        return out

    def mask(self, start: int, num_frames: int) -> list[bool]:
        """For each frame of [start, start + num_frames): True when it is fixed."""
        return [start + i in self.frames for i in range(num_frames)]


NO_CONDITION = FrameCondition()


def frame_levels(levels: list[torch.Tensor], fixed: list[bool]) -> torch.Tensor:
    """Per-frame timesteps (F,) float32 as diffusers computes them: ``mask * t`` with mask 0 on a fixed
    frame, 1 elsewhere. ``levels``: each frame's timestep (0-dim tensors, the scheduler's dtype)."""
    return torch.stack([torch.tensor(0.0 if f else 1.0, dtype=torch.float32, device=t.device) * t
                        for t, f in zip(levels, fixed)])




def token_timesteps(levels: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Per-token timesteps (1, F * tokens_per_frame) float32 from one timestep per latent frame ``levels``
    (F,) (:func:`frame_levels`): the vector diffusers' TI2V pipelines build as
    ``(mask[0][0][:, ::2, ::2] * t).flatten()`` for a patch of (1, 2, 2)."""
    return levels.to(torch.float32).repeat_interleave(tokens_per_frame).unsqueeze(0)


@torch.no_grad()
def encode_image(vae, image_path, *, height: int, width: int, device) -> torch.Tensor:
    """The normalised VAE latent (1, z_dim, 1, h, w) float32 of an image file, computed as diffusers'
    ``WanImageToVideoPipeline`` does with ``expand_timesteps``: ``load_image`` (RGB), ``VideoProcessor.preprocess``
    to ``height`` x ``width`` in [-1, 1], one frame through ``vae.encode``, the posterior's mode, then
    ``(latent - latents_mean) * (1 / latents_std)``."""
    from diffusers.utils import load_image
    from diffusers.video_processor import VideoProcessor

    scale = 2 ** len(vae.config.temperal_downsample) * int(vae.config.patch_size or 1)
    processor = VideoProcessor(vae_scale_factor=scale)
    image = processor.preprocess(load_image(str(image_path)), height=height, width=width).to(device, dtype=torch.float32)
    video = image.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)  # (1, 3, 1, H, W)
    latent = vae.encode(video).latent_dist.mode().to(device=device, dtype=torch.float32)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latent.device, latent.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latent.device, latent.dtype)
    return (latent - mean) * inv_std


def frame_condition(cfg, info: dict, vae, device) -> FrameCondition:
    """The fixed frames of ``cfg``'s run: with ``condition.image`` on an ``expand_timesteps`` model, latent
    frame 0 = the image's latent (:func:`encode_image`, computed where ``vae`` is given, i.e. on the ranks
    that hold latents); otherwise none."""
    if cfg.condition.image is None or not info.get("expand_timesteps"):
        return NO_CONDITION
    latents = {}
    if vae is not None:
        latents[0] = encode_image(vae, cfg.condition.image, height=cfg.video.height, width=cfg.video.width,
                                  device=device)
    return FrameCondition(frames=frozenset({0}), latents=latents)


def image_to_video_inputs(cfg, info: dict, model_path, vae, env):
    """An image-to-video checkpoint's extra inputs for ``cfg.condition.image``: (condition channels, on the
    rank holding ``vae`` — :class:`hpcvideo.models.wan_i2v.ConditionChannels` — else None; the image's CLIP
    features (1, tokens, image_dim) on ``env.device`` on every rank, or None for a model without an image
    encoder). Collective: rank 0 encodes the image, the features are broadcast. (None, None) for other models."""
    if not info.get("condition_channels") or cfg.condition.image is None:
        return None, None
    from .models.wan_i2v import ConditionChannels, encode_image_clip
    from .runtime.control import bcast_object

    channels = None
    if vae is not None:
        scale = info["vae_scale_factor_spatial"]
        from .layout import generated_latent_frames

        channels = ConditionChannels(vae, cfg.condition.image, height=cfg.video.height, width=cfg.video.width,
                                     num_latent_frames=generated_latent_frames(cfg), device=env.device)
        assert channels.latents.shape[3:] == (cfg.video.height // scale, cfg.video.width // scale)
    embeds = None
    if info.get("image_dim"):
        if env.is_main:
            embeds = encode_image_clip(model_path, cfg.condition.image, device="cpu")
        embeds = bcast_object(env, embeds).to(env.device)
    return channels, embeds
