"""Dual-scope attention masks at frame level, built once per layout and timestep phase.

Keys of a clip's temporal attention are local frames (the clip, plus the halos of ``local_frames``
each side, cut at the video's ends) and the G' global frames. Query frame f sees local key frame
k when |f - k| <= local_frames, and every global key. Positions outside the video are never keys
(the halos are cut, not zero-padded), so nothing needs masking there. The timestep bias (paper
§3.3): +global_bias on the global columns while t >= switch_timestep, on the local columns after.
"""

from __future__ import annotations

import torch

from .clips import DualScope


def phase(scope: DualScope, timestep: float | None) -> str:
    """"global" while t >= switch_timestep, else "local". Raises when the timestep is unknown."""
    if timestep is None:
        raise RuntimeError("dual-scope attention: no timestep seen (call the patched model with its timestep)")
    return "global" if timestep >= scope.switch_timestep else "local"


def frame_mask(
    query_frames: range, local_keys: range, num_global: int, scope: DualScope, which: str, *, device, dtype
) -> torch.Tensor | None:
    """Additive mask (Fq, Fk) for keys ordered [local_keys..., global...], or None when every key is
    visible and no bias applies (then SDPA runs unmasked, exactly as diffusers' processor).

    Boolean when there is no global set (visibility only); float (0 / bias / -inf) otherwise.
    """
    q = torch.tensor(list(query_frames)).view(-1, 1)
    k = torch.tensor(list(local_keys)).view(1, -1)
    visible = (q - k).abs() <= scope.local_frames  # (Fq, F_local)
    if num_global == 0:
        return None if bool(visible.all()) else visible.to(device)
    visible = torch.cat([visible, torch.ones(len(query_frames), num_global, dtype=torch.bool)], dim=1)
    bias = torch.zeros(visible.shape, dtype=torch.float32)
    if which == "global":
        bias[:, len(local_keys):] = scope.global_bias
    else:
        bias[:, : len(local_keys)] = scope.global_bias
    return bias.masked_fill(~visible, float("-inf")).to(device=device, dtype=dtype)
