"""The run configuration: a typed tree of kw_only dataclasses, read from YAML, validated once.

Sources, in order of application (later wins)::

    preset or YAML file or dict  ->  overrides "key.path=value"  ->  num_frames / seed / output

Every value is checked before anything heavy happens (no torch import in this package, so a SLURM
submit fails fast on the login node). All problems are collected and raised together as one
:class:`ConfigError`, one line each, naming the dotted key, the value given and what is allowed::

    video.num_frames=0 is out of range; allowed: any whole number >= 1

Who owns what:

* :mod:`.schema`: the dataclasses (every key, its default, units and allowed values), the allowed
  names (:data:`STRATEGIES`, :data:`MODEL_FAMILIES`, :data:`DTYPES`, :data:`SCHEDULERS`, ...; the
  modules that act on them import them from here), :class:`ConfigError`, :class:`RunConfig` and its
  derived values (the frame arithmetic itself is :mod:`hpcvideo.layout`).
* :mod:`.coerce`: raw YAML values -> typed sections (types, unknown keys, prompt schedules, cluster lists).
* :mod:`.validate`: value and cross-field rules, path checks, :func:`validate_config`; each strategy's
  own rules are ``hpcvideo/strategies/<name>/config_rules.py``. The checks that need the model's JSON
  configs and the rank count are :func:`hpcvideo.check.validate_for_model`.
* :mod:`.load`: presets, YAML files, overrides -> :func:`load_config`.
* :mod:`.identity`: what must match between a run store and the command that resumes it
  (:data:`IDENTITY_IGNORED`, :func:`config_diff`).

Frame arithmetic (:mod:`hpcvideo.layout`; Wan VAE: the first pixel frame alone, then 4 pixel frames per
latent frame). Any num_frames >= 1; the strategy generates whole blocks and the store keeps num_frames::

    num_latent_frames = ceil((num_frames - 1) / 4) + 1        (unet3d: num_frames)
    num_blocks        = ceil(num_latent_frames / block_latent_frames)
    block j covers latent frames [j*n, (j+1)*n); its first pixel frame is 0 (j = 0) or 4*(j*n - 1) + 1

The config object is plain data: treat it as read-only after :func:`load_config` (to change a value,
load again with an override, or ``RunConfig.from_dict`` an edited ``to_dict()``, which re-validates).
"""

from __future__ import annotations

from .identity import IDENTITY_IGNORED, MISSING, config_diff, format_diff, identity_dict
from .load import list_presets, load_config
from .schema import (
    CLUSTER_MPI,
    DEMO_WEIGHTS_DIR,
    DEVICES,
    DTYPES,
    MODEL_FAMILIES,
    NOISE_MODES,
    PRESETS_DIR,
    SBATCH_OPTIONS_SET,
    SCHEDULERS,
    SEED_LIMIT,
    STRATEGIES,
    UNET3D_SCHEDULERS,
    WAN_NEGATIVE_PROMPT,
    ClusterConfig,
    ConfigError,
    ModelConfig,
    PromptEntry,
    RunConfig,
    RuntimeConfig,
    SamplingConfig,
    StoreConfig,
    StrategyConfig,
    VideoConfig,
)
from .validate import validate_config

__all__ = [
    "ConfigError", "PromptEntry", "ModelConfig", "VideoConfig", "SamplingConfig", "StrategyConfig",
    "StoreConfig", "RuntimeConfig", "ClusterConfig", "RunConfig", "load_config", "validate_config",
    "list_presets", "config_diff", "identity_dict", "format_diff", "IDENTITY_IGNORED", "PRESETS_DIR",
    "MISSING",
    # the allowed names of the enumerated keys (defined once here; the modules that act on them import them)
    "STRATEGIES", "MODEL_FAMILIES", "DTYPES", "SCHEDULERS", "UNET3D_SCHEDULERS", "NOISE_MODES", "DEVICES", "CLUSTER_MPI",
    "SBATCH_OPTIONS_SET", "SEED_LIMIT", "WAN_NEGATIVE_PROMPT", "DEMO_WEIGHTS_DIR",
]
