"""Validation: value ranges, enums and cross-field rules of a typed config, path checks, and :func:`build`,
the one place where a raw nested dict becomes a validated :class:`RunConfig` (or one :class:`ConfigError`).

Each strategy's own rules live next to it (``hpcvideo/strategies/<name>/config_rules.py``, light: no
torch) and are called from :func:`_check_values` for every name in :data:`STRATEGIES`. The checks that
need the model's JSON configs or the rank count are :func:`hpcvideo.check.validate_for_model`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .coerce import _build_section, _unknown, _wrong_type
from ..strategies import cfg_parallel
from .schema import (
    _SECTIONS,
    CLUSTER_MPI,
    DEMO_WEIGHTS_DIR,
    DEVICES,
    TEXT_ENCODER_DEVICES,
    DTYPES,
    MODEL_FAMILIES,
    NOISE_MODES,
    SCHEDULERS,
    SEED_LIMIT,
    STRATEGIES,
    UNET3D_SCHEDULERS,
    ConfigError,
    PromptEntry,
    RunConfig,
)


def strategy_rules(name: str):
    """The config rules module of strategy ``name`` (``hpcvideo.strategies.<name>.config_rules``): ``check(cfg, ok,
    fail)``, ``ranks_problem(cfg, world_size, num_layers)``, ``model_problems(cfg, info, world_size)``.
    Raises KeyError for a name not in :data:`STRATEGIES`."""
    if name not in STRATEGIES:
        raise KeyError(f"strategy.name={name!r} is not allowed; allowed: {', '.join(map(repr, STRATEGIES))}")
    return importlib.import_module(f"hpcvideo.strategies.{name}.config_rules")


def _nearest(value: int, step: int, offset: int, minimum: int) -> str:
    """The allowed values (offset + k*step >= minimum) just below and above ``value``, as 'a or b'."""
    lower = (value - offset) // step * step + offset
    options = [v for v in (lower, lower + step) if v >= minimum] or [minimum]
    return " or ".join(map(str, options))


def _check_values(cfg: RunConfig, bad: set[str]) -> list[str]:
    """Enums, ranges and cross-field rules on a typed config; keys in ``bad`` are skipped."""
    errors: list[str] = []

    def ok(*keys: str) -> bool:
        return not any(k in bad for k in keys)

    def fail(key: str, message: str) -> None:
        errors.append(message)
        bad.add(key)

    def one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
        if ok(key) and value not in allowed:
            fail(key, f"{key}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")

    def at_least(key: str, value: Any, lo: int) -> None:
        if ok(key) and value < lo:
            fail(key, f"{key}={value!r} is out of range; allowed: >= {lo}")

    def positive(key: str, value: Any) -> None:
        if ok(key) and not value > 0:
            fail(key, f"{key}={value!r} is out of range; allowed: > 0")

    m, v, s, st = cfg.model, cfg.video, cfg.sampling, cfg.strategy
    one_of("model.family", m.family, MODEL_FAMILIES)
    one_of("model.dtype", m.dtype, DTYPES)
    one_of("model.text_encoder_device", m.text_encoder_device, TEXT_ENCODER_DEVICES)
    if ok("model.path") and not m.path:
        fail("model.path", "model.path='' is empty; allowed: 'tiny' or a diffusers-format model folder")
    if ok("model.fps_condition", "model.family") and m.fps_condition is not None:
        if m.family != "unet3d":
            fail("model.fps_condition", f"model.fps_condition={m.fps_condition!r} is for model.family='unet3d' "
                 f"(VideoCrafter2), not {m.family!r}; allowed: null")
        elif not m.fps_condition > 0:
            fail("model.fps_condition", f"model.fps_condition={m.fps_condition!r} is out of range; allowed: > 0 or null")

    if ok("video.num_frames") and v.num_frames < 1:
        fail("video.num_frames", f"video.num_frames={v.num_frames} is out of range; allowed: any whole number >= 1")
    for key in ("height", "width"):
        size = getattr(v, key)
        if ok(f"video.{key}") and (size < 16 or size % 16):
            nearest = _nearest(size, 16, 0, 16)
            fail(f"video.{key}", f"video.{key}={size} is not a positive multiple of 16; nearest allowed: {nearest}")
    positive("video.fps", v.fps)

    if ok("sampling.seed") and not 0 <= s.seed < SEED_LIMIT:
        fail("sampling.seed", f"sampling.seed={s.seed} is out of range; allowed: 0 <= seed < 2**63")
    at_least("sampling.num_inference_steps", s.num_inference_steps, 1)
    if ok("sampling.guidance_scale") and s.guidance_scale < 0:
        fail("sampling.guidance_scale",
             f"sampling.guidance_scale={s.guidance_scale!r} is out of range; allowed: >= 0 (<= 1 disables guidance)")
    if ok("sampling.guidance_scale_2") and s.guidance_scale_2 is not None and s.guidance_scale_2 < 0:
        fail("sampling.guidance_scale_2", f"sampling.guidance_scale_2={s.guidance_scale_2!r} is out of range; "
                                          "allowed: >= 0, or null (= sampling.guidance_scale)")
    one_of("sampling.scheduler", s.scheduler, UNET3D_SCHEDULERS if m.family == "unet3d" else SCHEDULERS)
    positive("sampling.flow_shift", s.flow_shift)
    at_least("sampling.max_sequence_length", s.max_sequence_length, 1)
    if ok("sampling.prompts"):
        errors.extend(_check_prompts(s.prompts))

    one_of("strategy.name", st.name, STRATEGIES)
    one_of("strategy.noise_init", st.noise_init, NOISE_MODES)
    for name in STRATEGIES:  # each strategy checks its own keys (and, when it is the one selected, the rest)
        strategy_rules(name).check(cfg, ok, fail)
    cfg_parallel.check(cfg, ok, fail)  # runtime.cfg_parallel: guidance on, a strategy that supports it
    if ok("video.num_frames", "strategy.block_latent_frames", "sampling.prompts") and s.prompts and not errors \
            and _units_known(cfg):
        _warn_unused_prompts(cfg)

    if ok("store.path") and cfg.store.path == "":
        fail("store.path", "store.path='' is empty; allowed: a folder path such as runs/NAME.zarr, or null")
    at_least("store.checkpoint_every_ticks", cfg.store.checkpoint_every_ticks, 1)
    positive("store.checkpoint_every_s", cfg.store.checkpoint_every_s)
    positive("store.heartbeat_every_s", cfg.store.heartbeat_every_s)

    one_of("runtime.device", cfg.runtime.device, DEVICES)
    one_of("runtime.vae_decode", cfg.runtime.vae_decode, ("auto", "rows"))
    if ok("runtime.vae_decode") and cfg.runtime.vae_decode == "rows" and (
            cfg.strategy.name != "dualparal" or cfg.model.family != "wan"):
        fail("runtime.vae_decode", f"runtime.vae_decode='rows' with strategy.name={cfg.strategy.name!r} and "
             f"model.family={cfg.model.family!r}: the row-parallel decode is for DualParal on the wan family's "
             "causal VAE; allowed: 'auto'")
    at_least("runtime.num_threads", cfg.runtime.num_threads, 0)
    positive("runtime.timeout_s", cfg.runtime.timeout_s)
    positive("runtime.heartbeat_timeout_s", cfg.runtime.heartbeat_timeout_s)

    for key in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        at_least(f"cluster.{key}", getattr(cfg.cluster, key), 1)
    for key in ("partition", "account", "qos", "constraint"):
        if ok(f"cluster.{key}") and getattr(cfg.cluster, key) == "":
            fail(f"cluster.{key}", f"cluster.{key}='' is empty; allowed: a name, or null for the default")
    for key in ("partition", "account", "qos", "constraint", "log_folder"):
        value = getattr(cfg.cluster, key)
        if ok(f"cluster.{key}") and value is not None and ("\n" in value or "\0" in value):
            fail(f"cluster.{key}", f"cluster.{key}={value!r} contains a line break; allowed: one line")
    one_of("cluster.mpi", cfg.cluster.mpi, CLUSTER_MPI)
    if ok("cluster.gpu_mem_gb") and cfg.cluster.gpu_mem_gb is not None:
        positive("cluster.gpu_mem_gb", cfg.cluster.gpu_mem_gb)
    at_least("cluster.signal_delay_s", cfg.cluster.signal_delay_s, 1)
    at_least("cluster.max_timeouts", cfg.cluster.max_timeouts, 0)
    if ok("cluster.signal_delay_s", "cluster.timeout_min") and cfg.cluster.signal_delay_s >= cfg.cluster.timeout_min * 60:
        fail("cluster.signal_delay_s", f"cluster.signal_delay_s={cfg.cluster.signal_delay_s} is not shorter than "
             f"cluster.timeout_min={cfg.cluster.timeout_min} minutes; allowed: < {cfg.cluster.timeout_min * 60}")
    if ok("runtime.device") and cfg.runtime.device == "cuda" and not cfg.cluster.request_gpus:
        fail("cluster.request_gpus", "cluster.request_gpus=False with runtime.device='cuda': the ranks would get no GPU; "
             "allowed: true, or runtime.device cpu/auto")
    return errors


def _units_known(cfg: RunConfig) -> bool:
    """Whether the block/clip length is known without the rank count (Video-Infinity derives a null
    ``strategy.clip_latent_frames`` from it: :func:`hpcvideo.layout.unit_latent_frames`)."""
    from ..layout import unit_latent_frames

    try:
        unit_latent_frames(cfg)
    except ValueError:
        return False
    return True


def _check_prompts(prompts: list[PromptEntry]) -> list[str]:
    if not prompts:
        return [
            "sampling.prompts=[] is empty; allowed: a non-empty list of {from_frame: INT, prompt: TEXT} starting at "
            "from_frame 0 (or the shorthand sampling.prompt: TEXT)"
        ]
    errors = []
    if prompts[0].from_frame != 0:
        errors.append(f"sampling.prompts[0].from_frame={prompts[0].from_frame} is not allowed; "
                      "allowed: 0 (the first prompt starts the video)")
    for i in range(1, len(prompts)):
        a, b = prompts[i - 1].from_frame, prompts[i].from_frame
        if b <= a:
            errors.append(
                f"sampling.prompts[{i}].from_frame={b} must be greater than sampling.prompts[{i - 1}].from_frame={a}: "
                "prompt schedule out of order"
            )
    for i, p in enumerate(prompts):
        if not p.prompt.strip():
            errors.append(f"sampling.prompts[{i}].prompt={p.prompt!r} is empty; allowed: a non-empty string")
    return errors


class ConfigWarning(UserWarning):
    """A config that runs but may not do what was meant; the CLI shows it once per job (the first process)."""


def _warn_unused_prompts(cfg: RunConfig) -> None:
    """Prompts switch at block starts: one warning for the schedule entries that no block of this video uses."""
    used = {cfg.prompt_index_for_block(j) for j in range(cfg.num_blocks)}
    unused = [(i, p) for i, p in enumerate(cfg.sampling.prompts) if i not in used]
    if not unused:
        return
    starts = [cfg.block_first_frame(j) for j in range(min(cfg.num_blocks, 8))]
    (i, p), more = unused[0], len(unused) - 1
    entries = f"sampling.prompts[{i}] (from_frame={p.from_frame})"
    if more:
        last, q = unused[-1]
        entries += f" and {more} more (up to sampling.prompts[{last}], from_frame={q.from_frame})"
    warnings.warn(
        f"{entries} {'are' if more else 'is'} used by no block of this video and ignored: "
        f"prompts switch at block starts (pixel frames {', '.join(map(str, starts))}"
        f"{', ...' if cfg.num_blocks > 8 else ''}; video.num_frames={cfg.video.num_frames})",
        ConfigWarning, stacklevel=4,
    )


def _check_paths(cfg: RunConfig, bad: set[str]) -> list[str]:
    """model.path exists as a diffusers folder; store.path is set and creatable. Creates nothing."""
    errors = []
    path = cfg.model.path
    if "model.path" not in bad and "model.family" not in bad and path == "demo" and cfg.model.family != "wan":
        errors.append(f"model.path='demo' is a Wan model; model.family={cfg.model.family!r} does not match "
                      "(allowed with model.path='demo': model.family='wan')")
    elif "model.path" not in bad and path == "demo" and not (DEMO_WEIGHTS_DIR / "model_index.json").is_file():
        errors.append(f"model.path='demo': the shipped demo weights are missing ({DEMO_WEIGHTS_DIR}); "
                      "reinstall hpcvideo or run `hpcvideo train-demo`")
    if "model.path" not in bad and path not in ("tiny", "demo"):
        allowed = ("allowed: 'tiny' (built-in tiny random-weight model), 'demo' (shipped trained demo model) "
                   "or a diffusers-format model folder containing model_index.json")
        p = Path(path)
        if not p.exists():
            where = f"relative paths are taken from {os.getcwd()}"
            errors.append(f"model.path={path!r} does not exist ({where}); {allowed}")
        elif not p.is_dir():
            errors.append(f"model.path={path!r} is not a directory; {allowed}")
        elif not (p / "model_index.json").is_file():
            errors.append(f"model.path={path!r} has no model_index.json (not a diffusers-format folder); {allowed}")
    from .condition_rules import path_problems  # condition.image: an existing image file

    errors += path_problems(cfg, bad)
    if "store.path" not in bad:
        if cfg.store.path is None:
            errors.append("store.path=None is not set: pass --output or set store.path "
                          "(allowed: a folder path such as runs/NAME.zarr)")
        else:
            problem = _store_path_problem(Path(cfg.store.path))
            if problem:
                allowed = "an existing run store folder or a new path in a writable directory"
                errors.append(f"store.path={cfg.store.path!r} {problem}; allowed: {allowed}")
    return errors


def _store_path_problem(p: Path) -> str | None:
    try:
        if p.exists():
            if not p.is_dir():
                return "exists and is not a directory"
            if not os.access(p, os.W_OK | os.X_OK):
                return "is a directory that is not writable"
            return None
        ancestor = p.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as e:
        return f"cannot be checked ({e})"
    if not ancestor.is_dir():
        return f"cannot be created: {str(ancestor)!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: nearest existing folder {str(ancestor)!r} is not writable"
    return None


def build(raw: Any, *, check_paths: bool, errors: Sequence[str] = ()) -> RunConfig:
    """The one place where a raw nested dict becomes a validated RunConfig (or one ConfigError)."""
    errors = list(errors)
    if not isinstance(raw, Mapping):
        raise ConfigError(errors + [_wrong_type("config", raw, f"a mapping with sections {', '.join(_SECTIONS)}")])
    bad: set[str] = set()
    for name in raw:
        if name not in _SECTIONS:
            errors.append(_unknown(str(name), list(_SECTIONS), None))
    sections = {name: _build_section(name, raw.get(name), errors, bad) for name in _SECTIONS}
    cfg = RunConfig(**sections)
    errors += _check_values(cfg, bad)
    if check_paths:
        errors += _check_paths(cfg, bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def validate_config(cfg: RunConfig, *, check_paths: bool = False) -> RunConfig:
    """Re-validate a RunConfig built or edited in code (round trip through :meth:`RunConfig.to_dict`)."""
    return build(cfg.to_dict(), check_paths=check_paths)

