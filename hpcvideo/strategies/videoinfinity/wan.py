"""Video-Infinity on a Wan DiT (diffusers ``WanTransformer3DModel``): clip parallelism as sequence
parallelism with dual-scope 3-D self-attention, as a reversible patch.

Wan attends over all (frame, row, column) tokens at once; there are no temporal convolutions or
frame-spanning norms (patch embedding, LayerNorms, FFN and text cross-attention work per token). So
rank r holds the tokens of its clip (clip_frames latent frames x h/2 x w/2) and only the
self-attention of every block (``blocks[i].attn1``) talks to other ranks:

* queries: this clip's tokens;
* keys/values: the local window (the clip plus ``local_frames`` frames each side from the
  neighbours, cut at the video's ends) and the global set (:func:`.clips.global_frame_indices`),
  projected here from the exchanged processor *input* (D channels per token, half of K + V);
* a query token of frame f attends to local frames |f - k| <= local_frames and to all global
  frames: query frames are grouped by their key range, one ``dispatch_attention_fn`` call (SDPA)
  per group, so no token-level mask exists; the timestep bias is a (keys,) vector built once per
  layout and phase. In the global phase with ``exempt_own_frame`` the query frame's own tokens keep
  the favoured bias, so the bias differs per query frame: there every group is one query frame.

Rotary positions (Wan's 3-D RoPE; its frame axis gets a position per frame, rows/columns unchanged):

* queries and local keys keep their true video frame index f (shifted by a common offset, below).
  RoPE only sees differences, so every query-key pair inside the window has its true distance, and
  in exact mode (window = whole video, no global set; offset 0) the positions are those of the
  unsplit model, which is what makes the split forward equal to it.
* the G' global frames are placed, in video order, on the G' positions just before the local window
  of the query frame that reads them: for a query frame whose window starts at frame a, global i
  sits at a - G' + i. Their true distances to a query can be hundreds of frames, far beyond Wan's
  training span (21 latent frames) and its RoPE table; placed this way every query-key distance
  stays below G' + 2 * local_frames + 1, and the global frames read as a compact "memory" of the
  whole video just before the window. The placement depends on the query frame only, not on how the
  video is split, so the N-rank result equals the single-process executor. Global keys are
  therefore rotated once per group of query frames with the same window (cheap: G' frames).
* offset: with a global set all positions are shifted up by G' (RoPE sees differences only; this
  keeps a - G' + i >= 0); without one the offset is 0.

(The UNet3D family has no temporal positions, so there the question does not arise.)

``apply_video_infinity_wan(transformer, comm=..., scope=...)`` / ``remove_video_infinity_wan(transformer)``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ...models.wan import apply_rotary_emb
from .clips import ClipComm, DualScope
from .masks import phase

_STATE = "_video_infinity"


class _WanState:
    def __init__(self, transformer, comm: ClipComm, scope: DualScope) -> None:
        self.transformer = transformer
        self.comm = comm
        self.scope = scope
        self.timestep: float | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.rope: dict = {}
        self.plans: dict = {}

    def rotary(self, positions: tuple[int, ...]):
        """(cos, sin), each (1, len(positions) * tokens_per_frame, 1, head_dim): Wan's rope rows of
        these frame positions (cached per positions and latent size)."""
        key = (positions, self.latent_hw)
        if key not in self.rope:
            limit = self.transformer.config.rope_max_seq_len
            if max(positions) >= limit:
                raise ValueError(f"dual-scope attention needs rotary position {max(positions)}, beyond the model's "
                                 f"rope_max_seq_len={limit}")
            weight = self.transformer.patch_embedding.weight
            height, width = self.latent_hw
            probe = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(1, 1, max(positions) + 1, height, width)
            index = torch.tensor(positions, device=weight.device)
            tables = []
            for table in self.transformer.rope(probe):  # (1, P * hw, 1, d) -> (P, hw, d) -> rows of `positions`
                frames = table.view(max(positions) + 1, -1, table.shape[-1]).index_select(0, index)
                tables.append(frames.reshape(1, -1, 1, table.shape[-1]))
            self.rope[key] = tuple(tables)
        return self.rope[key]

    def plan(self, num_left: int, num_right: int, num_global: int, per_frame: bool = False):
        """Rotary positions and query groups of one layout: (query positions, local key positions,
        groups); a group is (q0, q1, a, b, global positions, own): clip-relative query frames [q0, q1)
        that see local key frames [a, b) (indices into the local keys) and the global set at the
        given positions; ``per_frame``: one query frame per group, ``own`` its index among the
        group's local keys (else None)."""
        key = (num_left, num_right, num_global, per_frame)
        if key not in self.plans:
            layout, width = self.comm.layout, self.scope.local_frames
            lo, hi = layout.start - num_left, layout.stop + num_right  # local key frames [lo, hi)
            offset = num_global
            query_pos = tuple(f + offset for f in range(layout.start, layout.stop))
            local_pos = tuple(f + offset for f in range(lo, hi))
            groups = []
            for f in range(layout.start, layout.stop):
                a, b = max(lo, f - width), min(hi, f + width + 1)
                q = f - layout.start
                if not per_frame and groups and groups[-1][2:4] == [a - lo, b - lo]:
                    groups[-1][1] = q + 1
                else:
                    global_pos = tuple(a - num_global + i + offset for i in range(num_global))
                    groups.append([q, q + 1, a - lo, b - lo, global_pos, f - a if per_frame else None])
            self.plans[key] = (query_pos, local_pos, [tuple(g) for g in groups])
        return self.plans[key]


def _pre_hook(state: _WanState):
    def hook(module, args, kwargs):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if hidden_states.shape[2] != state.comm.layout.clip_frames:
            raise ValueError(f"Video-Infinity Wan: latents have {hidden_states.shape[2]} frames; this rank's clip has "
                             f"{state.comm.layout.clip_frames}")
        state.latent_hw = tuple(hidden_states.shape[3:5])
        # per-token timesteps (expand_timesteps): a fixed frame's tokens are at 0, the step's timestep is the largest
        state.timestep = float(timestep.flatten().max()) if torch.is_tensor(timestep) else float(timestep)

    return hook


class DualScopeWanAttnProcessor:
    """Wan self-attention (``attn1``) over this clip's tokens with dual-scope keys (text-to-video only).
    Mirrors diffusers' ``WanAttnProcessor``; hidden_states (B, S, D) with S = clip_frames * h/2 * w/2."""

    def __init__(self, state: _WanState, stock) -> None:
        self.state = state
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise RuntimeError("DualScopeWanAttnProcessor is for Wan text-to-video self-attention (attn1) only")
        state, scope = self.state, self.state.scope
        batch, tokens, dim = hidden_states.shape
        clip_frames = state.comm.layout.clip_frames
        frames = hidden_states.view(batch, clip_frames, tokens // clip_frames, dim)  # (B, F, hw, D)
        left, right = state.comm.halo(frames, dim=1, before=scope.local_frames, after=scope.local_frames)
        glob = state.comm.global_frames(frames, dim=1, global_frames=scope.global_frames)
        num_left, num_right, num_global = left.shape[1], right.shape[1], glob.shape[1]
        hw = frames.shape[2]
        local = torch.cat([left, frames, right], dim=1).flatten(1, 2)  # (B, (nl + F + nr) * hw, D)
        context = torch.cat([local, glob.flatten(1, 2)], dim=1) if num_global else local  # + (B, G' * hw, D)

        if attn.fused_projections:
            raise RuntimeError("DualScopeWanAttnProcessor: fused QKV projections are not supported")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S, heads, d)
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))  # (B, S_k, heads, d)
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        num_local = local.shape[1]
        key, global_key = key[:, :num_local], key[:, num_local:]  # global keys: rotated per group below
        value, global_value = value[:, :num_local], value[:, num_local:]
        mask, per_frame = None, False
        if num_global:
            favoured = phase(scope, state.timestep)
            bias_global = scope.global_bias if favoured == "global" else 0.0
            bias_local = scope.global_bias if favoured == "local" else 0.0
            # global phase: the query frame's own tokens keep the favoured bias, so it differs per query frame
            per_frame = scope.exempt_own_frame and favoured == "global" and bias_global != 0.0
        query_pos, local_pos, groups = state.plan(num_left, num_right, num_global, per_frame)
        query = apply_rotary_emb(query, *state.rotary(query_pos))
        key = apply_rotary_emb(key, *state.rotary(local_pos))

        outs, rotated = [], {}
        for q0, q1, a, b, global_pos, own in groups:
            k, v = key[:, a * hw : b * hw], value[:, a * hw : b * hw]
            if num_global:
                if global_pos not in rotated:  # the global keys at the positions before this window
                    rotated[global_pos] = apply_rotary_emb(global_key, *state.rotary(global_pos))
                k = torch.cat([rotated[global_pos], k], dim=1)
                v = torch.cat([global_value, v], dim=1)
                mask = self._bias(hw, num_global, b - a, own, bias_global, bias_local, query)
            outs.append(dispatch_attention_fn(
                query[:, q0 * hw : q1 * hw], k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                backend=getattr(self.stock, "_attention_backend", None),
            ))
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _bias(self, hw: int, num_global: int, num_local: int, own: int | None, bias_global: float, bias_local: float,
              like: torch.Tensor):
        """(1, 1, 1, keys) logit bias of keys [global frames..., local frames...], hw tokens each; local frame
        ``own`` (the query frame itself, or None) gets ``bias_global``."""
        cache = self.state.plans
        key = ("bias", hw, num_global, num_local, own, bias_global, bias_local, like.dtype, like.device)
        if key not in cache:
            frames = torch.tensor([bias_global] * num_global + [bias_local] * num_local)
            if own is not None:
                frames[num_global + own] = bias_global
            bias = frames.repeat_interleave(hw)
            cache[key] = bias.to(device=like.device, dtype=like.dtype).view(1, 1, 1, -1)  # (1, 1, 1, keys)
        return cache[key]


def apply_video_infinity_wan(transformer, *, comm: ClipComm, scope: DualScope) -> None:
    """Patch a ``WanTransformer3DModel`` in place: ``transformer(latents, t, prompt_embeds)`` then takes
    this rank's clip, latents (B, C, clip_frames, h, w), and returns its noise_pred; all ranks call it in
    lock-step with the same timestep. Raises ValueError if already patched."""
    if hasattr(transformer, _STATE):
        raise ValueError("the transformer is already patched for Video-Infinity; call remove_video_infinity_wan first")
    state = _WanState(transformer, comm, scope)
    handle = transformer.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)
    for block in transformer.blocks:
        block.attn1.set_processor(DualScopeWanAttnProcessor(state, block.attn1.processor))
    setattr(transformer, _STATE, (state, handle))


def remove_video_infinity_wan(transformer) -> None:
    """Undo :func:`apply_video_infinity_wan` (a no-op on an unpatched model)."""
    if not hasattr(transformer, _STATE):
        return
    _, handle = getattr(transformer, _STATE)
    handle.remove()
    for block in transformer.blocks:
        if isinstance(block.attn1.processor, DualScopeWanAttnProcessor):
            block.attn1.set_processor(block.attn1.processor.stock)
    delattr(transformer, _STATE)
