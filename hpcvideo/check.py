"""Every check of a run that needs more than the config: the model folder's JSON configs, the rank count,
an existing run store and the memory plan. Nothing is created and no weights are loaded.

One entry point, :func:`validate_for_model`, behind ``hpcvideo check``, ``hpcvideo plan``,
``hpcvideo sbatch`` and ``hpcvideo submit`` (:func:`hpcvideo.launch.slurm.check_job`). The config alone
is checked when it is loaded (:mod:`hpcvideo.config`); the rules of each strategy are in
``hpcvideo/strategies/<name>/config_rules.py`` (``ranks_problem``, ``model_problems``), reached through
:func:`hpcvideo.layout.ranks_problem` and :func:`model_problems` here.

This module imports no torch at import time (the model's JSON is read by :mod:`hpcvideo.models`, which
does, only when a check needs it).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .config import DEMO_WEIGHTS_DIR, IDENTITY_IGNORED, ConfigError, RunConfig, validate_config
from .config.validate import strategy_rules
from .layout import model_num_layers, ranks_problem, resolve_config

__all__ = ["PLACEHOLDER_PREFIX", "cache_folder", "model_folder", "model_info", "model_problems", "validate_for_model"]

log = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "/path/to/"  # the real-model presets' model.path until the user sets it


def cache_folder(environ=None) -> Path:
    """The model cache where the tiny models are built: ``$HPCVIDEO_CACHE`` of ``environ`` (default: this
    process's environment), else ``~/.cache/hpcvideo``. Read here, at the edge; the model code takes the folder."""
    value = (os.environ if environ is None else environ).get("HPCVIDEO_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "hpcvideo"


def model_folder(cfg: RunConfig, *, cache_dir: str | Path | None = None) -> Path:
    """``model.path`` as a folder: "demo" is the Wan shipped in the package (:mod:`hpcvideo.demo`); "tiny"
    builds (once, then cached in ``cache_dir``, default :func:`cache_folder`) the tiny random-weight model of
    ``model.family``; else the path, resolved."""
    if cfg.model.path == "demo":
        return DEMO_WEIGHTS_DIR
    if cfg.model.path != "tiny":
        return Path(cfg.model.path).expanduser().resolve()
    if cfg.model.family == "unet3d":
        from .models.unet3d import ensure_tiny_unet3d

        return Path(ensure_tiny_unet3d(cache_folder() if cache_dir is None else cache_dir))
    from .models import ensure_tiny_wan

    return Path(ensure_tiny_wan(cache_folder() if cache_dir is None else cache_dir))


def model_info(cfg: RunConfig, folder: Path | None = None) -> dict:
    """Shape facts of the model of ``cfg`` from its JSON configs (no weights): :func:`hpcvideo.models.read_model_info`
    (wan) or :func:`hpcvideo.models.unet3d.read_unet3d_info` (unet3d). ``folder``: default :func:`model_folder`.
    Raises FileNotFoundError / ValueError for a folder that is not such a model."""
    folder = model_folder(cfg) if folder is None else Path(folder)
    if cfg.model.family == "unet3d":
        from .models.unet3d import read_unet3d_info

        return read_unet3d_info(folder)
    from .models import read_model_info

    return read_model_info(folder)


def model_problems(cfg: RunConfig, info: dict, world_size: int) -> list[str]:
    """Problems of ``cfg`` on ``world_size`` ranks with the model whose shape facts are ``info``
    (:func:`model_info`): the strategy's ``model_problems`` (resolution against the model's strides,
    rotary table, DualParal's stage split). One line each; [] when it fits. The rank layout itself is
    :func:`hpcvideo.layout.ranks_problem`."""
    return strategy_rules(cfg.strategy.name).model_problems(cfg, info, world_size)


def validate_for_model(cfg: RunConfig, world_size: int, *, what: str = "", check_paths: bool = True,
                       check_store: bool = True, check_memory: bool = True) -> RunConfig:
    """Every check of a run before it is queued, planned or started, creating nothing and loading no weights.

    ``world_size``: the ranks of the run; ``what``: how the rank count is named in messages (a prefix,
    e.g. ``"--ranks 4: "``). Checks, all reported at once:

    * the config again (:func:`hpcvideo.config.validate_config`), with ``check_paths``: ``model.path`` is
      not a preset's placeholder and is "tiny", "demo" or a diffusers folder; with ``check_store`` too:
      ``store.path`` is set and creatable (or an existing store);
    * the rank count against the strategy and the model (:func:`hpcvideo.layout.ranks_problem`);
    * the model's JSON configs against the video shape and the rank count (:func:`model_problems`), and
      its ``*.safetensors`` files' headers against their sizes (a truncated copy is named);
    * with ``check_store``, an existing store: the same run (config identity) and not shortened;
    * with ``check_memory``, the memory plan against ``cluster.gpu_mem_gb`` when set (DualParal;
      :func:`hpcvideo.plan.check_fits`).

    Returns ``cfg`` resolved for ``world_size`` (values derived from the rank count filled in, see
    :func:`hpcvideo.layout.resolve_config`). Raises ConfigError listing every problem.
    """
    problems: list[str] = []
    model_ok = True
    placeholder = str(cfg.model.path).startswith(PLACEHOLDER_PREFIX)
    try:
        with warnings.catch_warnings():  # loading the config warned already
            warnings.simplefilter("ignore")
            validate_config(cfg, check_paths=check_paths)
    except ConfigError as error:
        model_ok = not any(e.startswith(("model.path=", "model.family=")) for e in error.errors)
        problems += [e for e in error.errors if not (placeholder and e.startswith("model.path="))
                     and (check_store or not e.startswith("store.path="))]
    if placeholder:
        model_ok = False
        problems.insert(0, f"model.path={cfg.model.path!r} is the preset's placeholder, not a model folder; allowed: "
                           "your local copy of the model in diffusers format (a folder with model_index.json), "
                           "e.g. --set model.path=/scratch/models/NAME")
    rank_problem = ranks_problem(cfg, world_size, num_layers=model_num_layers(cfg) if model_ok else None)
    if rank_problem:
        problems.append(f"{what}{rank_problem}")
    resolved = cfg if rank_problem else resolve_config(cfg, world_size)
    if model_ok and not rank_problem:
        try:
            problems += _model_problems(resolved, world_size, check_memory=check_memory)
        except ConfigError as error:
            problems += error.errors
        except (OSError, ValueError, KeyError) as error:  # unreadable model JSON: the run would fail the same way
            problems.append(f"model.path={cfg.model.path!r}: cannot read the model's configs ({error})")
    if not problems and check_store and cfg.store.path:
        problems += _store_problems(cfg, resolved)
    if problems:
        raise ConfigError(problems)
    return resolved


def _model_problems(cfg: RunConfig, world_size: int, *, check_memory: bool) -> list[str]:
    """The checks that read the model's JSON configs and the headers of its weight files (no weights): shape,
    stage split, damaged ``*.safetensors`` files (:func:`hpcvideo.models.weights.weight_file_problems`), memory plan."""
    from .models.weights import weight_file_problems

    folder = model_folder(cfg)
    problems = model_problems(cfg, model_info(cfg, folder), world_size)
    problems += [f"model.path={str(folder)!r}: {problem}" for problem in weight_file_problems(folder)]
    if not check_memory or cfg.cluster.gpu_mem_gb is None:
        return problems
    from .plan import PLANNED

    if cfg.model.family not in PLANNED.get(cfg.strategy.name, ()):
        log.warning("cluster.gpu_mem_gb=%s not checked: the memory plan does not cover strategy %s with model.family %s",
                    cfg.cluster.gpu_mem_gb, cfg.strategy.name, cfg.model.family)
    elif not problems:
        from .plan import check_fits, make_plan

        cluster_ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
        check_fits(make_plan(cfg, num_ranks=None if world_size == cluster_ranks else world_size), cfg)
    return problems


def _store_problems(cfg: RunConfig, resolved: RunConfig) -> list[str]:
    """An existing run store at ``store.path``: the same run (config identity), not shortened (Video-Infinity:
    the same length)."""
    from .store import RunStore, StoreError

    if not RunStore.exists(Path(cfg.store.path)):
        return []
    problems = []
    try:
        store = RunStore.open(Path(cfg.store.path), mode="r")
        if cfg.strategy.name == "videoinfinity" and cfg.video.num_frames != store.num_frames:
            problems.append(f"video.num_frames={cfg.video.num_frames} differs from the store's {store.num_frames} "
                            f"frames ({cfg.store.path}); a Video-Infinity run cannot be extended or shortened: "
                            "use the same length, or a new --output")
        else:
            store.check_config(resolved.to_dict(), ignore=IDENTITY_IGNORED)
            if cfg.video.num_frames < store.num_frames:
                problems.append(f"video.num_frames={cfg.video.num_frames} is shorter than the store's "
                                f"{store.num_frames} frames ({cfg.store.path}); a run cannot be shortened: pass "
                                f"--frames {store.num_frames} or more, or a new --output")
    except StoreError as error:
        problems.append(str(error))
    return problems
