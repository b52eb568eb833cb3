"""Decode spread over the ranks: each rank decodes about 1/N of every block, between its own ticks.

The streaming Wan decode (:class:`hpcvideo.decode.StreamingDecoder`) carries a feature cache from latent
frame to latent frame, so in general block j can only be decoded after block j-1, on the rank that holds
the carry. A *chunk-local* decoder (:func:`is_chunk_local`: every causal temporal tap that reaches an
earlier latent frame has zero weight, as the demo model's VAE, ``hpcvideo.demo.train.make_chunk_local``)
decodes each latent frame from its own values alone: the carry is multiplied by zero. Then any latent frame can
be decoded by any rank, from any carry, with the same bits (:class:`IndependentDecoder`; a zero product
adds exactly 0 to every sum, so the frames are bit-identical, tested).

:class:`SpreadBlockSink` uses that for DualParal (the runner's sink, one per rank):

* rank 0 (the queue owner) writes every block's latents and done marker as before (its writer thread);
  the latent frames of every block that leaves the queue are split, as it leaves, between the ranks by their
  backlog (:func:`split_block`): each other rank gets a run of consecutive latent frames while it owes rank 0
  the frames of fewer than :data:`MAX_OUTSTANDING_BLOCKS` blocks' worth of latent frames (the least indebted
  first), and rank 0 decodes what nobody else has room for (``decode_taken_over``). Rank 0 also runs the
  queue, the checkpoints and the writes, so the ranks with pipeline stages alone take the decode while they
  keep up, and rank 0 steps in when they fall behind: the split follows the ranks' speed on any machine
  (measured on the main job, 2 ranks: a fixed half each left rank 1 waiting for rank 0). Which rank decodes a
  latent frame never changes its bits. Rank 0 sends every other rank that gets a run the block's latents
  (1, C, n, h, w) float32, with the block index and the run [k0, k1) as three last elements, and at the end
  of the run a message of index -1 to every other rank (MPI ``Isend`` on a duplicate of the world
  communicator: host memory, small; gloo's ``is_completed`` does not report a finished receive before
  ``wait``, MPI's ``Test`` does);
* every rank decodes its parts in block order, in its main thread, between its ticks (the runner calls
  :meth:`SpreadBlockSink.poll` after each tick; a block whose latents have not arrived yet waits for a later
  tick) and at the end of the run (:meth:`SpreadBlockSink.finish`); the other ranks send the uint8 frames
  of each part (:func:`part_frames`: 4 per latent frame, 1 for the video's first) back to rank 0, into the
  block's frames buffer; rank 0 writes a block's frames and their done marker once every part is there,
  in block order (one frames writer: adjacent blocks share a frames chunk);
* checkpoints: rank 0 never waits for another rank's frames before a checkpoint (the other rank may be
  waiting for rank 0's next tick). The sink's state is the number of blocks submitted; their latents are
  on disk. After a resume, :meth:`SpreadBlockSink.load_state_dict` decodes again, on rank 0, the blocks
  below that number whose frames were not written yet (the decode of a chunk-local block is a function of
  its latents alone), so the store ends as after an uninterrupted run. The state of a rank-0 streaming sink
  (:class:`hpcvideo.writer.BlockSink`: the decoder carry) is accepted too (that sink wrote every frame before
  its checkpoint).

Per rank the sink measures (``stats``, into the store's ``rank_stats``): ``decode_s``/``decode_blocks``/``decode_blocks_at_end``
/``decode_latent_frames`` (its decode: seconds, blocks it decoded a part of, of those the ones decoded after the
last tick, latent frames), ``send_s`` (frames and latents messages), and on rank 0 ``write_s`` (its writer thread)
and ``sink_wait_s`` (blocked: a full write queue, flushes, a message still outstanding at the end).

A decoder that is not chunk-local keeps the single-rank stream (:class:`hpcvideo.writer.BlockSink` on
rank 0): :func:`make_sink` chooses.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import numpy as np
import torch

from .decode import StreamingDecoder, to_uint8
from .faults import NO_FAULTS, FaultPlan

log = logging.getLogger("hpcvideo")

STATE_KIND = "spread"
TAG_SPACE = 1 << 14  # frames messages: tag = the part's first latent frame % TAG_SPACE (MPI guarantees tags up to 32767)
LATENTS_TAG = TAG_SPACE  # latents messages carry their block index in the message
POLL_S = 0.002  # waits test and sleep: MPICH's blocking waits would spin a core
# another rank gets latent frames to decode while it owes rank 0 the frames of fewer than this many blocks' worth
# of latent frames (split_block); beyond, rank 0 decodes them itself
MAX_OUTSTANDING_BLOCKS = 2


def is_chunk_local(vae) -> bool:
    """Whether ``vae``'s decoder reads nothing of earlier latent frames: every causal 3-D convolution of its
    decoder with a temporal kernel k > 1 has all-zero weights on its k - 1 past taps (stride 1; the carry
    feeds exactly those). False for Wan2.1/2.2's VAEs, True for the demo model's. No weights are changed."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    convs = [m for m in vae.decoder.modules() if isinstance(m, WanCausalConv3d)]
    if not convs:
        return False
    for conv in convs:
        k = conv.kernel_size[0]
        if k == 1:
            continue
        if conv.stride[0] != 1 or conv.dilation[0] != 1 or not bool((conv.weight[:, :, : k - 1] == 0).all()):
            return False
    return True


def split_block(block_index: int, block_latent_frames: int, outstanding: list[int], cap: int) -> list[tuple[int, int] | None]:
    """Who decodes which latent frames of block ``block_index``: per rank a run [k0, k1) of the block's
    ``block_latent_frames`` latent frames, or None. ``outstanding[r]``: latent frames rank r (r >= 1) was
    given and has not sent back yet (``outstanding[0]`` is not read). One latent frame at a time goes to the
    other rank with the fewest outstanding (ties rotate with the block index) while that stays below
    ``cap``; rank 0 takes the rest. The runs are laid out in rank order 1, 2, ..., N - 1, 0."""
    world_size = len(outstanding)
    counts = [0] * world_size
    others = sorted(range(1, world_size), key=lambda r: (outstanding[r], (r - 1 - block_index) % max(1, world_size - 1)))
    for _ in range(block_latent_frames):
        best = None
        for r in others:
            load = outstanding[r] + counts[r]
            if load < cap and (best is None or load < outstanding[best] + counts[best]):
                best = r
        counts[0 if best is None else best] += 1
    runs: list[tuple[int, int] | None] = [None] * world_size
    start = 0
    for r in [*range(1, world_size), 0]:
        if counts[r]:
            runs[r] = (start, start + counts[r])
            start += counts[r]
    return runs


def _merge(parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs [k0, k1) sorted, adjacent ones joined (decoded as one call each)."""
    merged: list[tuple[int, int]] = []
    for k0, k1 in sorted(parts):
        if merged and merged[-1][1] == k0:
            merged[-1] = (merged[-1][0], k1)
        else:
            merged.append((k0, k1))
    return merged


def part_frames(block_index: int, part: tuple[int, int], temporal_factor: int) -> tuple[int, int]:
    """Frames [a, b) of block ``block_index``'s decoded frames that the latent frames ``part`` = [k0, k1)
    of the block give: the video's first latent frame gives 1 frame, every other ``temporal_factor``."""
    shift = (temporal_factor - 1) if block_index == 0 else 0
    k0, k1 = part
    return max(0, temporal_factor * k0 - shift), temporal_factor * k1 - shift


class IndependentDecoder:
    """Decodes any block of a chunk-local VAE's video on its own: (block_index, latents) -> uint8 frames.

    latents: (1, z_dim, n, h, w) normalised; returns (f, H, W, 3) uint8, f = 1 + 4(n - 1) for block 0,
    4n after, equal to the frames a :class:`hpcvideo.decode.StreamingDecoder` gives for that block in a
    streamed decode of the whole video. Raises ValueError when ``vae`` is not chunk-local."""

    def __init__(self, vae, *, device="cpu"):
        if not is_chunk_local(vae):
            raise ValueError("IndependentDecoder needs a chunk-local VAE decoder (its causal past taps all zero); "
                             "decode this VAE with hpcvideo.decode.StreamingDecoder, in order")
        self.stream = StreamingDecoder(vae, device=device)

    @torch.no_grad()
    def decode(self, block_index: int, latents: torch.Tensor, *, first_latent_frame: int = 0) -> np.ndarray:
        """latents: latent frames [k0, k0 + m) of block ``block_index`` (k0 = ``first_latent_frame``), shape
        (1, z_dim, m, h, w) -> their uint8 frames (f, H, W, 3): f = 1 + 4(m - 1) when they start the video
        (block 0, k0 = 0), 4m otherwise; the frames the streamed decode gives for those latent frames."""
        stream = self.stream
        if block_index == 0 and first_latent_frame == 0:
            stream.reset()  # the video's first latent frame: 1 frame, the decoder's first-chunk path
        elif stream.num_latent_frames_decoded == 0:
            # any carry past the first frame will do (it meets only zero weights): one zero latent frame
            stream.decode_block(torch.zeros_like(latents[:, :, :1]))
        return to_uint8(stream.decode_block(latents))


class SpreadBlockSink:
    """The runner's DualParal sink on every rank, decoding about 1/N of every block here (module docstring).

    ``store``: the run store on rank 0 (None elsewhere); ``decoder``: an :class:`IndependentDecoder`;
    ``env``: :class:`hpcvideo.runtime.RankEnv`; ``latent_shape``: (C, h, w) of a latent frame;
    ``frame_shape``: (H, W) of the frames;
    ``block_latent_frames``: n; ``max_pending``: the bound of rank 0's write queue (memory independent of
    the video's length)."""

    def __init__(self, store, decoder: IndependentDecoder, env, *, latent_shape: tuple[int, int, int],
                 frame_shape: tuple[int, int], block_latent_frames: int, temporal_factor: int = 4,
                 max_pending: int = 4, faults: FaultPlan = NO_FAULTS) -> None:
        self.store, self.decoder, self.env = store, decoder, env
        self.rank, self.world_size = env.rank, env.world_size
        self.faults = faults
        self.latent_shape, self.block_latent_frames = tuple(latent_shape), block_latent_frames
        self.temporal_factor = temporal_factor
        self.frames_per_block = temporal_factor * block_latent_frames
        self.frame_shape = tuple(frame_shape)
        self.decode_s = self.wait_s = self.write_s = self.send_s = 0.0
        self.decode_blocks = self.decode_blocks_at_end = self.decode_latent_frames = 0
        self.decode_taken_over = 0  # rank 0: latent frames it decoded while another rank was there (the others were behind)
        self.max_outstanding = MAX_OUTSTANDING_BLOCKS * block_latent_frames  # latent frames, per other rank
        self.blocks_submitted = 0
        self.comm = env.comm.Dup() if self.world_size > 1 else None  # collective: every rank builds its sink
        self._sends: deque = deque()  # (request, buffer) not known complete
        self._frames_in: deque = deque()  # rank 0: (block, frames buffer, [(rank, request, latent frames) of its runs]), in submit order
        self._latents_in: tuple | None = None  # other ranks: (buffer, request) of the next latents message
        self._ended = False  # other ranks: rank 0 said that no block follows
        c, h, w = self.latent_shape
        self._message_size = c * block_latent_frames * h * w + 3  # the latents, the block index, the run [k0, k1)
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread = None
        if store is not None:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._run, name="hpcvideo-spread-sink", daemon=True)
            self._thread.start()

    # -- what the runner reads ---------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return {"decode_s": round(self.decode_s, 4), "decode_blocks": self.decode_blocks,
                "decode_blocks_at_end": self.decode_blocks_at_end, "decode_latent_frames": self.decode_latent_frames,
                "decode_taken_over": self.decode_taken_over,
                "send_s": round(self.send_s, 4), "write_s": round(self.write_s, 4),
                "sink_wait_s": round(self.wait_s, 4)}

    # -- rank 0's writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
            except BaseException as error:  # re-raised in the caller's thread
                self._error = error
            finally:
                self._queue.task_done()

    def _write(self, kind: str, block_index: int, data) -> None:
        start = time.perf_counter()
        if kind == "latents":
            self.store.write_block_latents(block_index, data)
        else:
            self.store.write_block_frames(block_index, data)
        self.faults.fire(kind, block_index)
        self.store.mark_done(kind, block_index)
        self.write_s += time.perf_counter() - start

    def _put(self, item) -> None:
        self._raise()
        start = time.perf_counter()
        self._queue.put(item)
        self.wait_s += time.perf_counter() - start

    def _raise(self) -> None:
        if self._error is not None:
            path = None if self.store is None else self.store.path
            raise RuntimeError(f"decoding/writing to the run store {path} failed: {self._error!r}") from self._error

    def _decode(self, block_index: int, latents: torch.Tensor, first_latent_frame: int = 0) -> np.ndarray:
        start = time.perf_counter()
        frames = self.decoder.decode(block_index, latents, first_latent_frame=first_latent_frame)
        self.decode_s += time.perf_counter() - start
        self.decode_latent_frames += latents.shape[2]
        return frames

    def _decode_parts(self, block_index: int, latents: torch.Tensor, parts: list[tuple[int, int]]):
        """Decode this rank's ``parts`` of a block (latents (1, C, n, h, w)): yields (part, frames)."""
        if parts:
            self.decode_blocks += 1
        for k0, k1 in parts:
            yield (k0, k1), self._decode(block_index, latents[:, :, k0:k1], k0)

    def _isend(self, array: np.ndarray, dst: int, tag: int) -> None:
        start = time.perf_counter()
        array = np.ascontiguousarray(array)
        self._sends.append((self.comm.Isend(array, dest=dst, tag=tag), array))
        while self._sends and self._sends[0][0].Test():
            self._sends.popleft()
        self.send_s += time.perf_counter() - start

    def _wait(self, request) -> None:
        start = time.perf_counter()
        while not request.Test():
            time.sleep(POLL_S)
        self.wait_s += time.perf_counter() - start

    # -- the sink protocol ---------------------------------------------------------------------------
    def submit(self, block_index: int, latents: torch.Tensor) -> None:
        """Rank 0: block ``block_index`` left the queue (latents (1, C, n, h, w) float32, not modified
        afterwards): its latents are written, its latent frames split between the ranks (:func:`split_block`),
        the other ranks that get a run are sent the latents, and rank 0 decodes its own run; the block's
        frames are written once every run is here."""
        latents = latents.detach().float().cpu()
        self._put(("latents", block_index, latents[0].permute(1, 0, 2, 3).numpy()))
        self.blocks_submitted = max(self.blocks_submitted, block_index + 1)
        frames = np.empty((self.frames_per_block - (self.temporal_factor - 1) * (block_index == 0), *self.frame_shape, 3),
                          dtype=np.uint8)
        runs = split_block(block_index, self.block_latent_frames, self._outstanding(), self.max_outstanding)
        requests = []
        flat = None
        n = self.block_latent_frames
        for dst in range(1, self.world_size):
            if runs[dst] is None:
                continue
            k0, k1 = runs[dst]
            if flat is None:
                flat = latents.numpy().ravel()
            self._isend(np.concatenate([flat, np.float32([block_index, k0, k1])]).astype(np.float32), dst, LATENTS_TAG)
            a, b = part_frames(block_index, (k0, k1), self.temporal_factor)
            tag = (block_index * n + k0) % TAG_SPACE
            requests.append((dst, self.comm.Irecv(frames[a:b], source=dst, tag=tag), k1 - k0))
        if runs[0] is not None:
            if self.world_size > 1:
                self.decode_taken_over += runs[0][1] - runs[0][0]
            for part, decoded in self._decode_parts(block_index, latents, [runs[0]]):
                a, b = part_frames(block_index, part, self.temporal_factor)
                frames[a:b] = decoded
        self._frames_in.append((block_index, frames, requests))
        self.poll()

    def _outstanding(self) -> list[int]:
        """Rank 0: per rank, the latent frames it was given whose frames have not arrived (index 0: 0)."""
        outstanding = [0] * self.world_size
        for _, _, requests in self._frames_in:
            for src, request, count in requests:
                if not request.Test():
                    outstanding[src] += count
        return outstanding

    def poll(self) -> None:
        """Between ticks: rank 0 writes the blocks whose every part is here; another rank decodes its parts
        of the blocks whose latents arrived and sends their frames to rank 0. Never blocks on another rank."""
        if self.store is not None:
            self._raise()
            while self._frames_in and all(request.Test() for _, request, _ in self._frames_in[0][2]):
                block_index, frames, _ = self._frames_in.popleft()
                self._put(("frames", block_index, frames))
            return
        while not self._ended:
            if not self._post_next()[1].Test():
                return
            self._decode_received(at_end=False)

    def _post_next(self):
        """Other ranks: (buffer, request) of the next latents message from rank 0 (posted once). A message is
        the block's latents, flattened, then its index (exact in float32 below 2**24
        blocks), and the run [k0, k1) of its latent frames to decode here; index -1 ends the run."""
        if self._latents_in is None:
            buffer = np.empty(self._message_size, dtype=np.float32)
            self._latents_in = (buffer, self.comm.Irecv(buffer, source=0, tag=LATENTS_TAG))
        return self._latents_in

    def _decode_received(self, *, at_end: bool) -> None:
        buffer, _ = self._latents_in
        self._latents_in = None
        j, k0, k1 = (int(x) for x in buffer[-3:])
        if j < 0:
            self._ended = True
            return
        self.decode_blocks_at_end += at_end
        c, h, w = self.latent_shape
        n = self.block_latent_frames
        latents = torch.from_numpy(buffer[:-3].reshape(1, c, n, h, w))
        for part, frames in self._decode_parts(j, latents, [(k0, k1)]):
            self._isend(frames, 0, (j * n + part[0]) % TAG_SPACE)

    def flush(self) -> None:
        """Rank 0: every latents chunk submitted, and every frames chunk decoded here or arrived, is on disk
        with its marker (frames still being decoded elsewhere are not waited for: see the module docstring)."""
        if self.store is None:
            return
        self.poll()
        start = time.perf_counter()
        self._queue.join()
        self.wait_s += time.perf_counter() - start
        self._raise()

    def finish(self) -> None:
        """End of the run: every rank decodes the rest of its blocks; rank 0 writes every frame."""
        if self.store is None:
            while not self._ended:
                self._wait(self._post_next()[1])
                self._decode_received(at_end=True)
            for request, _ in self._sends:
                self._wait(request)
            self._sends.clear()
        else:
            for dst in range(1, self.world_size):  # no more blocks
                self._isend(np.full(self._message_size, -1.0, dtype=np.float32), dst, LATENTS_TAG)
            while self._frames_in:
                block_index, frames, requests = self._frames_in.popleft()
                for _, request, _ in requests:
                    self._wait(request)
                self._put(("frames", block_index, frames))
            for request, _ in self._sends:
                self._wait(request)
            self._sends.clear()
            start = time.perf_counter()
            self._queue.join()
            self.wait_s += time.perf_counter() - start
            self._raise()

    @property
    def frames_from_latents(self) -> int:
        """For the checkpoint's record: the blocks below this number whose frames are not written yet (parts
        still on another rank) are decoded again from their latents by :meth:`load_state_dict` on a resume
        (:func:`hpcvideo.store.recovery.plan_resume` does not pass over the checkpoint for them)."""
        return int(self.blocks_submitted)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the number of blocks submitted (their latents are on disk)."""
        return {"kind": STATE_KIND, "blocks_submitted": int(self.blocks_submitted)}

    def load_state_dict(self, state) -> None:
        """Rank 0, resuming: decode again the blocks the checkpoint covers whose frames were not written
        (they were being decoded on another rank). A streaming sink's state (decoder carry) needs nothing:
        that sink wrote every frame before its checkpoint."""
        from .parallel_vae import SINK_STATE_KIND as ROWS_KIND  # a row-parallel sink's state: the same count

        if not isinstance(state, dict) or state.get("kind") not in (STATE_KIND, ROWS_KIND):
            return
        store = self.store
        covered = min(int(state["blocks_submitted"]), store.num_blocks)
        self.blocks_submitted = covered
        latents_done, frames_done = store.done("latents"), store.done("frames")
        n = store.block_latent_frames
        for j in range(covered):
            if frames_done[j] or not latents_done[j]:
                continue
            latents = torch.from_numpy(np.asarray(store.read_latents(j * n, (j + 1) * n)))  # (n, C, h, w)
            self.decode_blocks += 1
            self._write("frames", j, self._decode(j, latents.permute(1, 0, 2, 3).unsqueeze(0)))
            log.info("decoded block %d again from its stored latents (its frames were not written)", j)

    def close(self) -> None:
        """Stop rank 0's writer thread after its queue is written (idempotent; never collective: a
        message another rank still owes is not waited for, its receive is cancelled; a resume decodes
        that block again)."""
        pending = [request for _, _, requests in self._frames_in for _, request, _ in requests]
        if self._latents_in is not None:
            pending.append(self._latents_in[1])
        self._frames_in.clear()
        self._latents_in = None
        for request in pending:
            request.Cancel()
            request.Wait()  # returns at once: the receive is cancelled (or had completed)
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            start = time.perf_counter()
            self._queue.join()
            self.wait_s += time.perf_counter() - start
            self._raise()
        finally:
            self._queue.put(None)
            self._thread.join()


def make_sink(ctx, vae):
    """The DualParal sink of this rank: a :class:`SpreadBlockSink` on every rank when ``vae`` is chunk-local,
    else rank 0's streaming :class:`hpcvideo.writer.BlockSink` (None on the other ranks). ``vae``: this
    rank's VAE (every rank loads it: the answer is the same everywhere, computed from the same weights)."""
    env, cfg = ctx.env, ctx.cfg
    if getattr(cfg.runtime, "vae_decode", "auto") == "rows" and env.world_size > 1:
        from .parallel_vae import make_patch_sink  # every rank decodes a band of rows of every block

        return make_patch_sink(ctx, vae)
    if is_chunk_local(vae):
        info = ctx.info
        scale = info["vae_scale_factor_spatial"]
        return SpreadBlockSink(
            ctx.store, IndependentDecoder(vae, device=env.device), env,
            latent_shape=(info["latent_channels"], cfg.video.height // scale, cfg.video.width // scale),
            frame_shape=(cfg.video.height, cfg.video.width), block_latent_frames=cfg.strategy.block_latent_frames,
            temporal_factor=info["vae_temporal_stride"], faults=ctx.faults)
    if not env.is_main:
        return None
    from .writer import BlockSink

    return BlockSink(ctx.store, StreamingDecoder(vae, device=env.device), faults=ctx.faults)
