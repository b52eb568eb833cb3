"""Spatial patch-parallel Wan VAE decode: each rank decodes a band of every frame's rows, with halo rows.

The Wan VAE's decoder (diffusers ``AutoencoderKLWan``: Wan2.1 and Wan2.2) is a stack of operations that are
local in space except for a few:

* ``WanRMS_norm`` normalises over channels (per position), SiLU, the causal *temporal* padding and feature
  cache (``feat_cache``: the last <= 2 frames each causal conv saw), the 1x1 convolutions, the nearest-exact
  2x upsampling, Wan2.2's ``DupUp3D`` shortcut, ``unpatchify`` and the final clamp are all per position
  (or per row pair): a rank that holds rows [r0, r1) of a frame computes them for its rows alone;
* every 3x3(x3) convolution (``WanCausalConv3d`` with a spatial kernel, the ``nn.Conv2d`` of
  ``WanResample``) reads one row above and below: before each, the rank swaps one boundary row with each
  neighbour (:meth:`TorchComm.halo`, torch.distributed isend/irecv; zero rows only at the frame's global
  top and bottom, as the original zero padding). The halo is taken *after* the feature cache was prepended
  in time, so the rows of earlier frames come from the neighbour's cache;
* the mid-block's single-head spatial attention (``WanAttentionBlock``, at latent resolution) attends over
  the whole frame: each rank all-gathers the block's input rows (small: h x w latent positions), computes
  norm and q/k/v on the whole frame and the attention of its own rows' queries over every key.

:class:`PatchParallelDecoder` patches the decoder's module instances (``forward`` replaced on the
instance, restored afterwards: :func:`patched`) and drives :class:`hpcvideo.decode.StreamingDecoder` on
the rank's band of the latents, so block-by-block streaming and its carried cache work as before; each
rank's cache holds its band only. Memory per rank: about 1/N of one frame's activations plus 2 halo rows
per tensor, independent of the video's length (the carry is bounded as in the single-rank stream).

Bands (:func:`band_rows`): latent rows split as ``numpy.array_split`` does (the first h % N ranks get one
row more); every band must hold at least one latent row (refused by name otherwise). Pixel rows of a band
are its latent rows times the spatial factor (8 for Wan2.1, 16 for Wan2.2 with its patch size 2).

Equality with the single-rank decode: the same operations on the same numbers, but a convolution of a band
may take another code path of the CPU/GPU kernels than the whole frame (blocking): the float frames differ
by float rounding (measured max abs difference in ``tests/test_parallel_vae.py`` and
``bench/bench_vae_decode.py``), the uint8 frames are compared there too.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from .decode import StreamingDecoder, convolution, to_uint8
from .vae_bands import band_rows, ranks_problem  # noqa: F401 (torch-free: the launcher's checks import them)

log = logging.getLogger("hpcvideo")

HALO_TAG_DOWN = 0x5A1  # rows sent to rank + 1
HALO_TAG_UP = 0x5A2  # rows sent to rank - 1


class TorchComm:
    """Neighbour exchange and gathers of rows (dim -2) over a torch.distributed group (gloo on CPU, NCCL on
    GPU). ``bounds``: every rank's band (:func:`band_rows`) at latent resolution; sizes at other resolutions
    scale with the tensor. ``group``: None = the default group (ranks 0..N-1 of it)."""

    def __init__(self, rank: int, world_size: int, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group

    def _peer(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def halo(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """x (..., rows, W) -> (..., p + rows + p, W): p rows of the rank above and below (zeros at the
        frame's top and bottom)."""
        import torch.distributed as dist

        if p == 0:
            return x
        if x.shape[-2] < p:
            raise ValueError(f"patch-parallel VAE decode: a band of {x.shape[-2]} rows is thinner than the halo {p}")
        shape = (*x.shape[:-2], p, x.shape[-1])
        above = below = None
        ops = []
        if self.rank > 0:
            above = torch.empty(shape, dtype=x.dtype, device=x.device)
            ops.append(dist.P2POp(dist.isend, x[..., :p, :].contiguous(), self._peer(self.rank - 1), self.group, HALO_TAG_UP))
            ops.append(dist.P2POp(dist.irecv, above, self._peer(self.rank - 1), self.group, HALO_TAG_DOWN))
        if self.rank < self.world_size - 1:
            below = torch.empty(shape, dtype=x.dtype, device=x.device)
            ops.append(dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), self._peer(self.rank + 1), self.group, HALO_TAG_DOWN))
            ops.append(dist.P2POp(dist.irecv, below, self._peer(self.rank + 1), self.group, HALO_TAG_UP))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        above = torch.zeros(shape, dtype=x.dtype, device=x.device) if above is None else above
        below = torch.zeros(shape, dtype=x.dtype, device=x.device) if below is None else below
        return torch.cat([above, x, below], dim=-2)

    def allgather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's band x (..., sizes[rank], W) -> the whole (..., sum(sizes), W), on every rank."""
        import torch.distributed as dist

        pad = max(sizes) - x.shape[-2]
        padded = F.pad(x, (0, 0, 0, pad)).contiguous() if pad else x.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[..., :size, :] for part, size in zip(parts, sizes)], dim=-2)

    def gather_rows(self, x: torch.Tensor, sizes: list[int], *, dim: int) -> torch.Tensor | None:
        """Every rank's band x (sizes[rank] along ``dim``) -> the whole tensor on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        pad = max(sizes) - x.shape[dim]
        if pad:
            x = torch.cat([x, x.new_zeros((*x.shape[:dim], pad, *x.shape[dim + 1:]))], dim=dim)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=self._peer(0), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)


def _spatial_convs(decoder):
    """The decoder's convolutions that read neighbouring rows: (module, kind) with kind "conv3d"
    (WanCausalConv3d, row padding p > 0) or "conv2d" (WanResample's nn.Conv2d, padding (1, 1))."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    found = []
    for module in decoder.modules():
        if isinstance(module, WanCausalConv3d) and module._padding[2] > 0:
            found.append((module, "conv3d"))
        elif isinstance(module, WanResample):
            for inner in module.resample.modules():
                if isinstance(inner, torch.nn.Conv2d) and inner.padding[0] > 0:
                    found.append((inner, "conv2d"))
    return found


def _check_supported(vae) -> None:
    """Refuse, by name, a decoder this module cannot split (modules not known to be row-local)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    for module in vae.decoder.modules():
        if isinstance(module, WanResample) and module.mode not in ("upsample2d", "upsample3d", "none"):
            raise ValueError(f"patch-parallel VAE decode: resample mode {module.mode!r} in the decoder is not supported")
        if isinstance(module, torch.nn.Conv2d) and module.stride != (1, 1):
            raise ValueError(f"patch-parallel VAE decode: a strided Conv2d {module} in the decoder is not supported")
    for module, kind in _spatial_convs(vae.decoder):
        pad_rows = module._padding[2] if kind == "conv3d" else module.padding[0]
        if kind == "conv3d" and (module.stride[1] != 1 or module.dilation[1] != 1 or module.kernel_size[1] != 2 * pad_rows + 1):
            raise ValueError(f"patch-parallel VAE decode: convolution {module} is not a 'same' stride-1 conv")
        if kind == "conv2d" and (module.dilation[0] != 1 or module.kernel_size[0] != 2 * pad_rows + 1):
            raise ValueError(f"patch-parallel VAE decode: convolution {module} is not a 'same' stride-1 conv")


def _conv3d_forward(comm):
    def forward(self, x, cache_x=None):
        padding = list(self._padding)  # (w, w, h, h, 2 * t, 0)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = comm.halo(x, padding[2])  # the rows of the neighbours, earlier frames (cache) included
        padding[2] = padding[3] = 0
        x = F.pad(x, padding)
        return torch.nn.Conv3d.forward(self, x)

    return forward


def _conv2d_forward(comm):
    def forward(self, x):
        x = comm.halo(x, self.padding[0])
        return convolution(self, x, (0, self.padding[1]))  # oneDNN on CPU, as the single-rank decode

    return forward


def _attention_forward(comm, bounds, rank):
    sizes = [r1 - r0 for r0, r1 in bounds]
    r0, r1 = bounds[rank]

    def forward(self, x):
        identity = x
        whole = comm.allgather_rows(x, sizes)  # (b, c, t, h, w): latent resolution
        b, c, t, h, w = whole.shape
        y = whole.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.norm(y)
        qkv = self.to_qkv(y).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        q = q[:, :, r0 * w : r1 * w]  # this band's queries (tokens in row-major order)
        y = F.scaled_dot_product_attention(q, k, v)  # (b t, 1, rows * w, c)
        rows = r1 - r0
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, rows, w)
        y = self.proj(y)
        y = y.view(b, t, c, rows, w).permute(0, 2, 1, 3, 4)
        return y + identity

    return forward


@contextlib.contextmanager
def patched(vae, comm, bounds, rank):
    """Within the block, ``vae.decoder``'s spatial convolutions and attention run on this rank's band
    (module docstring); their original ``forward`` is restored on exit (also on an error)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    targets = [(module, types.MethodType(_conv3d_forward(comm) if kind == "conv3d" else _conv2d_forward(comm), module))
               for module, kind in _spatial_convs(vae.decoder)]
    attention = _attention_forward(comm, bounds, rank)
    targets += [(module, types.MethodType(attention, module))
                for module in vae.decoder.modules() if isinstance(module, WanAttentionBlock)]
    try:
        for module, forward in targets:
            module.forward = forward
        yield
    finally:
        for module, _ in targets:
            module.__dict__.pop("forward", None)


class PatchParallelDecoder:
    """One rank's share of a streamed Wan VAE decode: rows [r0, r1) of every frame (module docstring).

    Every rank of ``comm`` (a :class:`TorchComm` or an object with its methods) builds one, with the same VAE
    weights, and calls :meth:`decode_block` for the same blocks in the same order (collective).
    ``latent_height``: h of the latents; ``device``: where this rank's VAE runs.
    Raises ValueError (naming the value) when h cannot be split over the ranks, or the VAE has tiling on or a
    decoder module this scheme does not know to be row-local."""

    def __init__(self, vae, comm, *, latent_height: int, device="cpu"):
        _check_supported(vae)
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        self.bounds = band_rows(latent_height, self.world_size)
        self.latent_height = latent_height
        self.stream = StreamingDecoder(vae, device=device)
        patch = vae.config.patch_size or 1
        self.row_factor = 2 ** (len(vae.config.dim_mult) - 1) * patch  # pixel rows per latent row

    @property
    def num_latent_frames_decoded(self) -> int:
        return self.stream.num_latent_frames_decoded

    def reset(self) -> None:
        self.stream.reset()

    def band(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the whole latents (B, C, n, h, w)."""
        if latents.shape[-2] != self.latent_height:
            raise ValueError(f"latents have {latents.shape[-2]} rows; this decoder was built for {self.latent_height}")
        r0, r1 = self.bounds[self.rank]
        return latents[..., r0:r1, :]

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """The next block, this rank's rows: latents (B, z, n, h, w) whole (or already the band (B, z, n, r1 -
        r0, w)); returns (B, 3, f, (r1 - r0) * row_factor, W) float32 in [-1, 1] (row_factor 8 for Wan2.1, 16 for
        Wan2.2's VAE; f as
        :meth:`hpcvideo.decode.StreamingDecoder.decode_block`). Collective over the ranks."""
        r0, r1 = self.bounds[self.rank]
        if self.world_size == 1:  # the single-rank stream, unchanged
            return self.stream.decode_block(latents)
        if latents.shape[-2] != r1 - r0:
            latents = self.band(latents)
        with patched(self.stream.vae, self.comm, self.bounds, self.rank):
            return self.stream.decode_block(latents)

    def decode_block_uint8(self, latents: torch.Tensor) -> np.ndarray | None:
        """The next block's whole uint8 frames (f, H, W, 3) on rank 0 (None elsewhere): each rank converts
        its band (:func:`hpcvideo.decode.to_uint8`, per pixel) and rank 0 gathers them. Collective."""
        frames = to_uint8(self.decode_block(latents))  # (f, rows, W, 3)
        if self.world_size == 1:
            return frames
        sizes = [(b1 - b0) * self.row_factor for b0, b1 in self.bounds]
        whole = self.comm.gather_rows(torch.from_numpy(frames).to(self.stream.device), sizes, dim=1)
        return None if whole is None else whole.cpu().numpy()

    def state_dict(self) -> dict:
        """This rank's carry (its band's feature cache) and the band it covers."""
        return {"bounds": [list(b) for b in self.bounds], "rank": self.rank, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of the same rank and world size."""
        if [tuple(b) for b in state["bounds"]] != self.bounds or state["rank"] != self.rank:
            raise ValueError(f"patch-parallel decoder state for rank {state['rank']} of bands {state['bounds']}; "
                             f"this is rank {self.rank} of bands {self.bounds}")
        self.stream.load_state_dict(state["stream"])


# ----------------------------------------------------------------------------------- the runner's sink

SINK_STATE_KIND = "rows"
BCAST_BLOCKS = 2  # blocks per broadcast of rank 0's pending blocks


class PatchParallelSink:
    """The runner's DualParal sink on every rank for ``runtime.vae_decode: rows``: every block is decoded by
    all ranks together, each its band of rows (:class:`PatchParallelDecoder`), between ticks.

    Schedule (no deadlock with the pipeline's messages): the runner calls :meth:`poll` on every rank after
    every tick, in the same order; there rank 0 broadcasts the blocks that left the queue since the last
    poll (``bcast_object``: their index and latents (1, C, n, h, w) float32, usually none), and every rank
    decodes them in order (halo exchanges and gathers on a process group of their own, so they never mix
    with the pipeline's messages); rank 0 gathers the uint8 frames and writes them with their done marker.
    :meth:`finish` (every rank, after the last tick) does the same for the blocks drained at the end.

    ``store``: the run store on rank 0 (None elsewhere); ``decoder``: this rank's :class:`PatchParallelDecoder`;
    ``env``: :class:`hpcvideo.runtime.RankEnv`. Rank 0 writes a block's latents (and marker) in :meth:`submit`.

    Checkpoints are rank 0's alone, while the carry is spread over the ranks: the state is the number of
    blocks decoded and submitted (``{"kind": "rows", "blocks_decoded", "blocks_submitted"}``). A resume
    rebuilds the carry by decoding again, on every rank, blocks 0 .. blocks_decoded - 1 from their stored
    latents (their frames are not written again), then decodes the submitted blocks whose frames were not
    written: the store ends as after an uninterrupted run, at the cost of decoding the video's earlier part
    again once per resume. The rank-0 streaming sink's state (:class:`hpcvideo.decode.StreamingDecoder`'s)
    is accepted too (the blocks it covers were written)."""

    def __init__(self, store, decoder: PatchParallelDecoder, env, *, block_latent_frames: int, faults=None) -> None:
        from .faults import NO_FAULTS

        self.store, self.decoder, self.env = store, decoder, env
        self.faults = NO_FAULTS if faults is None else faults
        self.block_latent_frames = block_latent_frames
        self.blocks_decoded = self.blocks_submitted = 0
        self.decode_s = self.wait_s = self.write_s = self.bcast_s = 0.0
        self.decode_blocks = self.replayed_blocks = 0
        self._pending: list = []  # rank 0: (block_index, latents numpy, write frames?) not yet decoded

    @property
    def stats(self) -> dict:
        return {"decode_s": round(self.decode_s, 4), "decode_blocks": self.decode_blocks,
                "decode_replayed_blocks": self.replayed_blocks, "bcast_s": round(self.bcast_s, 4),
                "write_s": round(self.write_s, 4), "sink_wait_s": round(self.wait_s, 4)}

    def _write(self, kind: str, block_index: int, data) -> None:
        start = time.perf_counter()
        if kind == "latents":
            self.store.write_block_latents(block_index, data)
        else:
            self.store.write_block_frames(block_index, data)
        self.faults.fire(kind, block_index)
        self.store.mark_done(kind, block_index)
        self.write_s += time.perf_counter() - start

    def submit(self, block_index: int, latents: torch.Tensor) -> None:
        """Rank 0: block ``block_index`` left the queue (latents (1, C, n, h, w)): its latents are written now,
        its frames at the next :meth:`poll` or :meth:`finish` (every rank decodes it)."""
        latents = latents.detach().float().cpu()
        self._write("latents", block_index, latents[0].permute(1, 0, 2, 3).numpy())
        self.blocks_submitted = max(self.blocks_submitted, block_index + 1)
        self._pending.append((block_index, latents.numpy(), True))

    def poll(self) -> None:
        """Every rank, after each tick: decode together the blocks rank 0 submitted since the last call (rank 0
        broadcasts them a few at a time: memory independent of how many are pending)."""
        from .runtime.control import bcast_object

        while True:
            start = time.perf_counter()
            batch = None
            if self.store is not None:
                batch, self._pending = self._pending[:BCAST_BLOCKS], self._pending[BCAST_BLOCKS:]
                batch = [(j, self._read_latents(j) if latents is None else latents, write) for j, latents, write in batch]
            batch = bcast_object(self.env, batch)
            self.bcast_s += time.perf_counter() - start
            if not batch:
                return
            for block_index, latents, write in batch:
                start = time.perf_counter()
                frames = self.decoder.decode_block_uint8(torch.from_numpy(latents))
                self.decode_s += time.perf_counter() - start
                if not write:
                    self.replayed_blocks += 1
                    continue
                self.decode_blocks += 1
                self.blocks_decoded = max(self.blocks_decoded, block_index + 1)
                if self.store is not None:
                    self._write("frames", block_index, frames)

    def _read_latents(self, block_index: int) -> np.ndarray:
        """Rank 0: block ``block_index``'s stored latents as (1, C, n, h, w) float32."""
        n = self.block_latent_frames
        latents = np.asarray(self.store.read_latents(block_index * n, (block_index + 1) * n))  # (n, C, h, w)
        return np.ascontiguousarray(latents.transpose(1, 0, 2, 3)[None], dtype=np.float32)

    def flush(self) -> None:
        """Rank 0 (before a checkpoint): every latents chunk submitted is on disk (written in :meth:`submit`);
        frames not decoded yet are decoded after a resume (the state says which)."""

    def finish(self) -> None:
        """Every rank, after the last tick: decode the blocks still pending."""
        self.poll()

    def state_dict(self) -> dict:
        return {"kind": SINK_STATE_KIND, "blocks_decoded": int(self.blocks_decoded),
                "blocks_submitted": int(self.blocks_submitted)}

    def load_state_dict(self, state) -> None:
        """Rank 0, resuming: the blocks to decode again (carry only) and those whose frames are missing."""
        if isinstance(state, dict) and state.get("kind") == SINK_STATE_KIND:
            decoded, submitted = int(state["blocks_decoded"]), int(state["blocks_submitted"])
        elif isinstance(state, dict) and "num_latent_frames_decoded" in state:  # the rank-0 stream's carry
            decoded = submitted = int(state["num_latent_frames_decoded"]) // self.block_latent_frames
        else:
            raise ValueError(f"runtime.vae_decode=rows cannot resume from a decode state of kind "
                             f"{state.get('kind') if isinstance(state, dict) else type(state).__name__!r}")
        frames_done = self.store.done("frames")
        # (index, latents read when broadcast, write its frames?): every block before the checkpoint's end
        self._pending = [(j, None, j >= decoded and not frames_done[j]) for j in range(min(submitted, self.store.num_blocks))]
        self.blocks_submitted, self.blocks_decoded = submitted, decoded  # a checkpoint before the replay says the same
        if self._pending:
            log.info("decoding blocks 0..%d again on every rank (the carry of a row-parallel decode is not "
                     "checkpointed)", len(self._pending) - 1)

    def close(self) -> None:
        """Nothing runs in the background; a block not decoded is decoded after a resume."""
        self._pending = []


def make_patch_sink(ctx, vae):
    """The DualParal sink of every rank for ``runtime.vae_decode: rows`` (world_size > 1): a
    :class:`PatchParallelSink` over a process group of its own (collective: every rank builds it)."""
    import torch.distributed as dist

    env, cfg, info = ctx.env, ctx.cfg, ctx.info
    scale = info["vae_scale_factor_spatial"]
    group = dist.new_group(ranks=list(range(env.world_size)))
    decoder = PatchParallelDecoder(vae, TorchComm(env.rank, env.world_size, group),
                                   latent_height=cfg.video.height // scale, device=env.device)
    return PatchParallelSink(ctx.store, decoder, env, block_latent_frames=cfg.strategy.block_latent_frames,
                             faults=ctx.faults)
