"""A tiny, random-weight Wan2.2-T2V-A14B-layout model (two experts) in diffusers format, built offline.

The layout of ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``: the tiny Wan of :mod:`hpcvideo.models.tiny` (same
VAE, text encoder, tokenizer, scheduler and ``transformer/``) plus ``transformer_2/`` (the same
architecture, other random weights: seed + 1) and ``boundary_ratio`` 0.875 in ``model_index.json``
(A14B's value: with the tiny presets' 4 UniPC steps, timesteps 999 and 900 go to ``transformer``, 750
and 500 to ``transformer_2``). ``WanPipeline.from_pretrained(folder)`` loads it offline with both
experts. Deterministic: the same seed gives the same tensors on every build.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .tiny import COMPLETE_MARKER, TINY_VERSION, build_tiny_wan, ensure_tiny_wan

TINY_WAN22_VERSION = f"v1-{TINY_VERSION}"  # change whenever a number here (or the tiny Wan) changes
BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's model_index.json


def build_tiny_wan22_a14b(path, *, seed: int = 0, base: Path | None = None) -> Path:
    """Build the tiny two-expert Wan2.2 model at ``path`` (overwriting files there); returns the path.
    ``base``: a finished tiny Wan folder of the same seed to copy instead of building its parts again."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if base is None:
        build_tiny_wan(path, seed=seed)
    else:
        shutil.copytree(base, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    torch.manual_seed(seed + 1)
    low_noise = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path / "transformer"))
    low_noise.save_pretrained(path / "transformer_2")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    index["boundary_ratio"] = BOUNDARY_RATIO
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def ensure_tiny_wan22_a14b(cache_dir: str | Path) -> Path:
    """The cached folder ``<cache_dir>/tiny-wan22-a14b-{TINY_WAN22_VERSION}-seed0``, built once; safe when many
    processes call it at once (each builds into a private sibling folder and renames it into place; a
    loser of the race discards its copy)."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tiny-wan22-a14b-{TINY_WAN22_VERSION}-seed0"
    if (final / COMPLETE_MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)
        build_tiny_wan22_a14b(tmp, seed=0, base=ensure_tiny_wan(cache_dir))  # the tiny Wan + transformer_2
        (tmp / COMPLETE_MARKER).write_text(f"tiny-wan22-a14b {TINY_WAN22_VERSION} seed 0\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise RuntimeError(f"could not install the tiny Wan2.2 model into {final} (an incomplete folder is "
                                   "in the way: remove it)") from None
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
