"""Video-Infinity on a diffusers ``UNet3DConditionModel`` (ModelScope/Zeroscope/VideoCrafter2 layout):
clip parallelism + dual-scope temporal attention as a reversible patch (arXiv 2406.16260 §3).

What is patched (found by class, every instance in the model):

* ``TemporalConvLayer`` (4 stacked (3,1,1) convs, receptive field +-4 frames): its forward gets an
  exact halo of 4 frames from the neighbouring clips (none at the video's true ends, where the stock
  zero padding of the convs applies as in the unsplit model); its GroupNorms use video-wide stats.
* ``TransformerTemporalModel``: its input ``norm`` (a GroupNorm over frames) uses video-wide stats;
  every self-attention of its blocks (``attn1``, ``attn2``: both attend over frames) gets the
  dual-scope processor: keys/values = local window (clip + ``local_frames`` halo each side) and the
  global set, one ``scaled_dot_product_attention`` with a frame mask cached per layout and phase.
  The halo and global frames exchanged are the processor's *input* hidden states (C channels), not
  K and V (2 x C as in the released code): half the bytes; K/V of those frames are projected here.
* the UNet itself: a forward pre-hook records the timestep (for the phase of the bias).

Spatial layers (2-D resnets, spatial transformers, conv_in/out) work per frame and are untouched.

``apply_video_infinity_unet3d(unet, comm=..., scope=...)`` / ``remove_video_infinity_unet3d(unet)``.
With a world-1 :class:`~.clips.ClipComm` whose clip is the whole video, the patched model is the
single-process executor of the same algorithm (:mod:`.reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .clips import ClipComm, DualScope, clip_group_norm
from .masks import frame_mask, phase

_STATE = "_video_infinity"


class _State:
    def __init__(self, comm: ClipComm, scope: DualScope) -> None:
        self.comm = comm
        self.scope = scope
        self.timestep: float | None = None
        self.masks: dict = {}

    def mask(self, num_left: int, num_right: int, num_global: int, *, device, dtype):
        layout = self.comm.layout
        which = phase(self.scope, self.timestep) if num_global else "-"
        key = (num_left, num_right, num_global, which, device, dtype)
        if key not in self.masks:
            queries = range(layout.start, layout.stop)
            local = range(layout.start - num_left, layout.stop + num_right)
            self.masks[key] = frame_mask(queries, local, num_global, self.scope, which, device=device, dtype=dtype)
        return self.masks[key]


def _timestep_hook(state: _State):
    def hook(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)

    return hook


class ClipGroupNorm(torch.nn.Module):
    """Stands in for a frame-spanning GroupNorm: same parameters, video-wide statistics. x: (B, C, F, H, W)."""

    def __init__(self, stock: torch.nn.GroupNorm, state: _State) -> None:
        super().__init__()
        self.stock = stock
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clip_group_norm(x, self.stock, self._state.comm)


def _temporal_conv_forward(layer, state: _State):
    """``TemporalConvLayer.forward`` on a clip with halos (mirrors diffusers' resnet.TemporalConvLayer)."""
    stages = (layer.conv1, layer.conv2, layer.conv3, layer.conv4)
    reach = sum((m.kernel_size[0] - 1) // 2 for s in stages for m in s if isinstance(m, torch.nn.Conv3d))

    def forward(hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        # (B*F, C, H, W) -> (B, C, F, H, W)
        hidden_states = hidden_states[None, :].reshape((-1, num_frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        identity = hidden_states
        left, right = state.comm.halo(hidden_states, dim=2, before=reach, after=reach)
        x = torch.cat([left, hidden_states, right], dim=2)  # (B, C, nl + F + nr, H, W)
        own = slice(left.shape[2], left.shape[2] + num_frames)
        for stage in stages:
            norm, rest = stage[0], stage[1:]
            if not isinstance(norm, torch.nn.GroupNorm):
                raise TypeError(f"TemporalConvLayer stage starts with {type(norm).__name__}, expected GroupNorm")
            x = rest(clip_group_norm(x, norm, state.comm, own))
        x = identity + x[:, :, own]
        # (B, C, F, H, W) -> (B*F, C, H, W)
        return x.permute(0, 2, 1, 3, 4).reshape((x.shape[0] * x.shape[2], -1) + x.shape[3:])

    return forward


class DualScopeAttnProcessor:
    """Temporal self-attention over frames with dual scope (mirrors diffusers' ``AttnProcessor2_0``
    for the features temporal attention uses: 3-D input, no masks, no norms, no residual)."""

    def __init__(self, state: _State, stock) -> None:
        self.state = state
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise RuntimeError("DualScopeAttnProcessor: only temporal self-attention (N, F, C) without a mask")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None or attn.residual_connection:
            raise RuntimeError("DualScopeAttnProcessor: unsupported Attention options (spatial/group/qk norm, residual)")
        state, scope = self.state, self.state.scope
        # hidden_states: (N, F, C), N = batch * height * width, F = this clip's frames
        left, right = state.comm.halo(hidden_states, dim=1, before=scope.local_frames, after=scope.local_frames)
        glob = state.comm.global_frames(hidden_states, dim=1, global_frames=scope.global_frames)
        context = torch.cat([left, hidden_states, right, glob], dim=1)  # (N, nl + F + nr + G', C)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # (N, L, heads * d) -> (N, heads, L, d)
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        mask = state.mask(left.shape[1], right.shape[1], glob.shape[1], device=query.device, dtype=query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def apply_video_infinity_unet3d(unet, *, comm: ClipComm, scope: DualScope) -> None:
    """Patch ``unet`` (a diffusers UNet3DConditionModel) in place for clip-parallel inference.

    After this, ``unet(sample, t, encoder_hidden_states)`` takes this rank's clip,
    sample (B, C, clip_frames, h, w), and returns its noise_pred of the same shape; every rank must
    call it in lock-step with the same timestep. Raises ValueError if already patched.
    """
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    if hasattr(unet, _STATE):
        raise ValueError("the UNet is already patched for Video-Infinity; call remove_video_infinity_unet3d first")
    state = _State(comm, scope)
    handle = unet.register_forward_pre_hook(_timestep_hook(state), with_kwargs=True)
    for module in list(unet.modules()):
        if isinstance(module, TemporalConvLayer):
            module.forward = _temporal_conv_forward(module, state)
        elif isinstance(module, TransformerTemporalModel):
            module.norm = ClipGroupNorm(module.norm, state)
            for block in module.transformer_blocks:
                for name in ("attn1", "attn2"):
                    attn = getattr(block, name, None)
                    if attn is not None:
                        attn.set_processor(DualScopeAttnProcessor(state, attn.processor))
    setattr(unet, _STATE, (state, handle))


def remove_video_infinity_unet3d(unet) -> None:
    """Undo :func:`apply_video_infinity_unet3d` (a no-op on an unpatched model)."""
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    if not hasattr(unet, _STATE):
        return
    _, handle = getattr(unet, _STATE)
    handle.remove()
    for module in unet.modules():
        if isinstance(module, TemporalConvLayer) and "forward" in vars(module):
            del module.forward
        elif isinstance(module, TransformerTemporalModel):
            if isinstance(module.norm, ClipGroupNorm):
                module.norm = module.norm.stock
            for block in module.transformer_blocks:
                for name in ("attn1", "attn2"):
                    attn = getattr(block, name, None)
                    if attn is not None and isinstance(attn.processor, DualScopeAttnProcessor):
                        attn.set_processor(attn.processor.stock)
    delattr(unet, _STATE)


def comm_stats(unet) -> dict:
    """Bytes this rank sent/received through the patch so far."""
    state, _ = getattr(unet, _STATE)
    return {"bytes_sent": state.comm.bytes_sent, "bytes_received": state.comm.bytes_received}
