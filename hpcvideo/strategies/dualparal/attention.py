"""DualParal's feature cache as a reversible patch of the Wan self-attention processors.

Feature cache (arXiv 2505.21070; official ``DualParal_WanAttnProcessor``): within one tick the
blocks are processed newest to oldest. While block j+1 runs, every self-attention layer records the
keys/values of its first ``context_latent_frames`` own frames; when block j runs next, those are
appended to block j's keys/values, placed at the rotary positions right after block j's window (they
are the frames that follow it in the video). Queries are unchanged, so the output length is the
window's.

Differences from the official code, on purpose: keys are recorded after ``norm_k`` (a per-token RMS
norm, so this equals recording before it) and before RoPE; the cache is kept per CFG branch
(cond/uncond forwards are separate here, as in diffusers' WanPipeline) and per expert (Wan2.2 A14B:
the queue links only blocks of the same expert, :func:`.queue.tick_plan`); and which block's K/V a
forward sees is fixed by the queue semantics, never by message timing.

``apply_feature_cache(transformer, cache)`` swaps the processor of every ``blocks[i].attn1`` present
on this rank; ``remove_feature_cache(transformer)`` restores the stock ones. When a forward neither
records nor appends, the stock diffusers processor runs, so such forwards equal diffusers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ...models.wan import apply_rotary_emb


@dataclass(kw_only=True)
class CachePlan:
    """What the next forward does with the cache.

    ``branch``: "cond" or "uncond". ``record_tokens``: (start, stop) token range of the frames whose
    K/V to record for the older neighbour, or None. ``append``: append the K/V recorded by the newer
    neighbour. ``key_rotary_emb``: rotary (cos, sin) for window + appended frames when appending.
    """

    branch: str
    record_tokens: tuple[int, int] | None = None
    append: bool = False
    key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None


class FeatureCache:
    """K/V of one block's first context frames, per (branch, layer), for the block processed next.

    Lifetime: ``begin_tick()`` clears it; ``end_block()`` after all branches of a block hands what
    that block recorded to the next (older) block. Memory: 2 (K, V) x branches x layers on this stage
    x c * tokens_per_frame x hidden_dim elements, independent of the video's length.
    """

    def __init__(self) -> None:
        self.plan: CachePlan | None = None
        self.incoming: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.outgoing: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_tick(self) -> None:
        self.plan = None
        self.incoming = {}
        self.outgoing = {}

    def end_block(self) -> None:
        self.plan = None
        self.incoming, self.outgoing = self.outgoing, {}

    def has_incoming(self, branch: str) -> bool:
        return any(key[0] == branch for key in self.incoming)


class FeatureCacheAttnProcessor:
    """Self-attention processor of one layer with the feature cache (text-to-video, no I2V branch)."""

    def __init__(self, layer_index: int, cache: FeatureCache, stock, expert: int = 0) -> None:
        self.layer_index = layer_index
        self.cache = cache
        self.stock = stock
        self.expert = expert  # which transformer this layer belongs to: slots never cross experts

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        plan = self.cache.plan
        if plan is None or (plan.record_tokens is None and not plan.append):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("FeatureCacheAttnProcessor is for self-attention without mask (Wan attn1)")

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        # (B, S, heads * head_dim) -> (B, S, heads, head_dim)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        slot = (plan.branch, self.layer_index) if self.expert == 0 else (plan.branch, self.layer_index, self.expert)
        if plan.record_tokens is not None:
            start, stop = plan.record_tokens
            self.cache.outgoing[slot] = (key[:, start:stop].clone(), value[:, start:stop].clone())
        key_rotary_emb = rotary_emb
        if plan.append:
            cached_key, cached_value = self.cache.incoming[slot]
            # (B, S, heads, head_dim) ++ (B, S_cache, heads, head_dim) along tokens
            key = torch.cat([key, cached_key], dim=1)
            value = torch.cat([value, cached_value], dim=1)
            key_rotary_emb = plan.key_rotary_emb

        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *key_rotary_emb)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=getattr(self.stock, "_attention_backend", None),
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def apply_feature_cache(transformer, cache: FeatureCache, expert: int = 0) -> None:
    """Install the feature-cache processor on each present ``blocks[i].attn1`` (idempotent). ``expert``: the
    transformer's index among the model's experts (:mod:`hpcvideo.models.experts`); K/V recorded by one
    expert's layers are kept under its index, so the other expert's layers never read them."""
    for index, block in enumerate(transformer.blocks):
        if not hasattr(block, "attn1"):  # a block another pipeline stage owns
            continue
        processor = block.attn1.processor
        if isinstance(processor, FeatureCacheAttnProcessor):
            processor = processor.stock
        block.attn1.set_processor(FeatureCacheAttnProcessor(index, cache, processor, expert))


def remove_feature_cache(transformer) -> None:
    """Restore the stock processors replaced by :func:`apply_feature_cache`."""
    for block in transformer.blocks:
        if not hasattr(block, "attn1"):
            continue
        processor = block.attn1.processor
        if isinstance(processor, FeatureCacheAttnProcessor):
            block.attn1.set_processor(processor.stock)
