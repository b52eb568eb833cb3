"""Config sources and overrides: presets, YAML files, dicts, ``key.path=value`` overrides -> :func:`load_config`."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .coerce import _unwrap_optional, _wrong_type
from .schema import _HINTS, _SECTIONS, PRESETS_DIR, ConfigError, RunConfig
from .validate import build



def list_presets() -> list[str]:
    """Names of the presets shipped in the package (``tiny-cpu`` for ``hpcvideo/configs/tiny-cpu.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError([f"config file {str(path)!r} cannot be read: {e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        sections = ", ".join(_SECTIONS)
        kind = type(data).__name__
        raise ConfigError([f"config file {str(path)!r} holds a {kind}; allowed: a mapping with sections {sections}"])
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: 'expected ',' or ']' (line 2, column 1)'."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(str(getattr(e, "problem", None) or e).split()) + where


def _read_source(source: Any) -> dict[str, Any]:
    if isinstance(source, RunConfig):
        return source.to_dict()
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return _read_yaml(path)
        name = os.fspath(source)
        name = name[: -len(".yaml")] if name.endswith(".yaml") else name
        preset = PRESETS_DIR / f"{name}.yaml"
        if "/" not in name and os.sep not in name and preset.is_file():
            return _read_yaml(preset)
        presets = ", ".join(list_presets())
        name = os.fspath(source)
        raise ConfigError([f"config source {name!r} is neither a YAML file nor a preset; presets: {presets}"])
    raise ConfigError([_wrong_type("config source", source, "a YAML path, a preset name or a dict")])


def _field_type(parts: Sequence[str]) -> Any:
    """Declared type of the dotted key, or None if it is not a field (``sampling.prompt`` is str)."""
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        return None
    if list(parts) == ["sampling", "prompt"]:
        return str
    return _HINTS[_SECTIONS[parts[0]]].get(parts[1])


def _apply_override(raw: dict[str, Any], text: Any, errors: list[str]) -> None:
    """Set ``key.path=value`` in ``raw``. The value is YAML; a str field keeps the raw text where YAML
    gives a non-string (``sampling.prompt=Night: a cat`` stays text, not a mapping)."""
    if not isinstance(text, str) or "=" not in text:
        errors.append(f"malformed override {text!r}; allowed: KEY.PATH=VALUE, e.g. sampling.seed=1")
        return
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        errors.append(f"malformed override {text!r}: empty key; allowed: KEY.PATH=VALUE, e.g. sampling.seed=1")
        return
    if len(parts) > 2 and _field_type(parts[:2]) is not None:
        errors.append(f"override {text!r}: '{'.'.join(parts[:2])}' is a value, not a section")
        return
    tp, optional = _unwrap_optional(_field_type(parts))
    try:
        value = yaml.safe_load(value_text)
        if tp is str and not isinstance(value, str) and not (value is None and optional):
            value = value_text.strip()
        if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
    except yaml.YAMLError as e:
        if tp is not str:
            errors.append(f"override {text!r}: the value is not valid YAML: {_yaml_problem(e)}")
            return
        value = value_text.strip()
    _set_dotted(raw, parts, value, errors)


def _set_dotted(raw: dict[str, Any], parts: Sequence[str], value: Any, errors: list[str]) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            errors.append(f"override of '{'.'.join(parts)}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            return
        node = child
    node[parts[-1]] = value
    if list(parts) == ["sampling", "prompt"]:  # a later prompt replaces an earlier schedule, and vice versa
        node.pop("prompts", None)
    elif list(parts) == ["sampling", "prompts"]:
        node.pop("prompt", None)


def load_config(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    num_frames: int | None = None,
    seed: int | None = None,
    output: str | os.PathLike | None = None,
    check_paths: bool = True,
) -> RunConfig:
    """Read, override and validate a run configuration.

    Args:
        source: a YAML file path, a preset name (``"tiny-cpu"`` -> ``hpcvideo/configs/tiny-cpu.yaml``, shipped in the package)
            or a nested dict. Missing sections and keys take their defaults.
        overrides: ``"key.path=value"`` strings, applied in order; the value is parsed as YAML
            (``sampling.guidance_scale=3`` -> 3). Setting ``sampling.prompt`` replaces a
            ``sampling.prompts`` schedule from the source, and vice versa.
        num_frames, seed, output: shortcuts for ``video.num_frames``, ``sampling.seed``, ``store.path``
            (applied after ``overrides``).
        check_paths: also check that ``model.path`` is "tiny" or a diffusers folder and that
            ``store.path`` is set and creatable (relative paths against the CWD; nothing is created).

    Raises:
        ConfigError: listing every problem, one per line.
    """
    raw = _read_source(source)
    errors: list[str] = []
    if isinstance(overrides, str):  # a lone "key=value" is one override, not a sequence of characters
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text, errors)
    for key, value in (("video.num_frames", num_frames), ("sampling.seed", seed), ("store.path", output)):
        if value is not None:
            _set_dotted(raw, key.split("."), os.fspath(value) if isinstance(value, os.PathLike) else value, errors)
    return build(raw, check_paths=check_paths, errors=errors)

