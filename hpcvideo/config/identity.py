"""Run identity: which config keys must match between a run store and the command that resumes or extends it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

MISSING = "<missing>"
IDENTITY_IGNORED = ("video.num_frames", "store", "runtime", "cluster", "model.text_encoder_device")
"""Keys that may differ between a run store and the command that resumes or extends it."""


PREDATED = {"videoinfinity": {"strategy": {"switch_fraction": None, "exempt_own_frame": False}}}
"""Per ``strategy.name``: keys added after stores of that strategy were made whose default is not what such a
store ran with, and the value it ran with (a Video-Infinity store made before ``strategy.switch_fraction``
switched at ``strategy.switch_timestep`` and lowered the query frame's own tokens in the global phase). Such a
store resumes with those values (and the same bits) and is refused with the new defaults."""


def store_defaults(store_config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What a key absent from ``store_config`` (a stored run config) means: ``defaults`` (a nested dict, e.g.
    ``RunConfig().to_dict()``) with the :data:`PREDATED` values of the store's strategy."""
    out = copy.deepcopy(dict(defaults))
    strategy = store_config.get("strategy") if isinstance(store_config, Mapping) else None
    name = strategy.get("name", out.get("strategy", {}).get("name")) if isinstance(strategy, Mapping) else None
    for section, values in PREDATED.get(name, {}).items():
        out[section] = {**out.get(section, {}), **values}
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == i or key.startswith(i + ".") for i in ignore)


def config_diff(
    a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = (), *, defaults: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """Differing dotted keys of two nested dicts, sorted: ``[(key, a_value, b_value), ...]``.

    Lists are compared as whole values; a key absent on one side takes its value from ``defaults``
    (a nested dict, e.g. ``RunConfig().to_dict()``: a store written before a key existed ran with its
    default) or else shows as ``"<missing>"``; ``ignore`` holds dotted keys or section names
    (``"store"`` ignores ``store.path`` etc.).
    """
    ignore = tuple(ignore)
    fa, fb = _flatten(a), _flatten(b)
    fd = _flatten(defaults) if defaults is not None else {}
    diff = []
    for key in sorted(fa.keys() | fb.keys()):
        if _is_ignored(key, ignore):
            continue
        va, vb = fa.get(key, fd.get(key, MISSING)), fb.get(key, fd.get(key, MISSING))
        if (key in fa) != (key in fb) and key in fd:
            if va != vb:
                diff.append((key, va, vb))
            continue
        if va != vb or (key in fa) != (key in fb):
            diff.append((key, va, vb))
    return diff


def identity_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``d`` without the keys of :data:`IDENTITY_IGNORED` (what must match to resume)."""
    out = copy.deepcopy(dict(d))
    for key in IDENTITY_IGNORED:
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def format_diff(diff: Iterable[tuple[str, Any, Any]]) -> str:
    """One line per key: ``  sampling.seed: store has 0, command has 1``."""

    def show(v: Any) -> str:
        return v if v == MISSING else repr(v)

    return "\n".join(f"  {key}: store has {show(a)}, command has {show(b)}" for key, a, b in diff)

