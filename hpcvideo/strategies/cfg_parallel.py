"""CFG parallelism, a second parallel axis: the cond and uncond branches of classifier-free guidance on two
rank groups (``runtime.cfg_parallel: true``). The config rules here import no torch; the executor is
:class:`hpcvideo.strategies.dualparal.cfg_pipeline.CfgParallelPipeline`.

Rank layout (world_size 2G; each group is a full DualParal pipeline of G stages, split as on G ranks)::

    group 0, ranks 0 .. G-1      the cond branch of every block; rank 0 holds the queue (latents,
                                 schedulers, checkpoints, store), rank G-1 applies guidance
    group 1, ranks G .. 2G-1     the uncond branch of every block; stateless between ticks

Per item, rank 0 sends the block's window (1, C, c + n, h, w) in the compute dtype to rank G (which
patchifies it exactly as rank 0 does); rank 2G-1 sends its uncond head output (1, C, n, h, w) to rank
G-1, which computes ``noise_uncond + guidance_scale * (noise_cond - noise_uncond)`` from the same tensors
as one rank does and sends noise_pred to rank 0 as a plain pipeline does. So the result is bit-identical
to one rank; only group 0 keeps the queue, so checkpoints and resume are those of a plain pipeline.

Supported: strategy ``dualparal`` with guidance on (``sampling.guidance_scale`` > 1) on an even number
of ranks; ``runtime.stage_layers`` then gives the G counts of one group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RunConfig

STRATEGIES = ("dualparal",)  # strategy.name values that run with runtime.cfg_parallel


def check(cfg: RunConfig, ok: Callable[..., bool], fail: Callable[[str, str], None]) -> None:
    """``runtime.cfg_parallel`` against the rest of the config (no rank count): guidance must be on and the
    strategy one of :data:`STRATEGIES`. ``ok(*keys)``: none of the keys failed before; ``fail(key, message)``."""
    if not cfg.runtime.cfg_parallel:
        return
    s = cfg.sampling
    if ok("sampling.guidance_scale") and s.guidance_scale <= 1.0:
        fail("runtime.cfg_parallel",
             f"runtime.cfg_parallel=true needs classifier-free guidance, but sampling.guidance_scale={s.guidance_scale!r} "
             "disables it (one branch, nothing to split); allowed: sampling.guidance_scale > 1, or runtime.cfg_parallel=false")
    if ok("sampling.negative_prompt") and s.negative_prompt is None:
        fail("runtime.cfg_parallel",
             "runtime.cfg_parallel=true needs a negative prompt (the uncond branch), but sampling.negative_prompt is null; "
             "allowed: a string (\"\" for an empty one), or runtime.cfg_parallel=false")
    if ok("strategy.name") and cfg.strategy.name not in STRATEGIES:
        fail("runtime.cfg_parallel",
             f"runtime.cfg_parallel=true is not supported with strategy.name={cfg.strategy.name!r} yet; "
             f"allowed: strategy.name in {list(STRATEGIES)}, or runtime.cfg_parallel=false")


def group_size(cfg: RunConfig, world_size: int) -> int:
    """The ranks of one pipeline: ``world_size // 2`` with ``runtime.cfg_parallel``, else ``world_size``."""
    return world_size // 2 if cfg.runtime.cfg_parallel else world_size


def ranks_problem(cfg: RunConfig, world_size: int) -> str | None:
    """None if ``world_size`` splits into the two branch groups (or ``runtime.cfg_parallel`` is off), else one line."""
    if cfg.runtime.cfg_parallel and world_size % 2:
        return (f"runtime.cfg_parallel=true splits the ranks into two equal groups (cond, uncond), but the job has "
                f"{world_size} rank(s); allowed: an even number of ranks >= 2, or runtime.cfg_parallel=false")
    return None
