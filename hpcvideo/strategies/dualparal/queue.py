"""The DualParal block queue as a pure schedule (docs/DESIGN.md, section 6.1; arXiv 2505.21070, block-wise denoising).

Vocabulary: B = ``num_blocks``, T = ``num_inference_steps``, n = ``block_latent_frames``,
c = ``context_latent_frames``.

* Block j enters at tick j at pure noise and receives its step s (0-based) at tick j + s, so
  adjacent blocks are exactly one denoising step apart and block j leaves after tick j + T - 1.
  The run has B + T - 1 ticks; at most min(B, T) blocks are in flight.
* Within a tick blocks are processed newest to oldest. Every read sees the latents as they were at
  the start of the tick; the scheduler steps of a tick are applied after all its forwards.
* Input of block j = last c latent frames of block j-1 ++ block j (block j-1 is one step cleaner;
  when block j takes its last step, block j-1 has just left the queue and its final latents are
  used). Block 0 has no context.
* Feature cache: block j appends the self-attention K/V of the first c frames of block j+1 computed
  in the same tick (block j+1 is processed first). The last block of the video has no block j+1.
  With two experts (Wan2.2 A14B, ``step_experts``) blocks j and j+1 of one tick may be denoised by
  different experts (one step apart across the boundary); then j+1 records nothing and j appends
  nothing: K/V produced by one expert never enter the attention of the other.

This module decides *what* happens at a tick; executors (single process, or the multi-rank pipeline)
decide *where*. Both follow this plan, which is why they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BlockWork:
    """One block's work at one tick.

    ``step_index``: the step applied this tick (timesteps[step_index]); ``context_from``: block whose
    last c latent frames are prepended (None if none); ``record``: record K/V of this block's first c
    own frames for the older neighbour; ``append``: append the K/V block_index+1 recorded this tick;
    ``enters``/``finishes``: first/last tick of this block.
    """

    block_index: int
    step_index: int
    context_from: int | None
    record: bool
    append: bool
    enters: bool
    finishes: bool


def num_ticks(num_blocks: int, num_inference_steps: int) -> int:
    """Ticks of a whole run: B + T - 1."""
    return num_blocks + num_inference_steps - 1


def in_flight(tick: int, *, num_blocks: int, num_inference_steps: int) -> range:
    """Blocks processed at ``tick``, oldest first: j with j <= tick < j + T and j < B."""
    first = max(0, tick - num_inference_steps + 1)
    last = min(tick, num_blocks - 1)
    return range(first, last + 1)


def tick_plan(
    tick: int, *, num_blocks: int, num_inference_steps: int, context_latent_frames: int, feature_cache: bool,
    step_experts: Sequence[int] | None = None,
    initial_context: bool = False,
) -> list[BlockWork]:
    """The work of ``tick``, newest block first. ``step_experts``: the expert of each step index
    (:meth:`hpcvideo.models.experts.Experts.index` of its timestep; None: one expert); the feature cache
    links only blocks of the same expert. ``initial_context``: block 0 has a context too, the last
    frames of a video it continues (``context_from`` -1). Raises ValueError for a tick outside the run."""
    if not 0 <= tick < num_ticks(num_blocks, num_inference_steps):
        raise ValueError(f"tick={tick} outside the run's 0..{num_ticks(num_blocks, num_inference_steps) - 1}")
    blocks = in_flight(tick, num_blocks=num_blocks, num_inference_steps=num_inference_steps)
    cache = feature_cache and context_latent_frames > 0
    plan = []

    def same_expert(a: int, b: int) -> bool:  # blocks a and b of this tick (steps tick - a, tick - b)
        return step_experts is None or step_experts[tick - a] == step_experts[tick - b]

    for j in reversed(blocks):
        step_index = tick - j
        plan.append(
            BlockWork(
                block_index=j,
                step_index=step_index,
                context_from=j - 1 if ((j > 0 or initial_context) and context_latent_frames > 0) else None,
                record=cache and (j - 1) in blocks and same_expert(j, j - 1),
                append=cache and (j + 1) in blocks and same_expert(j, j + 1),
                enters=step_index == 0,
                finishes=step_index == num_inference_steps - 1,
            )
        )
    return plan
