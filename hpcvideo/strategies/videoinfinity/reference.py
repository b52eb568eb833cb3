"""Single-process executor of the Video-Infinity algorithm: the whole video on one device.

The clip-parallel patches with a world of one rank whose clip is the whole video are exactly the
algorithm's definition: temporal convolutions and frame-spanning GroupNorms see every frame; every
query frame attends to the local window |f - k| <= local_frames of the video and to the global set
(same :func:`.clips.global_frame_indices`, same masks and bias). An N-rank run must equal this
(tested on 1, 2 and 4 ranks); in exact mode it equals the unpatched diffusers model (up to the
float32 round-off of the GroupNorm statistics, which are summed in float64 frame by frame instead of
by torch's kernel; Wan has no GroupNorm and is bit-identical).

bf16 on the CPU: a rank runs every per-token layer on its clip's rows only, and oneDNN's bf16 matmul
rounds differently depending on the rows per call once the reduction is wide (K >= 512; Wan2.1-1.3B's
1536 and 8960), so there the N-rank result equals this one within bf16 round-off, not bit for bit
(float32, and bf16 with ``torch.backends.mkldnn.enabled = False``, are exact);
``bench/bench_real_arch.py`` measures it.
"""

from __future__ import annotations

import contextlib

import torch

from .clips import ClipComm, ClipLayout, DualScope
from .unet3d import apply_video_infinity_unet3d, remove_video_infinity_unet3d
from .wan import apply_video_infinity_wan, remove_video_infinity_wan

from .config_rules import MODEL_FAMILIES as FAMILIES  # the model families Video-Infinity patches
PATCHES = {  # model family -> (apply, remove)
    "unet3d": (apply_video_infinity_unet3d, remove_video_infinity_unet3d),
    "wan": (apply_video_infinity_wan, remove_video_infinity_wan),
}


def patch_functions(family: str):
    """(apply, remove) for a model family: "unet3d" or "wan". Raises ValueError otherwise."""
    try:
        return PATCHES[family]
    except KeyError:
        raise ValueError(f"model.family={family!r} is not one of {FAMILIES}") from None


@contextlib.contextmanager
def patched(model, family: str, *, comm: ClipComm, scope: DualScope):
    """``with patched(model, family, comm=..., scope=...):`` the model is clip-parallel inside, stock after."""
    apply, remove = patch_functions(family)
    apply(model, comm=comm, scope=scope)
    try:
        yield model
    finally:
        remove(model)


@torch.no_grad()
def reference_forward(model, family: str, latents: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                      *, scope: DualScope) -> torch.Tensor:
    """noise_pred (B, C, T, h, w) of the whole video latents (B, C, T, h, w) under dual-scope attention."""
    comm = ClipComm(ClipLayout(rank=0, world_size=1, clip_frames=latents.shape[2]))
    with patched(model, family, comm=comm, scope=scope):
        return model(latents, timestep, encoder_hidden_states, return_dict=False)[0]
