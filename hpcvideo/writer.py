"""Background writes of finished blocks, so the denoising loop does not wait on compression and disk.

One thread, one bounded queue: ``submit`` hands over a finished block (latents, frames) and returns;
the thread writes the data, then its done marker (data first, marker second, as DESIGN §5 asks).
``flush`` waits until everything submitted is on disk: it is called before every checkpoint, because
a checkpoint says "every block before this tick is written" — after a kill, the blocks it covers
are never recomputed. An error in the thread is raised again on the next submit/flush/close.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .faults import fault
from .store import RunStore


class BlockWriter:
    """Writes finished blocks to ``store`` on a background thread.

    ``max_pending`` bounds the blocks held in memory (each: latents (n, C, h, w) float32 and frames
    (f, H, W, 3) uint8), so memory stays independent of the video's length. ``wait_s`` accumulates the
    seconds the caller spent blocked on the store (a full queue or a flush).
    """

    def __init__(self, store: RunStore, *, max_pending: int = 2) -> None:
        self.store = store
        self.wait_s = 0.0
        self.write_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hpcvideo-block-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    start = time.perf_counter()
                    kind, block_index, data = item
                    if kind == "latents":
                        self.store.write_block_latents(block_index, data)
                    else:
                        self.store.write_block_frames(block_index, data)
                    fault(kind, block_index)
                    self.store.mark_done(kind, block_index)
                    self.write_s += time.perf_counter() - start
            except BaseException as error:  # re-raised in the caller's thread
                self._error = error
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing to the run store {self.store.path} failed: {self._error!r}") from self._error

    def submit(self, kind: str, block_index: int, data: np.ndarray) -> None:
        """Queue block ``block_index``'s ``kind`` ("latents" or "frames") data for writing."""
        self._raise()
        start = time.perf_counter()
        self._queue.put((kind, block_index, data))
        self.wait_s += time.perf_counter() - start

    def flush(self) -> None:
        """Block until every submitted write and its done marker is on disk."""
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
