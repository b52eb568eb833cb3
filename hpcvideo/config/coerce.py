"""Raw YAML values -> typed config sections: type coercion, unknown-key hints, prompt and cluster parsing.

Every function reports a problem as one line naming the dotted key, the value and what is allowed
(collected by :func:`hpcvideo.config.validate.build` into one :class:`ConfigError`); a key that fails
here gets its default and is recorded in ``bad`` so the value checks skip it.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Union, get_args, get_origin

from .schema import _HINTS, _SBATCH_OPTION_RE, _SECTIONS, SBATCH_OPTIONS_SET, PromptEntry, _valid_keys



def _unknown(key: str, valid: Sequence[str], section: str | None) -> str:
    """``unknown key 'video.num_frame' (did you mean 'video.num_frames'? valid keys in 'video': ...)``."""
    name = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(name)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    where = f"valid keys in '{section}'" if section else "valid sections"
    return f"unknown key '{key}' ({hint}{where}: {', '.join(valid)})"


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(get_args(tp))
    return tp, False


def _wrong_type(key: str, value: Any, allowed: str) -> str:
    return f"{key}={value!r} has the wrong type ({type(value).__name__}); allowed: {allowed}"


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(key: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    """(value converted to ``tp``, None) or (None, error). int rejects bool and non-integral floats."""
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None, None
    allowed = _TYPE_WORDS[tp] + (" or null" if optional else "")
    wrong = _wrong_type(key, value, allowed)
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, wrong)
    if tp is str:
        return (value, None) if isinstance(value, str) else (None, wrong)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, wrong
    if tp is int:
        if isinstance(value, float):
            if not value.is_integer():
                return None, f"{key}={value!r} is not a whole number; allowed: {allowed}"
            value = int(value)
        return value, None
    if not math.isfinite(value):
        return None, f"{key}={value!r} is not finite; allowed: a finite number"
    return float(value), None


def _parse_prompts(key: str, value: Any, errors: list[str]) -> list[PromptEntry] | None:
    """``[{from_frame: 0, prompt: ...}, ...]`` -> list of PromptEntry, or None (errors appended)."""
    form = "a list of {from_frame: INT, prompt: TEXT} entries"
    if not isinstance(value, (list, tuple)):
        errors.append(_wrong_type(key, value, form))
        return None
    entries, ok, valid = [], True, list(_HINTS[PromptEntry])
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, PromptEntry):
            item = asdict(item)
        if not isinstance(item, Mapping):
            errors.append(_wrong_type(where, item, "{from_frame: INT, prompt: TEXT}"))
            ok = False
            continue
        kwargs = {}
        for k, v in item.items():
            if k not in valid:
                errors.append(_unknown(f"{where}.{k}", valid, where))
                ok = False
                continue
            kwargs[k], err = _coerce(f"{where}.{k}", v, _HINTS[PromptEntry][k])
            if err:
                errors.append(err)
                ok = False
        for k in valid:
            if k not in item:
                errors.append(f"{where}.{k} is missing; allowed: {{from_frame: INT, prompt: TEXT}}")
                ok = False
        if ok:
            entries.append(PromptEntry(**kwargs))
    return entries if ok else None


def _build_section(name: str, value: Any, errors: list[str], bad: set[str]) -> Any:
    """One section dataclass from its raw mapping; bad keys get defaults and are recorded in ``bad``."""
    cls, valid = _SECTIONS[name], _valid_keys(name)
    if value is None:  # "video:" with nothing under it
        value = {}
    if not isinstance(value, Mapping):
        errors.append(_wrong_type(name, value, f"a mapping with keys {', '.join(valid)}"))
        bad.update(f"{name}.{k}" for k in valid)
        return cls()
    value = dict(value)
    if name == "sampling" and "prompt" in value:
        text = value.pop("prompt")
        if "prompts" in value:
            errors.append(
                f"sampling.prompt={text!r} and sampling.prompts are both given; allowed: one of them "
                "(sampling.prompt: TEXT is short for sampling.prompts: [{from_frame: 0, prompt: TEXT}])"
            )
            bad.add("sampling.prompts")
        elif not isinstance(text, str):
            errors.append(_wrong_type("sampling.prompt", text, "a string"))
            bad.add("sampling.prompts")
        else:
            value["prompts"] = [{"from_frame": 0, "prompt": text}]
    kwargs = {}
    for key, raw in value.items():
        dotted = f"{name}.{key}"
        if key not in _HINTS[cls]:
            errors.append(_unknown(dotted, valid, name))
            continue
        if dotted == "sampling.prompts":
            parsed, err = _parse_prompts(dotted, raw, errors), None
            if parsed is None:
                bad.add(dotted)
                continue
        elif dotted in ("cluster.setup", "cluster.sbatch_options"):
            parsed, err = _parse_cluster_list_or_map(dotted, raw)
        elif dotted == "runtime.stage_layers":
            parsed, err = raw, None
            if raw is not None and not (
                isinstance(raw, list) and raw and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in raw)
            ):
                parsed, err = None, _wrong_type(dotted, raw, "a list of positive integers (blocks per rank) or null")
        else:
            parsed, err = _coerce(dotted, raw, _HINTS[cls][key])
        if err:
            errors.append(err)
            bad.add(dotted)
            continue
        kwargs[key] = parsed
    return cls(**kwargs)



def _parse_cluster_list_or_map(key: str, raw: Any) -> tuple[Any, str | None]:
    """``cluster.setup``: a list of one-line shell commands; ``cluster.sbatch_options``: {option: value}
    where option is an sbatch long option without ``--`` that the cluster section does not set
    itself, and value is text, a number or true (a flag such as ``exclusive: true``)."""
    if key == "cluster.setup":
        allowed = "a list of one-line shell commands, e.g. ['module load cuda/12.4']"
        if not isinstance(raw, list) or not all(isinstance(line, str) for line in raw):
            return None, _wrong_type(key, raw, allowed)
        for i, line in enumerate(raw):
            if "\n" in line or "\r" in line or "\0" in line:
                return None, f"{key}[{i}]={line!r} contains a line break; allowed: {allowed}"
        return list(raw), None
    allowed = ("a mapping {option: value} of sbatch long options without '--' (e.g. {mail-type: END, exclusive: true}), "
               f"not one the cluster section sets ({', '.join(SBATCH_OPTIONS_SET)})")
    if not isinstance(raw, Mapping):
        return None, _wrong_type(key, raw, allowed)
    out = {}
    for option, value in raw.items():
        name = str(option).replace("_", "-")
        if not isinstance(option, str) or not _SBATCH_OPTION_RE.match(name):
            return None, f"{key}: option {option!r} is not an sbatch long option name; allowed: {allowed}"
        if name in SBATCH_OPTIONS_SET:
            return None, f"{key}: option {option!r} is set by the cluster section itself; allowed: {allowed}"
        if value is False or value is None or isinstance(value, (list, dict)) or (
            isinstance(value, str) and ("\n" in value or "\r" in value or "\0" in value)
        ):
            return None, f"{key}.{option}={value!r} is not allowed; allowed: one-line text, a number, or true for a flag"
        out[name] = value
    return out, None
