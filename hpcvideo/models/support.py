"""What a model folder may name that hpcvideo does not use: refused by name, before any work.

A diffusers folder names its pipeline's components and options in ``model_index.json`` (and the
denoiser's options in its ``config.json``). Running such a folder with part of the model (e.g. only
``transformer/`` of a two-expert Wan2.2, or a Wan image-to-video folder without its image) gives a
wrong video that nothing flags, so every entry hpcvideo does not use is refused by its name.

* :data:`REFUSED` — the one list of what is refused by name, with what each is: ``model_index.json``
  entries, denoiser ``config.json`` keys and pipeline classes. An entry counts as *named* when it is
  set: a component other than ``[null, null]``, an option other than ``null``/``false``/absent. When
  support for one lands, its name leaves this list (and nothing else changes).
* :data:`KNOWN` / :data:`KNOWN_PIPELINES` — per family, the ``model_index.json`` entries and pipeline
  classes hpcvideo knows (used, or refused above); anything else a folder sets (a component or
  pipeline hpcvideo has never heard of) is refused too.

:func:`refused` lists the problems of a folder (one line each, naming the entry, its value and what
is allowed); :func:`check_supported` raises :class:`UnsupportedModelError` with all of them.
Reads JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.schema import ConfigError

# What a folder may name that hpcvideo does not use yet: name -> what it is (for the message).
# model_index.json entries, denoiser config.json keys and pipeline classes share the list (no name collides).
REFUSED: dict[str, str] = {
    "pos_embed_seq_len": "the two-image position embedding of a Wan first-last-frame (FLF2V) transformer",
}

# model_index.json entries hpcvideo knows, per family (besides the "_"-prefixed metadata): used unless in REFUSED.
KNOWN: dict[str, tuple[str, ...]] = {
    "wan": ("transformer", "transformer_2", "boundary_ratio", "vae", "text_encoder", "tokenizer", "scheduler",
            "expand_timesteps", "image_encoder", "image_processor"),
    "unet3d": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
}

# Pipeline classes (model_index.json "_class_name") hpcvideo knows, per family: run unless in REFUSED.
KNOWN_PIPELINES: dict[str, tuple[str, ...]] = {
    "wan": ("WanPipeline", "WanImageToVideoPipeline"),
    "unet3d": ("TextToVideoSDPipeline", "VideoToVideoSDPipeline"),
}

# The denoiser subfolders whose config.json is checked against REFUSED, per family.
DENOISERS: dict[str, tuple[str, ...]] = {"wan": ("transformer", "transformer_2"), "unet3d": ("unet",)}


class UnsupportedModelError(ConfigError):
    """A model folder names components or options hpcvideo does not use: a user error (a ConfigError, so a
    ValueError) whose ``errors`` say each by name, one line each."""


def is_set(value) -> bool:
    """A model_index.json entry is set: not null/false/absent, and a component other than [null, null]."""
    if isinstance(value, (list, tuple)):
        return any(v is not None for v in value)
    return value is not None and value is not False


def _read(file: Path) -> dict:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def refused(path, family: str) -> list[str]:
    """Problems of the ``family`` folder ``path`` (JSON only): each set entry of its model_index.json or
    denoiser configs that hpcvideo does not use, by name. [] when everything it names is used.
    A folder without model_index.json is judged by its configs only."""
    path = Path(path)
    problems = []
    index_file = path / "model_index.json"
    index = _read(index_file) if index_file.is_file() else {}
    where = f"model.path={str(path)!r}"
    name = index.get("_class_name")
    allowed = [p for p in KNOWN_PIPELINES.get(family, ()) if p not in REFUSED]
    if name is not None and allowed and name not in allowed:
        what = f" ({REFUSED[name]})" if name in REFUSED else ""
        problems.append(f"{where}: model_index.json names the pipeline {name!r}{what}, which hpcvideo does not "
                        f"run; allowed for model.family={family!r}: {', '.join(allowed)}")
    for key, value in index.items():
        if key.startswith("_") or not is_set(value) or (key in KNOWN.get(family, ()) and key not in REFUSED):
            continue
        what = REFUSED.get(key, "a component hpcvideo does not know")
        problems.append(f"{where}: model_index.json sets {key}={json.dumps(value)}: {what}, which hpcvideo does not "
                        f"support; allowed: a folder that does not set {key}")
    for sub in DENOISERS.get(family, ()):
        config_file = path / sub / "config.json"
        if not config_file.is_file() or (sub != DENOISERS[family][0] and not is_set(index.get(sub))):
            continue
        config = _read(config_file)
        for key, what in REFUSED.items():
            if is_set(config.get(key)):
                problems.append(f"{where}: {sub}/config.json sets {key}={json.dumps(config[key])}: {what}, which "
                                f"hpcvideo does not support; allowed: null")
    return problems


def check_supported(path, family: str) -> None:
    """Raise :class:`UnsupportedModelError` listing :func:`refused` (nothing when the folder is supported)."""
    problems = refused(path, family)
    if problems:
        raise UnsupportedModelError(problems)
