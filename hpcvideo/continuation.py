"""Continue an existing video: its last frames become the context of the first DualParal block.

``condition.init_video`` (an mp4, read with PyAV) or ``condition.init_store`` (a run store's ready frames):
the last ``1 + 4 (c - 1)`` pixel frames (c = ``strategy.context_latent_frames``) are encoded as a clip of
their own with the model's VAE (first frame alone, then 4 per latent frame: c latent frames, normalised as
the pipelines do). Block 0 then reads them as its context, like any block reads its predecessor's last c
latent frames, so the new video is denoised to follow them:

* a model with one timestep per forward sees the context re-noised to the level its predecessor would have
  (one step ahead of block 0: ``sigma[s + 1] * noise + (1 - sigma[s + 1]) * context``, flow matching; clean at
  block 0's last step), with a fixed noise drawn from ``sampling.seed``;
* a model with per-token timesteps (Wan2.2 TI2V, ``expand_timesteps``) sees the clean context at timestep 0.

The new video's store holds only the new frames; the streaming decoder starts fresh at block 0, so the seam
between the two files is where the old video ends and the new one's first frame begins (README: measured
on the demo model). The init frames' SHA-256 is part of the run's identity (``condition.init_sha256``).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

NOISE_TAG = 0x1A17C0  # the init context's noise: generator seeded with sampling.seed ^ NOISE_TAG


def context_pixel_frames(context_latent_frames: int, temporal_factor: int = 4) -> int:
    """Pixel frames that encode to ``context_latent_frames`` latent frames as a clip of their own."""
    return 1 + temporal_factor * (context_latent_frames - 1)


def read_last_frames(cfg, count: int) -> np.ndarray:
    """The last ``count`` frames (k, H, W, 3) uint8 RGB (k <= count) of ``condition.init_video`` (PyAV) or of
    the ready frames of ``condition.init_store``."""
    c = cfg.condition
    if c.init_store is not None:
        from .store import RunStore

        store = RunStore.open(c.init_store, mode="r")
        ready = store.num_frames_ready()
        return np.asarray(store.read_frames(max(0, ready - count), ready))
    import av

    last: deque = deque(maxlen=count)
    with av.open(str(Path(c.init_video).expanduser())) as container:
        for frame in container.decode(video=0):
            last.append(frame.to_ndarray(format="rgb24"))
    return np.stack(list(last)) if last else np.zeros((0, 1, 1, 3), np.uint8)


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, *, height: int, width: int, device) -> torch.Tensor:
    """Normalised latents (1, z_dim, 1 + (k - 1) // 4, h, w) float32 of frames (k, H, W, 3) uint8, resized to
    ``height`` x ``width`` (PIL, bicubic) when they differ, scaled to [-1, 1], through ``vae.encode``'s mode."""
    if frames.shape[1:3] != (height, width):
        from PIL import Image

        frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(frames).to(torch.float32).permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1.0  # (1, 3, k, H, W)
    latent = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode().to(device=device, dtype=torch.float32)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latent.device, latent.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latent.device, latent.dtype)
    return (latent - mean) * inv_std


class InitContext:
    """Block 0's context from an earlier video: ``latents`` (1, z, c, h, w) clean; :meth:`at` gives what
    block 0 reads at a step."""

    def __init__(self, latents: torch.Tensor, *, sigmas: torch.Tensor, seed: int, clean: bool) -> None:
        self.latents = latents
        self.sigmas = sigmas
        self.clean = clean
        generator = torch.Generator().manual_seed(int(seed) ^ NOISE_TAG)
        self.noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)

    def at(self, step_index: int) -> torch.Tensor:
        """Block 0's context at its step ``step_index``: clean (per-token timesteps), else at the noise level
        of step ``step_index + 1`` (one step ahead of block 0, as a predecessor block would be)."""
        if self.clean or step_index + 1 >= len(self.sigmas) - 1:
            return self.latents
        sigma = self.sigmas[step_index + 1].to(self.latents.device, torch.float32)
        return sigma * self.noise + (1.0 - sigma) * self.latents


def init_context(cfg, info: dict, vae, template, device) -> InitContext | None:
    """The :class:`InitContext` of ``cfg`` on the rank that holds the queue (``vae`` given), else None."""
    c = cfg.condition
    if (c.init_video is None and c.init_store is None) or vae is None:
        return None
    count = context_pixel_frames(cfg.strategy.context_latent_frames, info.get("vae_temporal_stride", 4))
    frames = read_last_frames(cfg, count)
    if len(frames) < count:
        raise ValueError(f"the init video has {len(frames)} frames; continuing it needs its last {count} "
                         f"(strategy.context_latent_frames={cfg.strategy.context_latent_frames})")
    latents = encode_frames(vae, frames, height=cfg.video.height, width=cfg.video.width, device=device)
    return InitContext(latents, sigmas=template.sigmas, seed=cfg.sampling.seed, clean=bool(info.get("expand_timesteps")))
