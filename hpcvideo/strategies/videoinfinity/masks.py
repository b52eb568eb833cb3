"""Dual-scope attention masks at frame level, built once per layout and timestep phase.

Keys of a clip's temporal attention are local frames (the clip, plus the halos of ``local_frames``
each side, cut at the video's ends) and the G' global frames. Query frame f sees local key frame
k when |f - k| <= local_frames, and every global key. Positions outside the video are never keys
(the halos are cut, not zero-padded), so nothing needs masking there. The timestep bias (paper
§3.3): +global_bias on the global columns while t >= switch_timestep (the global phase), on the
local columns after; with ``exempt_own_frame`` the query frame's own column keeps +global_bias in
the global phase too. :func:`switch_timestep_for` turns a share of the steps into that threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .clips import DualScope


def phase(scope: DualScope, timestep: float | None) -> str:
    """"global" while t >= switch_timestep, else "local". Raises when the timestep is unknown."""
    if timestep is None:
        raise RuntimeError("dual-scope attention: no timestep seen (call the patched model with its timestep)")
    return "global" if timestep >= scope.switch_timestep else "local"


def global_steps(fraction: float, num_steps: int) -> int:
    """Steps in the global phase: round(fraction * num_steps), halves rounded up (0.2 of 30 -> 6, of 12 -> 2)."""
    return min(num_steps, max(0, math.floor(fraction * num_steps + 0.5)))


def switch_timestep_for(fraction: float, timesteps: Sequence) -> float:
    """The ``switch_timestep`` that puts the first :func:`global_steps` of a schedule in the global phase.

    ``timesteps``: the scheduler's timesteps in step order (strictly decreasing; a tensor or a list).
    Returns the midpoint between the last global step's timestep and the first local one's, so a
    timestep seen in another dtype (bf16) still lands on its side; +inf when no step is global, -inf
    when all are. Raises ValueError when the timesteps do not decrease strictly.
    """
    values = [float(t) for t in timesteps]
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"switch_timestep_for: the timesteps do not decrease strictly: {values}")
    k = global_steps(fraction, len(values))
    if k == 0:
        return math.inf
    if k == len(values):
        return -math.inf
    return (values[k - 1] + values[k]) / 2


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
        if scope.exempt_own_frame:  # the query frame's own key keeps the favoured bias
            bias[:, : len(local_keys)][q == k] = scope.global_bias
    else:
        bias[:, : len(local_keys)] = scope.global_bias
    return bias.masked_fill(~visible, float("-inf")).to(device=device, dtype=dtype)
