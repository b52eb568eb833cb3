"""``hpcvideo plan`` with ``runtime.cfg_parallel`` (DualParal): two pipelines of G = world_size / 2 stages,
group 0 (ranks 0 .. G-1) the cond branch, group 1 (ranks G .. 2G-1) the uncond branch
(:mod:`hpcvideo.strategies.cfg_parallel`).

:func:`hpcvideo.plan.make_plan` plans group 0 as a G-stage pipeline of one CFG branch (g = 1); this adds
group 1 and the two streams between the groups (C latent channels, n block and c context latent frames,
h x w latents, b bytes per element of ``model.dtype``, per item of a tick):

    rank 0   -> rank G      the window, C (c_ctx + n) h w b
    rank 2G-1 -> rank G-1   the uncond head output, C n h w b

Group 1's ranks hold the same stage weights, activations and caches as group 0's; no VAE, text encoder
or queue state (rank G holds the tick's incoming windows instead of hidden states).
"""

from __future__ import annotations

from dataclasses import replace

from .config import ConfigError
from .plan import QUEUE_TENSORS_PER_BLOCK
from .strategies.cfg_parallel import ranks_problem
from .strategies.dualparal.queue import tick_plan


def check_ranks(cfg, num_ranks: int) -> None:
    """ConfigError when ``num_ranks`` does not split into the two branch groups."""
    problem = ranks_problem(cfg, num_ranks)
    if problem:
        raise ConfigError([problem])


def _window_bytes(work, cfg, latent_shape, dtype_bytes: int) -> int:
    channels, height, width = latent_shape
    st = cfg.strategy
    frames = (st.context_latent_frames if work.context_from is not None else 0) + st.block_latent_frames
    return channels * frames * height * width * dtype_bytes


def add_uncond_group(plan, cfg, *, items, num_ticks_: int, latent_shape: tuple[int, int, int], dtype_bytes: int) -> None:
    """Append group 1's ranks to ``plan`` (whose ranks are group 0's) and add the cross-group streams to the
    senders' bytes. ``items``: the steady-state tick's work list; ``num_ticks_``: the run's ticks."""
    st, s = cfg.strategy, cfg.sampling
    channels, height, width = latent_shape
    group0 = list(plan.ranks)
    size = len(group0)
    window_tick = sum(_window_bytes(w, cfg, latent_shape, dtype_bytes) for w in items)
    window_total = sum(
        _window_bytes(w, cfg, latent_shape, dtype_bytes)
        for t in range(num_ticks_)
        for w in tick_plan(t, num_blocks=cfg.num_blocks, num_inference_steps=s.num_inference_steps,
                           context_latent_frames=st.context_latent_frames, feature_cache=st.feature_cache))
    uncond_item = channels * st.block_latent_frames * height * width * dtype_bytes
    uncond_tick = len(items) * uncond_item
    uncond_total = cfg.num_blocks * s.num_inference_steps * uncond_item  # one per (block, step)
    queue_step = QUEUE_TENSORS_PER_BLOCK.get(s.scheduler, 4) * channels * st.block_latent_frames * height * width * 4
    blocks_in_flight = plan.blocks_in_flight
    for r, rank in enumerate(group0):
        peer = replace(
            rank, rank=size + r, vae_bytes=0, text_encoder_bytes=0, text_encoder_activations_bytes=0,
            sent_bytes_per_tick=rank.sent_bytes_per_tick if r < size - 1 else uncond_tick,
            sent_bytes_total=rank.sent_bytes_total if r < size - 1 else uncond_total,
        )
        if r == 0:  # stage 0 of group 1: no queue; the tick's incoming windows
            peer = replace(peer, activations_bytes=rank.activations_bytes - queue_step, queue_bytes=blocks_in_flight * max(
                (_window_bytes(w, cfg, latent_shape, dtype_bytes) for w in items), default=0))
        plan.ranks.append(peer)
    first = group0[0]
    plan.ranks[0] = replace(first, sent_bytes_per_tick=first.sent_bytes_per_tick + window_tick,
                            sent_bytes_total=first.sent_bytes_total + window_total)
