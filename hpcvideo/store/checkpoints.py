"""Checkpoints in the run store: two slots per kind and a pointer switched atomically.

::

    RUN.zarr/state/<kind>          group; its attrs are the pointer: slot, tick, num_blocks, written_at,
                                   nbytes, sha256, previous (the pointer before this one)
    RUN.zarr/state/<kind>_0, _1    (nbytes,) uint8, the two slots
    RUN.zarr/state/frames_tail     the kind holding every decoded frame of the last block when it reaches
                                   past num_frames (RunStore.write_block_frames), so a longer num_frames on
                                   the same blocks is completed without decoding again

:class:`CheckpointsMixin` is part of :class:`hpcvideo.store.RunStore`; it uses the handle's zarr store,
root group and path (``_zstore``, ``_root``, ``_path``) and its writes go through the same rules.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import warnings

import numpy as np
import zarr

TAIL_KIND = "frames_tail"  # checkpoint kind holding the decoded frames of a last block cut at num_frames
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_kind(kind: str) -> None:
    """Raise ValueError unless ``kind`` is a valid checkpoint kind (a name, not ending in a slot suffix)."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or re.search(r"_[01]$", kind):
        raise ValueError(f"checkpoint kind must match {_KIND_RE.pattern} and not end in _0/_1 "
                         f"(slot names), got {kind!r}")


class CheckpointsMixin:
    """``save_state`` / ``load_state`` and the kept frames tail of :class:`hpcvideo.store.RunStore`."""

    STATE_CHUNK_BYTES = 16 * 2**20  # chunk size of a checkpoint slot, bytes

    def save_state(self, blob: bytes, *, tick: int, num_blocks: int, kind: str = "resume") -> None:
        """Save a checkpoint blob, crash-safe.

        The blob goes to the inactive slot array ``state/<kind>_<1-active>``; only after it is fully
        written is the pointer (attrs of group ``state/<kind>``: slot, tick, num_blocks,
        written_at, nbytes, sha256, previous) rewritten, atomically. A SIGKILL at any instant
        leaves the old or the new checkpoint, never a mix. Different kinds may be saved by
        different ranks; one kind by one rank.
        """
        self._require_writable()
        check_kind(kind)
        blob = bytes(blob)
        pointer = self._read_pointer(kind)
        slot = 0 if pointer is None else 1 - int(pointer["slot"])
        nbytes = len(blob)
        arr = self._root.create_array(
            f"state/{kind}_{slot}", shape=(nbytes,), chunks=(max(1, min(nbytes, self.STATE_CHUNK_BYTES)),),
            dtype="uint8", fill_value=0, overwrite=True, dimension_names=("byte",), compressors=None,
            config={"write_empty_chunks": True})
        if nbytes:
            arr[:] = np.frombuffer(blob, dtype=np.uint8)
        meta = {"slot": slot, "tick": int(tick), "num_blocks": int(num_blocks), "written_at": time.time(),
                "nbytes": nbytes, "sha256": hashlib.sha256(blob).hexdigest()}
        meta["previous"] = None if pointer is None else {k: v for k, v in pointer.items() if k != "previous"}
        try:
            group = zarr.open_group(self._zstore, path=f"state/{kind}", mode="r+", zarr_format=3)
        except FileNotFoundError:
            self._root.create_group(f"state/{kind}", attributes=meta)
        else:
            # The commit point: one atomic rewrite of state/<kind>/zarr.json (see _update_root_attrs).
            group.update_attributes(meta)

    def _read_pointer(self, kind: str) -> dict | None:
        try:
            group = zarr.open_group(self._zstore, path=f"state/{kind}", mode="r", zarr_format=3)
        except FileNotFoundError:
            return None
        return group.attrs.asdict() or None

    def _read_slot(self, kind: str, meta: dict) -> bytes:
        arr = zarr.open_array(self._zstore, path=f"state/{kind}_{meta['slot']}", mode="r", zarr_format=3)
        blob = arr[:].tobytes()
        if len(blob) != meta["nbytes"]:
            raise ValueError(f"{len(blob)} bytes, expected {meta['nbytes']}")
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError("sha256 mismatch")
        return blob

    def load_state(self, kind: str = "resume") -> tuple[bytes, dict] | None:
        """The last intact checkpoint of ``kind`` as (blob, meta) or None if there is none.

        meta: slot, tick, num_blocks, written_at (unix s), nbytes, sha256. If the active slot fails
        its size/sha256 check, warns and falls back to the previous checkpoint (if intact), else
        warns and returns None.
        """
        check_kind(kind)
        pointer = self._read_pointer(kind)
        if pointer is None:
            return None
        errors = []
        for meta in (pointer, pointer.get("previous")):
            if not meta:
                continue
            meta = {k: v for k, v in meta.items() if k != "previous"}
            try:
                blob = self._read_slot(kind, meta)
            except Exception as e:  # missing file, undecodable chunk, wrong size or hash
                errors.append(f"slot {meta['slot']} (tick {meta['tick']}): {e}")
                continue
            if errors:
                warnings.warn(f"run store {self._path}: checkpoint '{kind}' is corrupt "
                              f"({errors[0]}); using the previous one at tick {meta['tick']}", stacklevel=2)
            return blob, meta
        warnings.warn(f"run store {self._path}: no intact checkpoint '{kind}' ({'; '.join(errors)}); "
                      "not using it", stacklevel=2)  # the caller says what it resumes from instead
        return None

    # ---------------------------------------------------------------- the frames tail
    def _save_frames_tail(self, block_index: int, frames: np.ndarray) -> None:
        """Keep every decoded frame of block ``block_index``, uint8 (f, H, W, 3), as ``state/frames_tail``."""
        buffer = io.BytesIO()
        np.save(buffer, frames, allow_pickle=False)
        self.save_state(buffer.getvalue(), tick=block_index, num_blocks=self.num_blocks, kind=TAIL_KIND)

    def read_frames_tail(self) -> tuple[int, np.ndarray] | None:
        """(block index, uint8 (f, H, W, 3) every decoded frame of that block) kept by
        :meth:`write_block_frames` for a block cut at num_frames, or None."""
        saved = self.load_state(TAIL_KIND)
        if saved is None:
            return None
        blob, meta = saved
        return int(meta["tick"]), np.load(io.BytesIO(blob), allow_pickle=False)

    def fill_frames_from_tail(self, block_index: int) -> bool:
        """Write block ``block_index``'s frames below num_frames from the kept tail and mark them done;
        False (nothing written) when no tail of that block is kept."""
        tail = self.read_frames_tail()
        if tail is None or tail[0] != block_index:
            return False
        self.write_block_frames(block_index, tail[1], keep_tail=False)
        self.mark_done("frames", block_index)
        return True
