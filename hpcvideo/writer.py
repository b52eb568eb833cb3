"""Decode and write finished blocks in the background, overlapping the denoising loop.

One thread, one bounded queue: ``submit`` hands over a block that left the queue and returns; the
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

import queue
import threading
import time
from contextlib import nullcontext

import torch

from .decode import StreamingDecoder, to_uint8
from .faults import fault
from .store import RunStore


class BlockSink:
    """Decodes and writes finished blocks to ``store`` on a background thread.

    ``max_pending`` bounds the blocks held in memory (latents (1, C, n, h, w) each, plus frames when
    decoded in the caller's thread), so memory stays independent of the video's length. Seconds:
    ``wait_s`` the caller spent blocked on the store (full queue or flush), ``decode_s`` decoding,
    ``write_s`` writing (in the thread).
    """

    def __init__(
        self, store: RunStore, decoder: StreamingDecoder, *, decode_in_background: bool | None = None, max_pending: int = 2
    ) -> None:
        self.store = store
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
        fault("latents", block_index)
        self.store.mark_done("latents", block_index)
        self.write_s += time.perf_counter() - start
        if frames is None:
            frames = self._decode(latents)
        start = time.perf_counter()
        self.store.write_block_frames(block_index, frames)
        fault("frames", block_index)
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

    def close(self) -> None:
        """Flush and stop the thread."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
