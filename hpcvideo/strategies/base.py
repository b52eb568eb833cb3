"""What a parallel strategy gives the runner: an executor (the denoising state machine of one rank) and a
spec (its config checks without weights, its store layout, and the builder of its executor and sink).

The runner (:mod:`hpcvideo.runner`) owns everything strategies share — preparation on rank 0, the
store, prompt encoding, resume, checkpoints, preemption, heartbeats, timings — and drives any
executor the same way::

    while not executor.done:                       # at a tick boundary
        (checkpoint / preemption / cadence, decided by the runner)
        for unit, latents in executor.run_tick():  # one tick: the strategy's diffusers loop
            sink.submit(unit, latents)

A *unit* is what the store keeps as one chunk with a done marker: a block (DualParal) or a clip
(Video-Infinity); ``num_units`` of them, ``spec.unit_latent_frames(cfg)`` latent frames each. A third
strategy is an :class:`Executor` + a :class:`StrategySpec` registered in :func:`hpcvideo.strategies.specs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..faults import NO_FAULTS, FaultPlan


class Executor(Protocol):
    """The denoising state of one rank, advanced one tick at a time.

    ``tick``: ticks run so far (a tick is the strategy's unit of lock-step work); ``num_ticks``: ticks of
    the whole run; ``done``: every tick run and every pending step applied; ``num_units``: store units
    (blocks, clips) of the run. ``extend_tick``: the tick whose state is also a state of any longer run
    (saved as the "extend" checkpoint), or None when the strategy cannot extend a run. ``stale_from``:
    the first unit that is (re)produced after the current tick (its done markers are cleared when the
    run resumes here). ``stats``: per-rank numbers for the store's ``rank_stats``.
    """

    tick: int
    num_ticks: int
    done: bool
    num_units: int
    extend_tick: int | None
    stale_from: int
    stats: dict

    def run_tick(self) -> list[tuple[int, torch.Tensor]]:
        """Run one tick; returns the units (index, latents (1, C, F, h, w) float32) finished meanwhile."""

    def drain(self) -> list[tuple[int, torch.Tensor]]:
        """Complete everything issued; returns the units finished meanwhile. After it the state is the
        one at the start of tick ``tick`` (as :meth:`state_dict` needs)."""

    def state_dict(self) -> dict:
        """This rank's state at a tick boundary (CPU tensors, ``torch.load(weights_only=True)``-safe)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state of :meth:`state_dict` (this rank's)."""

    def close(self) -> None:
        """Undo the model patches this executor applied."""


class Sink(Protocol):
    """Where finished units go: latents and frames into the store (data first, done marker second).

    ``submit`` takes a finished unit; ``flush`` waits until what was submitted is on disk (before a
    checkpoint); ``finish`` writes what waits for the end of the run (collective where the sink gathers);
    ``close`` releases threads (also after an error, never collective). ``decode_s``/``wait_s``/``write_s``:
    seconds decoding, blocked on the store, writing. ``state_dict``: what a checkpoint keeps (the
    streaming decoder's carry) or None. Optional: ``poll()``, called on every rank after each tick (a sink
    that decodes on every rank, :mod:`hpcvideo.parallel_decode`), and ``stats`` (a dict merged into the
    rank's ``rank_stats``).
    """

    decode_s: float
    wait_s: float
    write_s: float

    def submit(self, unit: int, latents: torch.Tensor) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclass(kw_only=True)
class BuildContext:
    """What the runner hands a strategy's builder on each rank.

    ``family``: :class:`hpcvideo.models.family.ModelFamily`; ``model_path``/``info``: the model folder
    and its JSON facts (``family.info``); ``prompt_embeds``: [(1, L, D) per prompt of the schedule] and
    ``negative_prompt_embeds`` (1, L, D) or None, on ``env.device``; ``store``: the run store on the ranks
    that write (rank 0, or every rank when ``spec.every_rank_writes``), else None; ``plan``: what the
    spec's :meth:`StrategySpec.plan` computed on rank 0 (broadcast); ``faults``: the tests' planned fault
    (:class:`hpcvideo.faults.FaultPlan`, read once at the edge), for the sink to fire where it writes.
    """

    cfg: Any
    env: Any
    family: Any
    model_path: Path
    info: dict
    dtype: torch.dtype
    prompt_embeds: list[torch.Tensor]
    negative_prompt_embeds: torch.Tensor | None
    store: Any
    plan: Any = None
    run_attrs: dict = field(default_factory=dict)  # store attrs the builder wants written at the start (rank 0)
    faults: FaultPlan = NO_FAULTS


class StrategySpec:
    """One strategy: its checks, its store layout and its builder.

    ``name``: the ``strategy.name`` value (``title``: its name in messages). ``every_rank_writes``: every rank holds executor state (the
    runner gathers it for a checkpoint and scatters it on resume, and rank 0's checkpoint decision is
    broadcast) and writes its own units; otherwise rank 0 alone holds the state and writes.
    ``extendable``: a larger ``video.num_frames`` on an existing store grows it (the executor's
    ``extend_tick`` state continues it); otherwise the frame count of a store is fixed.
    """

    name: str = ""
    title: str = ""  # for messages, e.g. "Video-Infinity"
    every_rank_writes: bool = False
    extendable: bool = False

    def unit_latent_frames(self, cfg) -> int:
        """Latent frames per store unit (the store's block length)."""
        raise NotImplementedError

    def problems(self, cfg, family, info: dict, world_size: int) -> list[str]:
        """What stops ``cfg`` from running on ``world_size`` ranks with this model (JSON facts ``info``,
        no weights): one message per problem, naming the key, the value and what is allowed."""
        raise NotImplementedError

    def plan(self, cfg, info: dict, world_size: int) -> Any:
        """Rank 0's picklable decisions every rank builds from (e.g. the stage split); default None."""
        return None

    def build(self, ctx: BuildContext) -> tuple[Executor, Sink | None]:
        """Load this rank's part of the model and make its executor, and its sink on the ranks that write."""
        raise NotImplementedError
