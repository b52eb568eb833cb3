"""The runner's sinks: where finished units (blocks, clips) are decoded and written to the run store.

:class:`BlockSink` (DualParal, rank 0 streaming): decode and write finished blocks in the background,
overlapping the denoising loop. :class:`ClipSink` (Video-Infinity): each rank writes its own clip at
the end of the run (per-frame VAE: each rank decodes it too; causal VAE: gathered, rank 0 decodes).

BlockSink: one thread, one bounded queue: ``submit`` hands over a block that left the queue and returns; the
thread writes its latents and their done marker, decodes it with the streaming VAE decoder (on a
side CUDA stream on GPU; on CPU the decode runs in the caller's thread instead, because two threads
sharing torch's intra-op pool on a few cores slow each other down far more than they overlap:
measured 22 s -> 40 s for the tiny-cpu preset on 2 cores), then writes its frames and their marker (data first, marker second, as
docs/DESIGN.md, section 5 asks; the store keeps the frames below ``video.num_frames`` and the whole decode of a last block
that reaches past it, see :meth:`hpcvideo.store.RunStore.write_block_frames`). ``flush`` waits until everything submitted is on disk: it is called before every
checkpoint, because a checkpoint says "every block before this tick is written and the decoder state
is past it" — after a kill, the blocks it covers are never recomputed. An error in the thread is
raised again on the next submit/flush/close.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch

from .decode import StreamingDecoder, to_uint8
from .faults import NO_FAULTS, FaultPlan
from .store import RunStore

log = logging.getLogger("hpcvideo")


class BlockSink:
    """Decodes and writes finished blocks to ``store`` on a background thread.

    ``max_pending`` bounds the blocks held in memory (latents (1, C, n, h, w) each, plus frames when
    decoded in the caller's thread), so memory stays independent of the video's length. Seconds:
    ``wait_s`` the caller spent blocked on the store (full queue or flush), ``decode_s`` decoding,
    ``write_s`` writing (in the thread).
    """

    def __init__(
        self, store: RunStore, decoder: StreamingDecoder, *, decode_in_background: bool | None = None, max_pending: int = 2,
        faults: FaultPlan = NO_FAULTS,
    ) -> None:
        self.store = store
        self.faults = faults  # the tests' planned fault (hpcvideo.faults), fired between a block's data and marker
        self.decoder = decoder
        device = torch.device(getattr(decoder, "device", "cpu"))
        # default: overlap the decode on GPU only (see the module docstring)
        self.decode_in_background = device.type == "cuda" if decode_in_background is None else decode_in_background
        self.wait_s = self.decode_s = self.write_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="hpcvideo-block-sink", daemon=True)
        self._thread.start()

    def _decode(self, latents: torch.Tensor):
        start = time.perf_counter()
        with torch.no_grad(), (torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()):
            frames = to_uint8(self.decoder.decode_block(latents))
        self.decode_s += time.perf_counter() - start
        return frames

    def _write(self, block_index: int, latents: torch.Tensor, frames) -> None:
        start = time.perf_counter()
        self.store.write_block_latents(block_index, latents[0].permute(1, 0, 2, 3).float().cpu().numpy())
        self.faults.fire("latents", block_index)
        self.store.mark_done("latents", block_index)
        self.write_s += time.perf_counter() - start
        if frames is None:
            frames = self._decode(latents)
        start = time.perf_counter()
        self.store.write_block_frames(block_index, frames)
        self.faults.fire("frames", block_index)
        self.store.mark_done("frames", block_index)
        self.write_s += time.perf_counter() - start

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

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"decoding/writing to the run store {self.store.path} failed: {self._error!r}") from self._error

    def submit(self, block_index: int, latents: torch.Tensor) -> None:
        """Queue block ``block_index`` (latents (1, C, n, h, w) float32, not modified afterwards)."""
        self._raise()
        if latents.is_cuda:  # the side stream must see the finished latents
            torch.cuda.current_stream(latents.device).synchronize()
        frames = None if self.decode_in_background else self._decode(latents)
        start = time.perf_counter()
        self._queue.put((block_index, latents, frames))
        self.wait_s += time.perf_counter() - start

    def flush(self) -> None:
        """Block until every submitted block is decoded and on disk with its done markers."""
        start = time.perf_counter()
        self._queue.join()
        self.wait_s += time.perf_counter() - start
        self._raise()

    def state_dict(self):
        """The streaming decoder's carry (a checkpoint keeps it with the executor state)."""
        return self.decoder.state_dict()

    def load_state_dict(self, state) -> None:
        """Continue from a checkpoint's sink state: the streaming decoder's carry, or the state of a row-parallel
        sink (the run was checkpointed with ``runtime.vae_decode: rows``, which keeps no carry on rank 0): then
        the blocks that checkpoint covers are decoded again from their stored latents, in order, to rebuild the
        carry, and the frames of those whose frames are not done are written."""
        from .parallel_vae import SINK_STATE_KIND

        if not (isinstance(state, dict) and state.get("kind") == SINK_STATE_KIND):
            self.decoder.load_state_dict(state)
            return
        store, n = self.store, self.store.block_latent_frames
        frames_done = store.done("frames")
        covered = min(int(state["blocks_submitted"]), store.num_blocks)
        for j in range(covered):
            latents = torch.from_numpy(np.asarray(store.read_latents(j * n, (j + 1) * n)))  # (n, C, h, w)
            frames = self._decode(latents.permute(1, 0, 2, 3).unsqueeze(0).float())
            if not frames_done[j]:
                start = time.perf_counter()
                store.write_block_frames(j, frames)
                store.mark_done("frames", j)
                self.write_s += time.perf_counter() - start
        if covered:
            log.info("decoded blocks 0..%d again from their stored latents (the run was checkpointed with "
                     "runtime.vae_decode=rows, which keeps no decoder carry on rank 0)", covered - 1)

    def finish(self) -> None:
        """Everything submitted is on disk (nothing waits for the end of the run here)."""
        self.flush()

    def close(self) -> None:
        """Flush and stop the thread (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()


class ClipSink:
    """Writes the clip of each rank at the end of a Video-Infinity run (every rank holds one).

    ``submit`` keeps this rank's finished clip (latents (1, C, F, h, w)); :meth:`finish` (collective)
    writes its latents chunk and done marker, then the frames as the VAE allows: a per-frame VAE
    (``vae_kind`` "per_frame") lets each rank decode its own clip, ``DECODE_FRAMES`` frames per call; a
    causal VAE needs the clips in video order, so they are gathered to rank 0, which streams them
    through one :class:`hpcvideo.decode.StreamingDecoder`. Nothing is written before :meth:`finish`, so
    the runner's last checkpoint comes before any write and a run killed while writing redoes only the
    writes. ``scaling_factor``: the per-frame VAE's latent scale.
    """

    DECODE_FRAMES = 8  # frames per 2-D VAE decode call: bounds decode memory, as diffusers' VAE slicing

    def __init__(self, store: RunStore, vae, env, *, vae_kind: str, scaling_factor: float | None = None,
                 faults: FaultPlan = NO_FAULTS) -> None:
        self.store, self.vae, self.env = store, vae, env
        self.faults = faults  # the tests' planned fault (hpcvideo.faults), fired between a clip's data and marker
        self.vae_kind, self.scaling_factor = vae_kind, scaling_factor
        self.wait_s = self.decode_s = self.write_s = 0.0
        self._clips: list[tuple[int, torch.Tensor]] = []

    def submit(self, unit: int, latents: torch.Tensor) -> None:
        self._clips.append((unit, latents))

    def flush(self) -> None:
        """Nothing is written before :meth:`finish`."""

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def close(self) -> None:
        self._clips = []

    @torch.no_grad()
    def finish(self) -> None:
        (rank, latents), = self._clips  # one clip per rank
        start = time.perf_counter()
        self.store.write_block_latents(rank, latents[0].permute(1, 0, 2, 3).float().cpu().numpy())  # (F, C, h, w)
        self.faults.fire("latents", rank, rank=rank)
        self.store.mark_done("latents", rank)
        self.write_s += time.perf_counter() - start
        if self.vae_kind == "per_frame":  # every rank decodes its own clip
            start = time.perf_counter()
            vae = self.vae
            frames = latents[0].permute(1, 0, 2, 3).to(vae.device, vae.dtype) / self.scaling_factor  # (F, C, h, w)
            video = torch.cat([vae.decode(part, return_dict=False)[0] for part in frames.split(self.DECODE_FRAMES)])
            pixels = to_uint8(video.permute(1, 0, 2, 3).unsqueeze(0))  # (F, 3, H, W) -> (1, 3, F, H, W)
            self.decode_s += time.perf_counter() - start
            start = time.perf_counter()
            self.store.write_block_frames(rank, pixels, keep_tail=False)
            self.faults.fire("frames", rank, rank=rank)
            self.store.mark_done("frames", rank)
            self.write_s += time.perf_counter() - start
            return
        from .runtime.control import gather_object

        clips = gather_object(self.env, latents.cpu())  # a causal VAE: rank 0 decodes the clips in order
        if not self.env.is_main:
            return
        decoder = StreamingDecoder(self.vae, device=self.env.device)
        for index, clip in enumerate(clips):
            start = time.perf_counter()
            pixels = to_uint8(decoder.decode_block(clip))
            self.decode_s += time.perf_counter() - start
            start = time.perf_counter()
            self.store.write_block_frames(index, pixels, keep_tail=False)
            self.faults.fire("frames", index, rank=0)
            self.store.mark_done("frames", index)
            self.write_s += time.perf_counter() - start
