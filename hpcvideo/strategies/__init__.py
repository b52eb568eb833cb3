"""Parallel strategies: each is an executor and a spec (:mod:`.base`) that :mod:`hpcvideo.runner` drives.

* :mod:`.dualparal` — DualParal: the block queue, layer-split pipeline stages (spec: :mod:`.dualparal.spec`).
* :mod:`.videoinfinity` — Video-Infinity: clip parallelism (executor and spec: :mod:`.videoinfinity.executor`).

:func:`spec_for` maps ``strategy.name`` to its spec; a new strategy adds its spec to :func:`specs`.
"""

from __future__ import annotations


def specs() -> dict:
    """Every registered strategy: name -> :class:`.base.StrategySpec` (imports the strategies)."""
    from .dualparal.spec import DualParalSpec
    from .videoinfinity.executor import VideoInfinitySpec

    return {spec.name: spec for spec in (DualParalSpec(), VideoInfinitySpec())}


def spec_for(cfg):
    """The :class:`.base.StrategySpec` of ``cfg.strategy.name``. Raises ValueError naming the allowed names."""
    registered = specs()
    try:
        return registered[cfg.strategy.name]
    except KeyError:
        raise ValueError(f"strategy.name={cfg.strategy.name!r}; allowed: {sorted(registered)}") from None
