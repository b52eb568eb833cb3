"""What every part of the run store shares: its errors, constants, frame arithmetic and argument checks.

No zarr here: the modules beside this one read and write the store (see :mod:`hpcvideo.store`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import format_diff
from ..layout import block_frame_range as _layout_block_frame_range

VAE_TEMPORAL_STRIDE = 4  # Wan VAE: pixel frames per latent frame (after the first)
STATUSES = ("created", "running", "complete", "failed")
DONE_KINDS = ("latents", "frames")
RESERVED_ATTRS = ("format_version", "config", "model_id", "fps", "block_latent_frames", "status", "vae_temporal_stride")
# zarr/storage/_local.py: path.with_suffix(f".{uuid.uuid4().hex}.partial"); hpcvideo's own atomic
# writes (heartbeat records) use the same pattern, so sweep_orphans removes their leftovers too
PARTIAL_RE = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")


class StoreError(RuntimeError):
    """A run store is missing, malformed, read-only, or would be written out of its shape."""


class ConfigMismatchError(StoreError):
    """The store was made with a different config. ``.diff``: [(dotted_key, store_value, command_value)]."""

    def __init__(self, path: Path, diff: list[tuple[str, Any, Any]]):
        self.diff = diff
        lines = format_diff(diff)
        super().__init__(
            f"run store {path} was made with a different config ({len(diff)} key(s) differ):\n{lines}\n"
            "Use the same config to resume, or a new output path for a new run."
        )


def num_frames_for(num_latent_frames: int, temporal_stride: int = VAE_TEMPORAL_STRIDE) -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames: 4*(L-1)+1."""
    return temporal_stride * (num_latent_frames - 1) + 1


def block_frame_range(block_index: int, block_latent_frames: int, temporal_stride: int = VAE_TEMPORAL_STRIDE,
                      num_frames: int | None = None) -> tuple[int, int]:
    """Pixel frames [start, stop) decoded from block ``block_index`` of ``block_latent_frames``;
    with ``num_frames``, cut at the video's N (:func:`hpcvideo.layout.block_frame_range`)."""
    return _layout_block_frame_range(block_index, block_latent_frames, temporal_stride, num_frames)


def normalise_config(config: dict) -> dict:
    """JSON round trip (tuples -> lists, ...) so the command's config compares like the stored one."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-serialisable (no NaN/inf): {e}") from e


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_num_frames(F: int, L: int, n: int, stride: int) -> None:
    """num_frames F must lie in the last of the L // n blocks: first frame of the last block < F <= 4(L-1)+1."""
    low = block_frame_range(L // n - 1, n, stride)[0]
    high = num_frames_for(L, stride)
    if not low < F <= high:
        raise ValueError(f"num_frames={F} does not end in the last of {L // n} blocks of {n} latent frames; "
                         f"allowed: {low + 1} to {high}")
