"""The Zarr run store: one Zarr v3 group per run, the single source of truth for progress.

Layout (``L`` = latent frames generated, whole blocks of ``n`` = block_latent_frames; ``N`` =
num_frames, the video's pixel frames, any number the blocks cover: ``4*(L-n-1)+1 < N <= 4*(L-1)+1``)::

    RUN.zarr/                  attrs: format_version, config, model_id, fps, block_latent_frames,
                               status, + whatever update_attrs() stores (timings, ...)
      latents                  (L, C, h, w) float32, chunks (n, C, h, w)      one chunk per block
      frames                   (N, H, W, 3) uint8,   chunks (4n, H, W, 3)     exactly the video's frames
      done/latents             (L // n,) uint64, chunks (1,)                  one file per marker: a crc32
      done/frames              (L // n,) uint64, chunks (1,)                  of the block (integrity);
                               attrs of done: the summary of the markers      (uint8, 1 = done: older stores)
      state/<kind>             group; its attrs are the checkpoint pointer (see save_state)
      state/<kind>_0, _1       (nbytes,) uint8, the two checkpoint slots
      state/frames_tail        checkpoint kind: every decoded frame of the last block when it reaches past
                               N (write_block_frames), so a longer N on the same blocks is completed
                               without decoding again (fill_frames_from_tail)
      heartbeat/rank<R>        per-rank heartbeat record (plain JSON, write_heartbeat; its fields:
                               hpcvideo.progress)
      heartbeat/ticks          (num_ticks, 2) float64 per tick [wall s, end time], see record_ticks

Block j holds latent frames ``[j*n, (j+1)*n)`` and pixel frames ``[0, 4n-3)`` for j = 0,
``[4jn-3, 4(j+1)n-3)`` for j > 0 (Wan's causal VAE decodes the first latent frame to one frame and
every other to four), cut at N: the last block's decoded frames past N are not in ``frames``. A
done/frames marker says the block's frames below N are written; growing N (resize) clears the marker
of a last block that was cut, until its missing frames are written. A frames block j > 0 therefore spans the last 3 frames of chunk j-1 and the
first 4n-3 of chunk j: zarr read-modify-writes chunk j-1. That is safe because exactly one rank
writes frames (the decoder), block after block; latents and done markers are chunk-aligned, so any
rank may write any block of them.

Rules for several processes (zarr 3.1.6 was seen to lose data without them: two processes resizing,
writes through a handle opened before a resize):

* one writer per chunk; only one rank calls create / resize / update_config / set_status /
  update_attrs / sweep_orphans (root metadata is read-modify-written from this handle's view);
* a handle opened before another process resized the store does not see the new shape, and zarr
  would silently drop writes beyond the old shape: every write here checks the region against the
  handle's shape and raises StoreError instead. Reopen (``RunStore.open`` or ``refresh()``) after
  the resize barrier;
* done markers are written AFTER the data they mark (call mark_done after write_block_*);
* every file zarr writes is atomic (temp file + rename, zarr >= 3.1.3), and so is every heartbeat
  record; a SIGKILL can leave ``<name>.<32 hex>.partial`` temp files, which sweep_orphans removes
  on resume.

This package is the only part of hpcvideo that imports zarr and the only writer of a run store,
heartbeats included. Its modules:

* ``base``: errors (:class:`StoreError`, :class:`ConfigMismatchError`), constants, frame arithmetic;
* ``run_store``: :class:`RunStore`: create / open, attrs, resize, latents, frames, done markers,
  ``sweep_orphans``, ``status_dict``;
* ``checkpoints``: ``save_state`` / ``load_state`` and the frames tail (mixed into RunStore);
* ``heartbeat``: ``write_heartbeat`` / ``read_heartbeats`` (by path, no zarr handle: any rank) and
  ``record_ticks`` / ``tick_times`` (mixed into RunStore);
* ``integrity``: checksums in the done markers, ``verify_blocks`` / ``verify`` (``hpcvideo verify``), the
  done summary (``done_summary``: status without a scan), ``require_complete`` (mixed into RunStore);
* ``recovery``: ``plan_resume``: the checkpoint a resume continues from, given what verifies.
"""

from .base import (DONE_KINDS, STATUSES, VAE_TEMPORAL_STRIDE, ConfigMismatchError, StoreError, block_frame_range,
                   num_frames_for)
from .checkpoints import TAIL_KIND
from .heartbeat import HEARTBEAT_DIR, ensure_heartbeat_group, heartbeat_path, read_heartbeats, write_heartbeat
from .run_store import RunStore

__all__ = [
    "RunStore", "StoreError", "ConfigMismatchError", "num_frames_for", "block_frame_range",
    "VAE_TEMPORAL_STRIDE", "STATUSES", "DONE_KINDS", "TAIL_KIND",
    "HEARTBEAT_DIR", "heartbeat_path", "ensure_heartbeat_group", "write_heartbeat", "read_heartbeats",
]
