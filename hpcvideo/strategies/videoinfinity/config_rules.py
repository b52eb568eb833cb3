"""Video-Infinity's config rules (no torch, no weights): its keys, its clip layout on the ranks, its fit to
the model's JSON configs.

Called by :func:`hpcvideo.config.validate.build` (:func:`check`, on every config), by
:func:`hpcvideo.layout.ranks_problem` (:func:`ranks_problem`, the rank count) and by
:func:`hpcvideo.check.validate_for_model` (:func:`model_problems`, the model's shape facts). Messages
name the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ...config.schema import MODEL_FAMILIES as _ALL_FAMILIES, STRATEGIES, StrategyConfig

if TYPE_CHECKING:
    from ...config import RunConfig

NAME = __name__.rsplit(".", 2)[-2]  # the strategy.name this module checks: its package's name
assert NAME in STRATEGIES, NAME
MODEL_FAMILIES = _ALL_FAMILIES  # model.family values this strategy runs: all (wan, unet3d)


def check(cfg: RunConfig, ok: Callable[..., bool], fail: Callable[[str, str], None]) -> None:
    """When Video-Infinity is selected: the ranges of its ``strategy.*`` keys (the clip layout against the rank
    count is :func:`ranks_problem`). ``ok(*keys)``: none of the keys failed before; ``fail(key, message)``:
    report one problem and mark the key bad."""
    st = cfg.strategy
    if not (ok("strategy.name") and st.name == NAME):
        return
    for key in ("clip_latent_frames", "local_frames", "global_frames"):
        low = 1 if key == "clip_latent_frames" else 0
        value = getattr(st, key)
        if ok(f"strategy.{key}") and value is not None and value < low:
            extra = " or null (derived from the rank count)" if key == "clip_latent_frames" else ""
            fail(f"strategy.{key}", f"strategy.{key}={value!r} is out of range; allowed: >= {low}{extra}")
    if ok("strategy.global_bias") and st.global_bias < 0:
        fail("strategy.global_bias", f"strategy.global_bias={st.global_bias!r} is out of range; allowed: >= 0")
    fraction = st.switch_fraction
    if ok("strategy.switch_fraction") and fraction is not None and not 0.0 <= fraction <= 1.0:
        fail("strategy.switch_fraction", f"strategy.switch_fraction={fraction!r} is out of range; allowed: 0 to 1 "
                                         "(the share of the steps in the global phase), or null (switch at "
                                         "strategy.switch_timestep)")
    default_t = StrategyConfig.__dataclass_fields__["switch_timestep"].default
    if ok("strategy.switch_timestep", "strategy.switch_fraction") and fraction is not None and st.switch_timestep != default_t:
        fail("strategy.switch_timestep", f"strategy.switch_timestep={st.switch_timestep!r} takes effect only with "
                                         f"strategy.switch_fraction=null (now {fraction!r}); allowed: "
                                         f"strategy.switch_fraction=null to switch at this raw timestep, or "
                                         f"strategy.switch_timestep left at {default_t!r}")


def ranks_problem(cfg: RunConfig, world_size: int, num_layers: int | None = None) -> str | None:
    """None if the clips of ``cfg`` fit ``world_size`` >= 1 ranks (one clip per rank, every clip holding at
    least one latent frame of the video: :func:`hpcvideo.layout.videoinfinity_rank_counts`), else one line
    naming the values and the rank counts that work. ``num_layers`` is not used (no layer split)."""
    from ...layout import derive_clip_latent_frames, format_counts, videoinfinity_rank_counts

    st = cfg.strategy
    L, N = cfg.num_latent_frames, cfg.video.num_frames
    clip = st.clip_latent_frames
    if clip is not None:
        clips = -(-L // clip)
        if clips == world_size:
            return None
        derived = videoinfinity_rank_counts(L)
        return (f"strategy.clip_latent_frames={clip} splits video.num_frames={N} ({L} latent frames) into "
                f"{clips} clip(s), one per rank, but the job has {world_size} rank(s); allowed: {clips} rank(s), "
                f"or strategy.clip_latent_frames=null (derived from the rank count; works on "
                f"{format_counts(derived)} ranks)")
    clip = derive_clip_latent_frames(L, world_size)
    if -(-L // clip) == world_size:
        return None
    counts = videoinfinity_rank_counts(L)
    why = ("fewer latent frames than ranks" if L < world_size else
           f"clips of {clip} latent frames fill only {-(-L // clip)} rank(s)")
    return (f"{world_size} ranks cannot share video.num_frames={N} ({L} latent frames) as Video-Infinity "
            f"clips, one per rank ({why}); allowed: {format_counts(counts)} ranks for this video.num_frames")


def spatial_stride(cfg: RunConfig, info: dict) -> int:
    """Pixels the video's height and width must be a multiple of: the VAE's spatial factor times the UNet's
    spatial multiple (unet3d, :func:`hpcvideo.models.unet3d.read_unet3d_info`) or the patch size (wan)."""
    if "stride" in info:
        return info["stride"]
    if cfg.model.family == "unet3d":
        return info["vae_scale_factor_spatial"] * info["spatial_multiple"]
    return info["vae_scale_factor_spatial"] * max(info["patch_size"][1:])


def model_problems(cfg: RunConfig, info: dict, world_size: int) -> list[str]:
    """Problems of a resolved ``cfg`` (or one whose clip length is derived from ``world_size``) with a model whose
    shape facts are ``info`` (``vae_scale_factor_spatial``, ``model_id``, ``rope_max_seq_len`` for wan): the
    resolution against the model's stride, Wan's rotary table against the generated frames + the global set.
    The rank count itself is :func:`ranks_problem`. One line each; [] when it fits."""
    from ...layout import generated_latent_frames
    from ...models.experts import expert_problems

    problems = expert_problems(cfg, info)  # sampling.guidance_scale_2 needs two experts
    stride = spatial_stride(cfg, info)
    for key, value in (("video.height", cfg.video.height), ("video.width", cfg.video.width)):
        if value % stride:
            problems.append(f"{key}={value} is not a multiple of {stride} (VAE x UNet/patch stride of "
                            f"{info['model_id']})")
    if cfg.model.family == "wan":
        total = generated_latent_frames(cfg, world_size)
        reach = total + min(cfg.strategy.global_frames, total)
        if reach > info["rope_max_seq_len"]:
            problems.append(f"video.num_frames={cfg.video.num_frames} + strategy.global_frames need {reach} rotary "
                            f"positions, beyond the model's rope_max_seq_len={info['rope_max_seq_len']}")
    from ...config.condition_rules import model_problems as condition_problems  # condition.image vs the model

    return problems + condition_problems(cfg, info)
