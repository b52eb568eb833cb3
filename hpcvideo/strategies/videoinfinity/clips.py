"""Clip layout and the messages between clips (Video-Infinity clip parallelism, arXiv 2406.16260 §3).

Rank layout (world_size N, ``clip_frames`` = F latent frames per rank, video of T = N * F frames)::

    rank 0: frames [0, F)      rank 1: frames [F, 2F)    ...    rank N-1: frames [(N-1)F, NF)

    e.g. 4 ranks x 4 frames, halo 2:  rank 1 owns 4..7 and receives 2..3 (from rank 0) and 8..9
    (from rank 2); rank 0 receives nothing on its left: frame 0 is the video's true start.

Three kinds of message, all along the frame axis of whatever tensor a layer holds:

* :meth:`ClipComm.halo` — the ``before``/``after`` frames just outside this clip, from the ranks that
  own them (usually the two neighbours; several ranks when a halo is longer than a clip). Nothing
  is sent across the video's true ends: there the halo is simply shorter (never zero-padded).
* :meth:`ClipComm.global_frames` — the global set: frames at :func:`global_frame_indices` of the
  video, gathered from their owners in video order, the same on every rank.
* :meth:`ClipComm.sum` — a sum over all ranks (GroupNorm statistics: a few numbers per group).
* :meth:`ClipComm.gather_frames` — every rank's frames in video order (tests and tools only).

Bytes received per rank per message do not grow with the number of ranks or the video's length:
halos are ``before + after`` frames; the global set is G' frames (minus the rank's own), gathered
with one padded all_gather while world_size <= G' (padding: < world_size frames) and with one
broadcast per owning rank beyond that; sums are (2, B, groups) float64.

``sync=False`` (benchmarks; ``strategy.sync_clips: false``) cuts every message: each rank behaves as if
its clip were the whole video (the independent-clips baseline). ``sync="stand-in"`` (benchmarks only)
also sends nothing but keeps every shape: halos and the global set are zeros of the sizes a
synchronised run receives, sums are the local values, so the compute is that of the synchronised run
and the difference in time is the cost of the messages and of waiting for the peers. Counters
``bytes_sent``/``bytes_received`` count tensor payload bytes of this rank.

The exchanges are blocking calls. Measured on 2 CPU ranks (gloo): starting them asynchronously and
computing meanwhile (queries while the halo travels; one sample of the CFG pair normalised while the
other's GroupNorm sums travel) made steps slower — tiny Wan 0.35 vs 0.23 s, UNet3D 2.25 vs 1.84 s —
as gloo's worker thread competes with the ranks for the cores. NCCL on GPUs is not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class DualScope:
    """Dual-scope attention settings (paper §3.3; defaults as the paper: 8 + 8 local, 16 global).

    ``local_frames``: frames each side of a query frame in its local window (the paper's "padding"
    P = 8, so |N_a| = 16); ``global_frames``: size G of the global set shared by all ranks;
    ``switch_timestep``: at timesteps >= it (the global phase) the global keys get ``global_bias``
    added to their logits, below it the local keys do (paper: t = 800, bias 10; a share of the steps
    becomes a threshold with :func:`.masks.switch_timestep_for`; +inf: never global, -inf: always).
    ``exempt_own_frame``: in the global phase the query frame's own key frame (on Wan: its own
    spatial tokens) gets ``global_bias`` as well, instead of being lowered with the other local keys
    as in the released code (False). With G = 0 no bias is applied.
    """

    local_frames: int = 8
    global_frames: int = 16
    switch_timestep: float = 800.0
    global_bias: float = 10.0
    exempt_own_frame: bool = True

    def exact(self, num_frames: int) -> bool:
        """True when this is "exact mode" for a video of ``num_frames``: the window covers it all, no global set."""
        return self.global_frames == 0 and self.local_frames >= num_frames - 1


def global_frame_indices(num_frames: int, global_frames: int) -> list[int]:
    """The global set: min(G, T) frames spread evenly over the video, ``i * T // G'`` for i < G'.

    Unlike the released code (a fixed stride inside every clip), this depends on the video only,
    not on the number of ranks.
    """
    count = min(global_frames, num_frames)
    return [i * num_frames // count for i in range(count)] if count > 0 else []


@dataclass(frozen=True, kw_only=True)
class ClipLayout:
    """Which frames this rank owns. ``start``/``stop``: its clip [start, stop) in the video."""

    rank: int
    world_size: int
    clip_frames: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or self.clip_frames < 1:
            raise ValueError(f"bad clip layout: rank {self.rank} of {self.world_size}, clip_frames {self.clip_frames}")

    num_frames = property(lambda self: self.world_size * self.clip_frames, doc="T: frames of the video")
    start = property(lambda self: self.rank * self.clip_frames)
    stop = property(lambda self: (self.rank + 1) * self.clip_frames)

    def clip_of(self, rank: int) -> tuple[int, int]:
        return rank * self.clip_frames, (rank + 1) * self.clip_frames

    def halo_range(self, rank: int, before: int, after: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Video frames of ``rank``'s left and right halo, cut at the video's ends."""
        start, stop = self.clip_of(rank)
        return (max(0, start - before), start), (stop, min(self.num_frames, stop + after))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class ClipComm:
    """Frame-axis messages of one rank (torch.distributed default group; gloo on CPU, NCCL on GPU).

    Every rank must make the same calls in the same order (they are collectives in effect).
    """

    def __init__(self, layout: ClipLayout, *, sync: bool | str = True, group=None) -> None:
        if sync not in (True, False, "stand-in"):
            raise ValueError(f"ClipComm: sync={sync!r}; allowed: True, False, 'stand-in'")
        self.layout = layout if sync is not False else ClipLayout(rank=0, world_size=1, clip_frames=layout.clip_frames)
        self.sync = sync
        self.stand_in = sync == "stand-in"
        self.group = group
        self.bytes_sent = 0
        self.bytes_received = 0

    # --------------------------------------------------------------------------------- halos
    def halo(self, x: torch.Tensor, *, dim: int, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right): frames [start - before, start) and [stop, stop + after) of the video, cut at its ends.

        x: this clip's tensor with its clip_frames frames on axis ``dim``; the results have the
        same shape except on ``dim`` (0 frames at a true end). Exchanged with point-to-point
        messages (one per peer that owns part of a halo).
        """
        layout = self.layout
        if x.shape[dim] != layout.clip_frames:
            raise ValueError(f"halo: x has {x.shape[dim]} frames on dim {dim}; the clip has {layout.clip_frames}")
        (l0, l1), (r0, r1) = layout.halo_range(layout.rank, before, after)
        if self.stand_in:  # same shapes, no messages (benchmark)
            return tuple(torch.zeros([n if d == dim % x.ndim else s for d, s in enumerate(x.shape)],
                                     dtype=x.dtype, device=x.device) for n in (l1 - l0, r1 - r0))
        if layout.world_size == 1 or (l0 == l1 and r0 == r1):
            empty = x.narrow(dim, 0, 0)
            return empty, empty
        ops, pieces = [], []
        mine = layout.clip_of(layout.rank)
        for peer in range(layout.world_size):
            if peer == layout.rank:
                continue
            # what peer needs from me
            for need in layout.halo_range(peer, before, after):
                part = _overlap(need, mine)
                if part is not None:
                    send = x.narrow(dim, part[0] - mine[0], part[1] - part[0]).contiguous()
                    ops.append(dist.P2POp(dist.isend, send, peer, self.group))
                    self.bytes_sent += send.numel() * send.element_size()
            # what I need from peer
            for need in ((l0, l1), (r0, r1)):
                part = _overlap(need, layout.clip_of(peer))
                if part is not None:
                    shape = list(x.shape)
                    shape[dim] = part[1] - part[0]
                    buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
                    ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
                    pieces.append((part[0], buffer))
                    self.bytes_received += buffer.numel() * buffer.element_size()
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        pieces.sort(key=lambda item: item[0])
        left = [b for f, b in pieces if f < mine[0]]
        right = [b for f, b in pieces if f >= mine[1]]
        cat = lambda parts: torch.cat(parts, dim=dim) if parts else x.narrow(dim, 0, 0)  # noqa: E731
        return cat(left), cat(right)

    # -------------------------------------------------------------------------- global set
    def global_frames(self, x: torch.Tensor, *, dim: int, global_frames: int) -> torch.Tensor:
        """The frames of the global set (:func:`global_frame_indices`), in video order, on every rank.

        x: this clip's tensor (clip_frames on ``dim``). Returns the same shape with G' = min(G, T)
        frames on ``dim``. One all_gather of max-per-rank frames (ranks with fewer pad with zeros).
        """
        layout = self.layout
        indices = global_frame_indices(layout.num_frames, global_frames)
        if self.stand_in:  # same shape, no messages (benchmark)
            shape = list(x.shape)
            shape[dim] = len(indices)
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        if not indices:
            return x.narrow(dim, 0, 0)
        owned = [[f - s for f in indices if s <= f < e] for s, e in map(layout.clip_of, range(layout.world_size))]
        if layout.world_size == 1:
            return x.index_select(dim, torch.tensor(owned[0], device=x.device))
        most = max(map(len, owned))
        mine = owned[layout.rank]
        shape = list(x.shape)
        shape[dim] = most
        send = torch.zeros(shape, dtype=x.dtype, device=x.device)
        if mine:
            send.narrow(dim, 0, len(mine)).copy_(x.index_select(dim, torch.tensor(mine, device=x.device)))
        if layout.world_size <= len(indices):  # one padded all_gather (< world_size frames of padding)
            parts = self._all_gather(send)
        else:  # more ranks than global frames: one broadcast per owner, exactly G' - own frames received
            parts = []
            for owner, own in enumerate(owned):
                buffer = send if owner == layout.rank else torch.empty_like(send)
                if own:
                    dist.broadcast(buffer, src=owner, group=self.group)
                    nbytes = buffer.numel() * buffer.element_size()
                    if owner == layout.rank:
                        self.bytes_sent += nbytes
                    else:
                        self.bytes_received += nbytes
                parts.append(buffer)
        return torch.cat([part.narrow(dim, 0, len(own)) for part, own in zip(parts, owned) if own], dim=dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``x`` over all ranks (an all_reduce; the same result on every rank)."""
        if self.layout.world_size == 1 or self.stand_in:
            return x
        x = x.contiguous().clone()
        dist.all_reduce(x, group=self.group)
        nbytes = x.numel() * x.element_size()
        self.bytes_sent += nbytes
        self.bytes_received += nbytes
        return x

    def gather_frames(self, x: torch.Tensor, *, dim: int) -> torch.Tensor:
        """Every rank's ``x`` (clip_frames on ``dim``) concatenated in video order: T frames on ``dim``."""
        if self.layout.world_size == 1:
            return x
        return torch.cat(self._all_gather(x.contiguous()), dim=dim)

    def _all_gather(self, send: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(send) for _ in range(self.layout.world_size)]
        dist.all_gather(parts, send, group=self.group)
        nbytes = send.numel() * send.element_size()
        self.bytes_sent += nbytes * (self.layout.world_size - 1)  # as if sent to every peer (upper bound)
        self.bytes_received += nbytes * (self.layout.world_size - 1)
        return parts


def clip_group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, comm: ClipComm, own: slice | None = None) -> torch.Tensor:
    """GroupNorm whose statistics span every frame of the video (paper §3.2, "GroupNorm sync").

    x: (B, C, F_x, H, W): this clip's frames, possibly with halo frames around them; ``own`` selects
    the clip's own frames on axis 2 (default: all). Mean and variance per (sample, group) are those
    of all T frames of the video: each rank sums x and x**2 over its own frames in float64 and the
    sums are added over ranks (one all_reduce of 2 x B x groups numbers), so the statistics differ
    between splits only by float64 round-off. Halo frames are normalised with the same statistics.
    Returns x's shape and dtype. Mirrors ``torch.nn.GroupNorm`` (equal up to float32 round-off).
    """
    B, C = x.shape[:2]
    G = norm.num_groups
    frames = x if own is None else x[:, :, own]
    grouped = frames.reshape(B, G, -1).double()  # (B, G, C/G * F * H * W)
    stats = comm.sum(torch.stack([grouped.sum(dim=2), grouped.square().sum(dim=2)]))  # (2, B, G)
    count = grouped.shape[-1] * comm.layout.num_frames // frames.shape[2]
    mean = stats[0] / count
    var = (stats[1] / count - mean.square()).clamp_min(0.0)
    rstd = torch.rsqrt(var + norm.eps)
    shape = (B, G, 1, 1, 1)
    y = (x.reshape(B, G, C // G, x.shape[2], -1) - mean.view(shape).to(x.dtype)) * rstd.view(shape).to(x.dtype)
    y = y.reshape(x.shape)
    if norm.affine:
        y = y * norm.weight.view(1, C, 1, 1, 1) + norm.bias.view(1, C, 1, 1, 1)
    return y
