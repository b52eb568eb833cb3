"""Frame arithmetic and rank layout, in one place (no torch import: usable on a login node).

Pixel frames and latent frames (``num_frames`` = N, ``num_latent_frames`` = L)::

    Wan (causal VAE, temporal factor 4): latent frame 0 -> pixel frame 0 alone,
                                         latent frame i > 0 -> pixel frames 4(i-1)+1 .. 4i
        L = ceil((N - 1) / 4) + 1                 (the fewest latent frames that decode to >= N frames)
    UNet3D (per-frame 2-D VAE):          L = N

Any N >= 1 is allowed. The strategy generates whole units of ``u`` latent frames (DualParal: blocks
of ``strategy.block_latent_frames``; Video-Infinity: clips of ``strategy.clip_latent_frames``, one
per rank)::

    num_blocks               = ceil(L / u)
    generated latent frames  = num_blocks * u  >= L      (what the store's latents hold)
    decoded pixel frames     = frames_of_latents(generated)  >= N   (the store's frames hold N)

Video-Infinity: ``strategy.clip_latent_frames`` null (the default) means derived from the rank
count, ``u = ceil(L / world_size)``; the layout works when every rank's clip holds at least one
latent frame of the video, i.e. ``ceil(L / u) == world_size``. DualParal: one pipeline stage per
rank, so at most as many ranks as the model has transformer blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = [
    "WAN_TEMPORAL_FACTOR", "TINY_WAN_NUM_LAYERS", "temporal_factor", "latent_frames_for", "frames_for_latents",
    "block_frame_range", "derive_clip_latent_frames", "unit_latent_frames", "num_units", "generated_latent_frames",
    "videoinfinity_rank_counts", "resolve_config", "ranks_problem", "model_num_layers", "format_counts",
    "RanksError", "check_ranks",
]

WAN_TEMPORAL_FACTOR = 4  # Wan VAE: pixel frames per latent frame after the first
TINY_WAN_NUM_LAYERS = 4  # hpcvideo.models.tiny: the built-in tiny Wan's transformer blocks


def temporal_factor(family: str) -> int:
    """Pixel frames per latent frame (after the first): 4 for ``wan``, 1 for ``unet3d``."""
    return 1 if family == "unet3d" else WAN_TEMPORAL_FACTOR


def latent_frames_for(num_frames: int, family: str = "wan") -> int:
    """Latent frames needed for ``num_frames`` >= 1 pixel frames: ceil((N-1)/4)+1 (wan), N (unet3d).

    Raises ValueError for num_frames < 1."""
    if num_frames < 1:
        raise ValueError(f"video.num_frames={num_frames} is out of range; allowed: any whole number >= 1")
    f = temporal_factor(family)
    return -(-(num_frames - 1) // f) + 1 if f > 1 else num_frames


def frames_for_latents(num_latent_frames: int, family: str = "wan") -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames: 4(L-1)+1 (wan), L (unet3d); 0 for L = 0."""
    if num_latent_frames <= 0:
        return 0
    f = temporal_factor(family)
    return f * (num_latent_frames - 1) + 1


def block_frame_range(block_index: int, unit_latent_frames: int, factor: int = WAN_TEMPORAL_FACTOR,
                      num_frames: int | None = None) -> tuple[int, int]:
    """Pixel frames [start, stop) decoded from unit (block/clip) ``block_index`` of ``unit_latent_frames``
    latent frames, with temporal factor ``factor``; ``num_frames``: clip stop (and start) to the video's N."""
    if block_index < 0:
        raise ValueError(f"block_index must be >= 0, got {block_index}")
    f = factor * unit_latent_frames
    start = 0 if block_index == 0 else f * block_index - (factor - 1)
    stop = f * (block_index + 1) - (factor - 1)
    if num_frames is not None:
        start, stop = min(start, num_frames), min(stop, num_frames)
    return start, stop


def derive_clip_latent_frames(num_latent_frames: int, world_size: int) -> int:
    """Video-Infinity clip length when ``strategy.clip_latent_frames`` is null: ceil(L / world_size)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    return max(1, -(-num_latent_frames // world_size))


def unit_latent_frames(cfg: RunConfig, world_size: int | None = None) -> int:
    """Latent frames of one block (DualParal) or clip (Video-Infinity; a null clip length is derived
    from ``world_size``, which must then be given: ValueError otherwise)."""
    s = cfg.strategy
    if s.name != "videoinfinity":
        return s.block_latent_frames
    if s.clip_latent_frames is not None:
        return s.clip_latent_frames
    if world_size is None:
        raise ValueError("strategy.clip_latent_frames=null is derived from the rank count: give world_size "
                         "(or resolve the config with hpcvideo.layout.resolve_config)")
    return derive_clip_latent_frames(cfg.num_latent_frames, world_size)


def num_units(cfg: RunConfig, world_size: int | None = None) -> int:
    """Blocks (DualParal) or clips (Video-Infinity) generated: ceil(num_latent_frames / unit)."""
    return -(-cfg.num_latent_frames // unit_latent_frames(cfg, world_size))


def generated_latent_frames(cfg: RunConfig, world_size: int | None = None) -> int:
    """Latent frames the strategy generates (whole blocks/clips): num_units * unit >= num_latent_frames."""
    return num_units(cfg, world_size) * unit_latent_frames(cfg, world_size)


def videoinfinity_rank_counts(num_latent_frames: int, clip_latent_frames: int | None = None) -> list[int]:
    """Rank counts on which Video-Infinity can lay out ``num_latent_frames`` (every clip holds at least
    one frame of the video): [ceil(L / clip)] for a set clip length, else every w with
    ceil(L / ceil(L / w)) == w (1 <= w <= L)."""
    L = num_latent_frames
    if clip_latent_frames is not None:
        return [-(-L // clip_latent_frames)] if clip_latent_frames >= 1 else []
    return [w for w in range(1, L + 1) if -(-L // derive_clip_latent_frames(L, w)) == w]


def format_counts(counts: list[int]) -> str:
    """``[1, 2, 3, 4, 6, 8]`` -> ``'1-4, 6, 8'``."""
    parts, i = [], 0
    while i < len(counts):
        j = i
        while j + 1 < len(counts) and counts[j + 1] == counts[j] + 1:
            j += 1
        parts.append(str(counts[i]) if j == i else f"{counts[i]}-{counts[j]}")
        i = j + 1
    return ", ".join(parts)


def resolve_config(cfg: RunConfig, world_size: int) -> RunConfig:
    """``cfg`` with every value derived from the rank count filled in (Video-Infinity's null
    ``strategy.clip_latent_frames`` -> ceil(L / world_size)); ``cfg`` itself when nothing is derived.
    The resolved config is what a run store records, so a resume with the same command matches. An image
    condition gets its file's SHA-256 (``condition.image_sha256``), so a changed image is not resumed."""
    from .config.condition_rules import with_image_hash

    cfg = with_image_hash(cfg)
    if cfg.strategy.name != "videoinfinity" or cfg.strategy.clip_latent_frames is not None:
        return cfg
    from .config import RunConfig

    d = cfg.to_dict()
    d["strategy"]["clip_latent_frames"] = derive_clip_latent_frames(cfg.num_latent_frames, world_size)
    return RunConfig.from_dict(d)


def ranks_problem(cfg: RunConfig, world_size: int, *, num_layers: int | None = None) -> str | None:
    """None if ``cfg`` can run on ``world_size`` ranks, else one line naming the value(s) and what would work.

    Checks: world_size >= 1, then the strategy's own rule (``ranks_problem`` of
    ``hpcvideo/strategies/<name>/config_rules.py``). DualParal: at most ``num_layers`` ranks (one pipeline
    stage per rank; the model's transformer blocks, when known) and ``runtime.stage_layers`` (when set)
    with one count per rank summing to ``num_layers``; Video-Infinity: the clips fit the rank count (see
    :func:`videoinfinity_rank_counts`). Reads nothing (pass ``num_layers``, e.g. from :func:`model_num_layers`).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        return f"{world_size!r} ranks is not allowed; allowed: a whole number of ranks >= 1"
    from .config.validate import strategy_rules  # each strategy's rank rules: strategies/<name>/config_rules.py

    try:
        rules = strategy_rules(cfg.strategy.name)
    except KeyError:  # an unknown strategy is the config check's to report
        return None
    return rules.ranks_problem(cfg, world_size, num_layers)


def model_num_layers(cfg: RunConfig) -> int | None:
    """Transformer blocks of ``cfg``'s model, from JSON only (never weights); None if unknown.

    Wan: ``num_layers`` of ``<model.path>/transformer/config.json`` (diffusers' default 40 when the key
    is absent); ``model.path`` "tiny": the built-in tiny Wan's 4; "demo": the shipped demo model's
    config. UNet3D: None (Video-Infinity does not split the model's layers over ranks). None also when
    the folder or file is missing or unreadable (the path checks report that).
    """
    if cfg.model.family != "wan":
        return None
    path = cfg.model.path
    if path == "tiny":
        return TINY_WAN_NUM_LAYERS
    if path == "demo":
        from .config import DEMO_WEIGHTS_DIR

        folder = Path(DEMO_WEIGHTS_DIR)
    else:
        folder = Path(path).expanduser()
    try:
        data = json.loads((folder / "transformer" / "config.json").read_text())
        value = data.get("num_layers", 40) if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


class RanksError(ConfigError):
    """The run cannot execute on the given number of ranks; ``str()`` is the one-line reason."""

    def __str__(self) -> str:
        return "; ".join(self.errors)


def check_ranks(cfg: RunConfig, world_size: int, *, what: str = "") -> None:
    """Raise :class:`RanksError` (one line, prefixed with ``what``, e.g. ``"--ranks 64: "``) when
    :func:`ranks_problem` finds a problem with ``world_size`` ranks (the model's blocks from
    :func:`model_num_layers`)."""
    problem = ranks_problem(cfg, world_size, num_layers=model_num_layers(cfg))
    if problem:
        raise RanksError([f"{what}{problem}"])
