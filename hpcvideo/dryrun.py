"""Dry runs on the meta device: what a forward would allocate and send, without weights, data or peers.

``hpcvideo plan`` builds the models from their JSON configs on the meta device (shapes only, nothing is
read or allocated) and runs the real code path on meta tensors:

* :class:`LiveBytes` — a dispatch mode that counts the bytes of every tensor an op creates (outputs
  that alias an input, views and in-place results, are not new memory) and subtracts them when the
  tensor is freed; ``peak`` is the most that was alive at once: the activation peak of the forward,
  as the caching allocator would see it without fragmentation.
* :class:`CountingComm` — a :class:`~hpcvideo.strategies.videoinfinity.clips.ClipComm` that sends
  nothing but returns tensors of the shapes a synchronised run receives and counts the payload bytes
  the real one would send and receive, by kind (``halo``, ``global``, ``sum``), with the same rules
  (so the counters equal a real run's ``bytes_sent``/``bytes_received``).
* :func:`videoinfinity_forward` — one patched forward of a clip: (sent by kind, received, activation
  peak, FLOPs); :func:`replay` — the same messages for another rank, without another forward.
* :func:`encoder_activation_bytes` — the activation peak of one prompt through a text encoder.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .strategies.videoinfinity.clips import ClipComm, ClipLayout, DualScope, global_frame_indices

__all__ = ["CountingComm", "LiveBytes", "encoder_activation_bytes", "meta_model", "replay", "videoinfinity_forward"]


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...``; then ``m.peak``: the most bytes of op-created tensors alive at once.
    Inside, ``torch.nn.functional.scaled_dot_product_attention`` is counted as a fused kernel (its output only)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.attention_flops = 0  # 4 B heads Sq Sk d per attention call

    def _fused_sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """A shape-only stand-in of ``F.scaled_dot_product_attention``: the output alone, as a fused kernel
        allocates it (flash / memory-efficient attention on GPU, torch's flash kernel on CPU), not the
        S x S scores of the math fallback that meta tensors would otherwise go through."""
        self.attention_flops += 4 * query.shape[:-2].numel() * query.shape[-2] * key.shape[-2] * query.shape[-1]
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    def __enter__(self):
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._fused_sdpa
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._sdpa
        return super().__exit__(*exc)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor) and returns and returns[min(i, len(returns) - 1)].alias_info is None:
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                weakref.finalize(t, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class CountingComm(ClipComm):
    """A ClipComm without peers: shapes and counters of the real exchange; ``sent`` by kind."""

    def __init__(self, layout: ClipLayout, *, sync: bool | str = True) -> None:
        super().__init__(layout, sync=sync)
        self.sent = {"halo": 0, "global": 0, "sum": 0}
        self.calls: list[tuple] = []  # (method, shape, dtype, keywords): replayed for other ranks by :func:`replay`
        self.halo_lengths: list[tuple[int, int]] = []  # frames received left/right per halo call

    def _record(self, method: str, x, **keywords) -> None:
        self.calls.append((method, tuple(x.shape), x.dtype, keywords))

    def _count(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] += sent
        self.bytes_sent += sent
        self.bytes_received += received

    def halo(self, x, *, dim, before, after):
        self._record("halo", x, dim=dim, before=before, after=after)
        layout = self.layout
        (l0, l1), (r0, r1) = layout.halo_range(layout.rank, before, after)
        self.halo_lengths.append((l1 - l0, r1 - r0))
        frame = x.numel() // x.shape[dim] * x.element_size()

        def zeros(n):
            return torch.zeros([n if d == dim % x.ndim else s for d, s in enumerate(x.shape)], dtype=x.dtype, device=x.device)

        if self.stand_in:
            return zeros(l1 - l0), zeros(r1 - r0)
        if layout.world_size == 1 or (l0 == l1 and r0 == r1):
            return zeros(0), zeros(0)
        mine = layout.clip_of(layout.rank)
        sent = received = 0
        for peer in range(layout.world_size):
            if peer == layout.rank:
                continue
            for need in layout.halo_range(peer, before, after):
                sent += max(0, min(need[1], mine[1]) - max(need[0], mine[0])) * frame
            peer_clip = layout.clip_of(peer)
            for need in ((l0, l1), (r0, r1)):
                received += max(0, min(need[1], peer_clip[1]) - max(need[0], peer_clip[0])) * frame
        self._count("halo", sent, received)
        return zeros(l1 - l0), zeros(r1 - r0)

    def global_frames(self, x, *, dim, global_frames):
        self._record("global_frames", x, dim=dim, global_frames=global_frames)
        layout = self.layout
        indices = global_frame_indices(layout.num_frames, global_frames)
        shape = list(x.shape)
        shape[dim] = len(indices)
        out = torch.zeros(shape, dtype=x.dtype, device=x.device)
        if self.stand_in or not indices or layout.world_size == 1:
            return out
        frame = x.numel() // x.shape[dim] * x.element_size()
        owned = [[f for f in indices if s <= f < e] for s, e in map(layout.clip_of, range(layout.world_size))]
        nbytes = max(map(len, owned)) * frame
        if layout.world_size <= len(indices):  # one padded all_gather, counted as sent to every peer
            self._count("global", nbytes * (layout.world_size - 1), nbytes * (layout.world_size - 1))
        else:  # one broadcast per owning rank
            for owner, own in enumerate(owned):
                if own:
                    self._count("global", nbytes if owner == layout.rank else 0, 0 if owner == layout.rank else nbytes)
        return out

    def sum(self, x):
        self._record("sum", x)
        if self.layout.world_size == 1 or self.stand_in:
            return x
        nbytes = x.numel() * x.element_size()
        self._count("sum", nbytes, nbytes)
        return x.clone()


def replay(calls: list[tuple], layout: ClipLayout, *, sync: bool | str = True) -> CountingComm:
    """The messages of another rank's forward: ``calls`` (a :class:`CountingComm`'s record of one forward)
    made again on ``layout``. Exact, as every exchanged tensor holds the clip's frames whatever the rank;
    its ``halo_lengths`` tell whether the rank's shapes (so its activations) differ from the recorded one's."""
    comm = CountingComm(layout, sync=sync)
    for method, shape, dtype, keywords in calls:
        getattr(comm, method)(torch.empty(shape, dtype=dtype, device="meta"), **keywords)
    return comm


def meta_model(cls, config_dir, *, dtype: torch.dtype):
    """``cls.from_config(cls.load_config(config_dir))`` on the meta device in ``dtype`` (the modules a
    diffusers class keeps in float32, ``_keep_in_fp32_modules``, stay float32)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = cls.from_config(cls.load_config(config_dir))
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model.eval()


@torch.no_grad()
def videoinfinity_forward(model, family: str, *, layout: ClipLayout, scope: DualScope, latents_shape: tuple,
                          text_shape: tuple, dtype: torch.dtype, sync: bool | str = True,
                          timestep: float = 999.0) -> dict:
    """One Video-Infinity forward of ``layout``'s clip through a meta-device ``model`` ("wan" or "unet3d"):
    ``latents_shape`` (B, C, clip_frames, h, w), ``text_shape`` (B, L, D). Returns ``{"sent": {kind: bytes},
    "bytes_sent", "bytes_received", "activations_bytes", "flops", "calls", "halo_lengths"}`` (activations: :class:`LiveBytes` peak, the
    inputs included; FLOPs: torch's FlopCounterMode + the attention calls)."""
    from .strategies.videoinfinity.reference import patch_functions

    comm = CountingComm(layout, sync=sync)
    apply, remove = patch_functions(family)
    apply(model, comm=comm, scope=scope)
    try:
        if family == "wan":  # the patch's pre-hook reads the timestep's value: meta tensors have none
            state, handle = model._video_infinity
            handle.remove()
            state.timestep, state.latent_hw = float(timestep), tuple(latents_shape[3:5])
        with FlopCounterMode(display=False) as flops, LiveBytes() as live:
            latents = torch.empty(latents_shape, dtype=dtype, device="meta")
            text = torch.empty(text_shape, dtype=dtype, device="meta")
            t = torch.full((latents_shape[0],), timestep, device="meta") if family == "wan" else timestep
            out = model(latents, t, text, return_dict=False)[0]
            del out
    finally:
        remove(model)
    return {"sent": dict(comm.sent), "bytes_sent": comm.bytes_sent, "bytes_received": comm.bytes_received,
            "activations_bytes": live.peak, "flops": flops.get_total_flops() + live.attention_flops,
            "calls": comm.calls, "halo_lengths": comm.halo_lengths}


@torch.no_grad()
def encoder_activation_bytes(encoder, sequence_length: int) -> int:
    """Activation peak of one prompt of ``sequence_length`` tokens through a meta-device text encoder."""
    with LiveBytes() as live:
        ids = torch.zeros((1, sequence_length), dtype=torch.long, device="meta")
        out = encoder(ids)  # no padding mask: its all-ones test reads values, which meta tensors have not
        del out
    return live.peak
