"""DualParal's config rules (no torch, no weights): its keys, its rank layout, its fit to the model's JSON configs.

Called by :func:`hpcvideo.config.validate.build` (:func:`check`, on every config), by
:func:`hpcvideo.layout.ranks_problem` (:func:`ranks_problem`, the rank count) and by
:func:`hpcvideo.check.validate_for_model` (:func:`model_problems`, the model's shape facts from
:func:`hpcvideo.models.read_model_info`). Messages name the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ...config.schema import STRATEGIES

if TYPE_CHECKING:
    from ...config import RunConfig

NAME = __name__.rsplit(".", 2)[-2]  # the strategy.name this module checks: its package's name
assert NAME in STRATEGIES, NAME
MODEL_FAMILIES = ("wan",)  # model.family values this strategy runs (of hpcvideo.config.MODEL_FAMILIES)


def check(cfg: RunConfig, ok: Callable[..., bool], fail: Callable[[str, str], None]) -> None:
    """The ``strategy.*`` keys of DualParal (checked whatever the strategy: they have defaults every
    store records) and, when DualParal is selected, its model family. ``ok(*keys)``: none of the keys
    failed before; ``fail(key, message)``: report one problem and mark the key bad."""
    st, family = cfg.strategy, cfg.model.family
    for key, low in (("block_latent_frames", 1), ("context_latent_frames", 0)):
        value = getattr(st, key)
        if ok(f"strategy.{key}") and value < low:
            fail(f"strategy.{key}", f"strategy.{key}={value!r} is out of range; allowed: >= {low}")
    n, c = st.block_latent_frames, st.context_latent_frames
    if ok("strategy.block_latent_frames", "strategy.context_latent_frames") and c > n:
        fail("strategy.context_latent_frames",
             f"strategy.context_latent_frames={c} is larger than strategy.block_latent_frames={n} "
             f"(the context is taken from the previous block); allowed: 0 <= strategy.context_latent_frames <= {n}")
    if ok("strategy.name", "model.family") and st.name == NAME and family not in MODEL_FAMILIES:
        fail("strategy.name", f"strategy.name='dualparal' needs model.family='wan', not {family!r}; "
             "allowed for this family: 'videoinfinity'")


def ranks_problem(cfg: RunConfig, world_size: int, num_layers: int | None) -> str | None:
    """None if DualParal can run ``cfg`` on ``world_size`` >= 1 ranks (one pipeline stage per rank), else
    one line: ``runtime.stage_layers`` (when set) needs one count per rank summing to ``num_layers``;
    otherwise at most ``num_layers`` ranks (the model's transformer blocks; None = unknown, not checked).
    With ``runtime.cfg_parallel`` an even ``world_size``, each half one pipeline (the rules above on world_size / 2)."""
    from ..cfg_parallel import group_size, ranks_problem as cfg_ranks_problem

    problem = cfg_ranks_problem(cfg, world_size)
    if problem:
        return problem
    from ...vae_bands import ranks_problem as rows_ranks_problem

    problem = rows_ranks_problem(cfg, world_size)
    if problem:
        return problem
    problem = _pipeline_ranks_problem(cfg, group_size(cfg, world_size), num_layers)
    if problem and cfg.runtime.cfg_parallel:
        problem += f" (runtime.cfg_parallel=true: each half of the {world_size} ranks is one pipeline)"
    return problem


def _pipeline_ranks_problem(cfg: RunConfig, world_size: int, num_layers: int | None) -> str | None:
    """:func:`ranks_problem` for one pipeline of ``world_size`` stages."""
    stages = cfg.runtime.stage_layers
    if stages is not None:
        total = f" summing to {num_layers}" if num_layers is not None else ""
        if len(stages) != world_size:
            return (f"runtime.stage_layers={list(stages)} gives {len(stages)} pipeline stage(s) but the job has "
                    f"{world_size} rank(s) (one stage per rank); allowed: {len(stages)} rank(s), a list of "
                    f"{world_size} counts{total}, or runtime.stage_layers=null")
        if num_layers is not None and sum(stages) != num_layers:
            return (f"runtime.stage_layers={list(stages)} sums to {sum(stages)} but the model has {num_layers} "
                    f"transformer blocks; allowed: {world_size} positive counts summing to {num_layers}, "
                    "or runtime.stage_layers=null")
        return None
    if num_layers is not None and world_size > num_layers:
        return (f"{world_size} ranks cannot split the model's {num_layers} transformer blocks into pipeline stages "
                f"(DualParal: one stage of >= 1 block per rank); allowed: 1-{num_layers} ranks")
    return None


def model_problems(cfg: RunConfig, info: dict, world_size: int) -> list[str]:
    """Problems of ``cfg`` with a Wan model whose shape facts are ``info`` (:func:`hpcvideo.models.read_model_info`:
    ``vae_scale_factor_spatial``, ``patch_size``, ``rope_max_seq_len``, ``num_layers``, ``model_id``) on
    ``world_size`` ranks: the resolution against the VAE and patch strides, the attention window against the
    rotary table, the stage split of the transformer blocks. One line each; [] when it fits."""
    problems = []
    stride = info["vae_scale_factor_spatial"] * max(info["patch_size"][1], info["patch_size"][2])
    for key, value in (("video.height", cfg.video.height), ("video.width", cfg.video.width)):
        if value % stride:
            problems.append(f"{key}={value} is not a multiple of {stride} (VAE stride x patch size of {info['model_id']})")
    n, c = cfg.strategy.block_latent_frames, cfg.strategy.context_latent_frames
    longest = max(n + 2 * c, cfg.video.height // stride, cfg.video.width // stride)
    if longest > info["rope_max_seq_len"]:
        problems.append(
            f"strategy.block_latent_frames={n} + 2 x strategy.context_latent_frames={c} (or the latent height/width) "
            f"reach {longest} positions, beyond the model's rotary table of {info['rope_max_seq_len']}"
        )
    warning = window_warning(cfg, info)
    if warning:
        import warnings

        warnings.warn(warning, stacklevel=2)
    from ..cfg_parallel import group_size, ranks_problem as cfg_ranks_problem
    from .pipeline import split_layers  # the split itself (imports torch: called once the model's JSON is read)
    from ...models.experts import expert_problems  # sampling.guidance_scale_2 needs two experts

    problems += expert_problems(cfg, info)
    from ...vae_bands import ranks_problem as rows_ranks_problem  # runtime.vae_decode=rows, the VAE's stride

    if info["vae_scale_factor_spatial"] > 8 and rows_ranks_problem(cfg, world_size, info["vae_scale_factor_spatial"]):
        problems.append(rows_ranks_problem(cfg, world_size, info["vae_scale_factor_spatial"]))

    problem = cfg_ranks_problem(cfg, world_size)
    if problem:
        return problems + [problem]
    if cfg.runtime.cfg_parallel and info.get("condition_channels"):
        problems.append(f"runtime.cfg_parallel=true: {info.get('model_id', cfg.model.path)} is an image-to-video "
                        "checkpoint (condition channels), which CFG parallelism does not run yet; allowed: false")
    world_size = group_size(cfg, world_size)  # ranks of one pipeline
    try:
        split_layers(info["num_layers"], world_size, cfg.runtime.stage_layers)
    except ValueError as error:
        problems.append(f"{error} ({world_size} ranks)")
    from ...config.condition_rules import model_problems as condition_problems  # condition.image vs the model

    return problems + condition_problems(cfg, info)



# latent frames of the clips a model was trained on (its native window), by model id (case-insensitive part)
NATIVE_WINDOWS = (("wan2.1", 21), ("wan2.2", 21))  # Wan2.1/2.2: 81 pixel frames = 21 latent frames
DEMO_NATIVE_WINDOW = 6  # the demo model (hpcvideo.demo.model: 21 pixel frames)


def _is_demo(cfg: RunConfig) -> bool:
    from pathlib import Path

    from ...demo import WEIGHTS_DIR

    path = str(cfg.model.path)
    return path == "demo" or Path(path).expanduser().resolve() == Path(WEIGHTS_DIR).resolve()


def native_window(cfg: RunConfig, info: dict) -> int | None:
    """Latent frames the model of ``cfg`` was trained on, when known (Wan2.1/2.2 by model id, the shipped
    demo model by its folder), else None."""
    if _is_demo(cfg):
        return DEMO_NATIVE_WINDOW
    model_id = str(info.get("model_id", "")).lower()
    return next((frames for key, frames in NATIVE_WINDOWS if key in model_id), None)


def attention_window(cfg: RunConfig) -> int:
    """Latent frames one block's self-attention sees: context c + block n, + the next block's first c with
    the feature cache (its keys/values)."""
    st = cfg.strategy
    return st.context_latent_frames + st.block_latent_frames + (st.context_latent_frames if st.feature_cache else 0)


def window_warning(cfg: RunConfig, info: dict) -> str | None:
    """One line when the attention window (:func:`attention_window`) is longer than the model's known native
    window (:func:`native_window`): the model then attends over more frames than it was trained on, which
    measurably shows at the block seams (the demo model: bench/bench_demo.py). None otherwise."""
    native = native_window(cfg, info)
    window = attention_window(cfg)
    if native is None or window <= native:
        return None
    st = cfg.strategy
    parts = f"strategy.context_latent_frames={st.context_latent_frames} + strategy.block_latent_frames=" \
            f"{st.block_latent_frames}" + (f" + {st.context_latent_frames} (strategy.feature_cache=true)" if st.feature_cache else "")
    name = "the demo model" if _is_demo(cfg) else info.get("model_id", "the model")
    return (f"the attention window {parts} = {window} latent frames is longer than the {native} latent frames "
            f"{name} was trained on; seams may show: keep it <= {native}")
