"""Checkpoints in the run store: two slots per kind and a pointer switched atomically.

::

    RUN.zarr/state/<kind>          group; its attrs are the pointer: slot, tick, num_blocks, written_at,
                                   nbytes, sha256, stale_from (when given), previous (the pointer before
                                   this one)
    RUN.zarr/state/<kind>_0, _1    (nbytes,) uint8, the two slots; attrs "checkpoint": the slot's own
                                   record (the pointer's fields but previous), written before its bytes
    RUN.zarr/state/frames_tail     the kind holding every decoded frame of the last block when it reaches
                                   past num_frames (RunStore.write_block_frames), so a longer num_frames on
                                   the same blocks is completed without decoding again

Every record is recoverable: when the pointer is unreadable (a damaged or emptied ``zarr.json``) or
missing, the slots' own records are read instead, and each record is used only if its slot's bytes
match its size and sha256. Slots written before slots kept their own record cannot be found without
the pointer.

:class:`CheckpointsMixin` is part of :class:`hpcvideo.store.RunStore`; it uses the handle's zarr store,
root group and path (``_zstore``, ``_root``, ``_path``) and its writes go through the same rules.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
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

    def save_state(self, blob: bytes, *, tick: int, num_blocks: int, kind: str = "resume",
                   stale_from: int | None = None, frames_from_latents: int | None = None) -> None:
        """Save a checkpoint blob, crash-safe.

        The blob goes to the inactive slot array ``state/<kind>_<1-active>`` (its attrs: the record);
        only after it is fully written is the pointer (attrs of group ``state/<kind>``: slot, tick,
        num_blocks, written_at, nbytes, sha256, stale_from, previous) rewritten, atomically. A SIGKILL
        at any instant leaves the old or the new checkpoint, never a mix. ``stale_from``: the first
        block the run recomputes when it resumes from this checkpoint (kept in the record, so a
        resume that must recompute a damaged block can pick a checkpoint before it). With an
        unreadable pointer the slot of the newest intact record is kept and the other written. Different
        kinds may be saved by different ranks; one kind by one rank. ``frames_from_latents``: the blocks
        below it whose frames are not done are decoded again from their stored latents by a resume from this
        checkpoint (a sink that decodes on several ranks: :mod:`hpcvideo.parallel_decode`), so they do not
        make it pass over this checkpoint (:func:`hpcvideo.store.recovery.plan_resume`).
        """
        self._require_writable()
        check_kind(kind)
        blob = bytes(blob)
        pointer, damaged = self._pointer(kind)
        if damaged:
            records = self.checkpoint_records(kind)
            newest = next((m for m in records if self._slot_intact(kind, m)), None)
            pointer = None if newest is None else {**newest, "previous": None}
        slot = 0 if pointer is None else 1 - int(pointer["slot"])
        nbytes = len(blob)
        meta = {"slot": slot, "tick": int(tick), "num_blocks": int(num_blocks), "written_at": time.time(),
                "nbytes": nbytes, "sha256": hashlib.sha256(blob).hexdigest()}
        if stale_from is not None:
            meta["stale_from"] = int(stale_from)
        if frames_from_latents is not None or (pointer or {}).get("frames_from_latents") is not None:
            # always replaced: the pointer's attributes are updated, not rewritten, so a key left out would stay
            meta["frames_from_latents"] = None if frames_from_latents is None else int(frames_from_latents)
        arr = self._root.create_array(
            f"state/{kind}_{slot}", shape=(nbytes,), chunks=(max(1, min(nbytes, self.STATE_CHUNK_BYTES)),),
            dtype="uint8", fill_value=0, overwrite=True, dimension_names=("byte",), compressors=None,
            config={"write_empty_chunks": True}, attributes={"checkpoint": meta})
        if nbytes:
            arr[:] = np.frombuffer(blob, dtype=np.uint8)
        meta = {**meta, "previous": None if pointer is None else {k: v for k, v in pointer.items() if k != "previous"}}
        if damaged:  # rewrite the unreadable group metadata whole
            self._root.create_group(f"state/{kind}", attributes=meta, overwrite=True)
            return
        try:
            group = zarr.open_group(self._zstore, path=f"state/{kind}", mode="r+", zarr_format=3)
        except FileNotFoundError:
            self._root.create_group(f"state/{kind}", attributes=meta)
        else:
            # The commit point: one atomic rewrite of state/<kind>/zarr.json (see _update_root_attrs).
            group.update_attributes(meta)

    def _pointer(self, kind: str) -> tuple[dict | None, bool]:
        """(pointer or None, damaged): damaged when ``state/<kind>/zarr.json`` exists but cannot be read."""
        try:
            group = zarr.open_group(self._zstore, path=f"state/{kind}", mode="r", zarr_format=3)
        except FileNotFoundError:
            return None, False
        except Exception:  # noqa: BLE001 - emptied or garbled JSON, not a group: the slots' records take over
            return None, True
        pointer = group.attrs.asdict() or None
        if pointer is not None and not {"slot", "tick", "num_blocks", "nbytes", "sha256"} <= pointer.keys():
            return None, True
        return pointer, False

    def _read_pointer(self, kind: str) -> dict | None:
        """The newest record of ``kind`` (from the pointer, or the slots' records when it is unreadable), unverified."""
        return self.latest_checkpoint(kind)

    def _slot_records(self, kind: str) -> list[dict]:
        """The records the slots of ``kind`` keep of themselves, newest first (slots without one are skipped)."""
        records = []
        for slot in (0, 1):
            try:
                arr = zarr.open_array(self._zstore, path=f"state/{kind}_{slot}", mode="r", zarr_format=3)
                meta = arr.attrs.get("checkpoint")
            except Exception:  # noqa: BLE001 - missing or damaged slot metadata
                continue
            if isinstance(meta, dict) and meta.get("slot") == slot:
                records.append(dict(meta))
        return sorted(records, key=lambda m: (m.get("written_at", 0), m.get("tick", 0)), reverse=True)

    def checkpoint_records(self, kind: str = "resume") -> list[dict]:
        """The records of ``kind``'s checkpoints, newest first, unverified: the pointer's (current, then
        previous) or, when the pointer is unreadable or missing, the slots' own records. Each: slot, tick,
        num_blocks, written_at, nbytes, sha256 (+ stale_from when saved with it)."""
        check_kind(kind)
        pointer, damaged = self._pointer(kind)
        if pointer is None:
            return self._slot_records(kind)
        return [{k: v for k, v in m.items() if k != "previous"} for m in (pointer, pointer.get("previous")) if m]

    def pointer_damaged(self, kind: str = "resume") -> bool:
        """True when ``state/<kind>/zarr.json`` exists but cannot be read as a checkpoint pointer."""
        return self._pointer(kind)[1]

    def latest_checkpoint(self, kind: str = "resume") -> dict | None:
        """The newest record of ``kind`` (see :meth:`checkpoint_records`), not verified; None if there is none."""
        records = self.checkpoint_records(kind)
        return records[0] if records else None

    def _slot_intact(self, kind: str, meta: dict) -> bool:
        try:
            self._read_slot(kind, meta)
        except Exception:  # noqa: BLE001
            return False
        return True

    def repair_checkpoints(self) -> list[str]:
        """Make every checkpoint pointer name intact slots again: an unreadable pointer, or one whose newest
        record does not verify, is rewritten from the newest intact records (the slots' own, or its
        previous one); a kind with no intact record left loses its pointer. Call from the one rank that
        saves checkpoints, before a resume. Returns one line per repair (nothing: nothing to repair)."""
        self._require_writable()
        done = []
        folder = self._path / "state"
        kinds = sorted({p.name[:-2] if p.name.endswith(("_0", "_1")) else p.name
                        for p in folder.iterdir() if p.is_dir()}) if folder.is_dir() else []
        for kind in kinds:
            pointer, damaged = self._pointer(kind)
            records = self.checkpoint_records(kind)
            if not damaged and (pointer is None or self._slot_intact(kind, records[0])):
                continue
            seen, intact = set(), []
            for meta in records + ([] if damaged else self._slot_records(kind)):
                if meta["slot"] not in seen and self._slot_intact(kind, meta):
                    seen.add(meta["slot"])
                    intact.append(meta)
            intact.sort(key=lambda m: (m.get("written_at", 0), m.get("tick", 0)), reverse=True)
            why = "unreadable" if damaged else f"its newest record (tick {records[0]['tick']}) does not verify"
            if intact:
                meta = {**intact[0], "previous": intact[1] if len(intact) > 1 else None}
                self._root.create_group(f"state/{kind}", attributes=meta, overwrite=True)
                done.append(f"checkpoint pointer '{kind}' was {why}: now names tick {meta['tick']} (slot {meta['slot']})")
            else:  # nothing to resume from: as if never saved
                for name in (kind, f"{kind}_0", f"{kind}_1"):
                    shutil.rmtree(folder / name, ignore_errors=True)
                done.append(f"checkpoint pointer '{kind}' was {why} and no slot verifies: dropped")
        return done

    def intact_checkpoints(self, kind: str = "resume"):
        """Yield (blob, meta) of every checkpoint of ``kind`` whose slot verifies, newest first (lazily:
        a slot is read when the caller asks for the next one); (None, (meta, error)) for one that does not."""
        for meta in self.checkpoint_records(kind):
            try:
                yield self._read_slot(kind, meta), meta
            except Exception as e:  # noqa: BLE001 - missing file, undecodable chunk, wrong size or hash
                yield None, (meta, e)

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
        pointer, damaged = self._pointer(kind)
        if damaged:
            warnings.warn(f"run store {self._path}: the pointer of checkpoint '{kind}' (state/{kind}/zarr.json) "
                          "is unreadable; using the slots' own records", stacklevel=2)
        errors = []
        for blob, meta in self.intact_checkpoints(kind):
            if blob is None:
                meta, e = meta
                errors.append(f"slot {meta['slot']} (tick {meta['tick']}): {e}")
                continue
            if errors:
                warnings.warn(f"run store {self._path}: checkpoint '{kind}' is corrupt "
                              f"({errors[0]}); using the previous one at tick {meta['tick']}", stacklevel=2)
            return blob, meta
        if errors or damaged:
            warnings.warn(f"run store {self._path}: no intact checkpoint '{kind}' "
                          f"({'; '.join(errors) or 'no slot keeps its own record'}); not using it",
                          stacklevel=2)  # the caller says what it resumes from instead
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
