"""Verified data in the run store: a checksum in every done marker, the check of a whole store, and the
progress summary kept as the run goes.

::

    RUN.zarr/done/latents    (num_blocks,) uint64: 0 = not done, else MARKER_FLAG | crc32 of the block's
                             latents (n, C, h, w) float32, C order, as written
    RUN.zarr/done/frames     (num_blocks,) uint64: 0 = not done, else MARKER_FLAG | crc32 of the block's
                             frames below num_frames (f, H, W, 3) uint8 (frames[start:cut] of frame_range)
    RUN.zarr/done/zarr.json  attrs "summary": {"num_blocks", "latents": {"count", "leading"},
                             "frames": {"count", "leading", "written"}}: done blocks, the leading run of
                             done blocks, frames of the done blocks (updated with every marker)

The checksum is taken of the array as written (one ``zlib.crc32`` of the bytes zarr is handed) and stored
in the marker itself, so data and checksum become visible together (the marker is written after the
data, as one atomic file). Reading a block back and comparing finds flipped bytes (zarr's zstd chunks
carry no checksum of their own: a flipped byte decodes to other numbers), a chunk copied over another,
and a deleted chunk (read back as zeros). The frames of block j > 0 begin in chunk j-1, so a damaged
frames chunk shows in every block that reads from it.

Stores made before checksums have uint8 markers (1 = done): they open, run, resume and export as before;
their markers keep no checksum, so :meth:`IntegrityMixin.verify_blocks` reads their blocks (an unreadable
chunk is still found) but reports them "unverified" rather than intact. A marker of exactly 1 in a store
made with checksums (written by an earlier hpcvideo resuming it) is read the same way: a checksum always
has the MARKER_FLAG bit set.

The summary makes ``status`` independent of the video's length (no read of every marker chunk). It is
exact with one marker writer at a time (DualParal: rank 0). Video-Infinity's ranks write their own
clips' markers at the end of a run, concurrently; its stores have one clip per rank, so
:meth:`IntegrityMixin.done_summary` counts the markers of any store of at most ``SCAN_MAX_BLOCKS`` blocks
instead of trusting the summary.

:class:`IntegrityMixin` is part of :class:`hpcvideo.store.RunStore`.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import numpy as np
import zarr

from .base import DONE_KINDS, StoreError

MARKER_FLAG = 1 << 32  # marker = MARKER_FLAG | crc32: never 0, whatever the crc
MARKER_DTYPE = "uint64"
SCAN_MAX_BLOCKS = 256  # stores up to this many blocks: status counts the markers (exact with any writers)
VERIFY_BATCH_BLOCKS = 64  # blocks read per zarr call when verifying


def checksum(data: np.ndarray) -> int:
    """crc32 of ``data``'s bytes in C order (the bytes a block's chunk holds)."""
    return zlib.crc32(np.ascontiguousarray(data).tobytes()) & 0xFFFFFFFF


def marker_value(data: np.ndarray) -> int:
    """The done marker of a block whose data is ``data``: MARKER_FLAG | crc32 (never 0)."""
    return MARKER_FLAG | checksum(data)


@dataclass(frozen=True)
class Damage:
    """A done block that does not verify: ``kind`` ("latents" | "frames"), ``block`` index, ``reason``."""

    kind: str
    block: int
    reason: str

    def __str__(self) -> str:
        return f"block {self.block} {self.kind}: {self.reason}"


class IntegrityMixin:
    """Checksummed done markers, block verification and the done summary of :class:`hpcvideo.store.RunStore`.

    Uses the handle's ``_done`` arrays, ``_latents``, ``_frames``, ``_zstore`` and ``frame_range``."""

    # ------------------------------------------------------------------ checksums
    def _init_integrity(self) -> None:
        if not hasattr(self, "_pending_markers"):
            self._pending_markers: dict[tuple[str, int], int] = {}
            self._summary_lock = threading.Lock()
            self._summary_cache: dict | None = None

    def has_checksums(self, kind: str = "latents") -> bool:
        """True when this store's ``kind`` markers hold checksums (stores made before them: False)."""
        return np.dtype(self._done[kind].dtype).itemsize >= 8

    def _remember_marker(self, kind: str, block_index: int, data: np.ndarray) -> None:
        """Keep the marker of the data just written, for :meth:`mark_done` (computed only if markers hold it)."""
        if self.has_checksums(kind):
            self._pending_markers[(kind, int(block_index))] = marker_value(data)

    def _new_marker(self, kind: str, block_index: int) -> int:
        """The marker value for ``mark_done``: the checksum of what this handle wrote, else of what is on disk."""
        if not self.has_checksums(kind):
            return 1
        value = self._pending_markers.pop((kind, block_index), None)
        if value is None:
            value = marker_value(self._read_block(kind, block_index))
        return value

    def _read_block(self, kind: str, block_index: int) -> np.ndarray:
        if kind == "latents":
            n = self.block_latent_frames
            return self._latents[block_index * n:(block_index + 1) * n]
        a, b = self.frame_range(block_index)
        return self._frames[a:b]

    # ------------------------------------------------------------------ verification
    def verify_blocks(self, kinds=DONE_KINDS, blocks=None) -> tuple[list[Damage], dict]:
        """Read back every done block of ``kinds`` (default: all; ``blocks``: an iterable of indices) and
        compare it with its marker's checksum.

        Returns (damage, counts): the blocks that do not verify (unreadable chunk, checksum mismatch) and
        per kind ``{"done", "verified", "unverified"}`` (unverified: markers without checksum, old stores).
        Reads runs of up to ``VERIFY_BATCH_BLOCKS`` consecutive blocks per zarr call; memory stays bounded."""
        damage: list[Damage] = []
        counts = {}
        wanted = None if blocks is None else {int(j) for j in blocks}
        for kind in kinds:
            markers = self._done_values(kind)
            done = np.flatnonzero(markers)
            if wanted is not None:
                done = np.array([j for j in done if j in wanted], dtype=np.int64)
            with_sum = self.has_checksums(kind)
            c = counts[kind] = {"done": int(len(done)), "verified": 0, "unverified": 0}
            for group in _runs(done, VERIFY_BATCH_BLOCKS):
                for j, data, error in self._read_blocks(kind, group):
                    if error is not None:
                        damage.append(Damage(kind, j, f"unreadable chunk ({error})"))
                    elif not with_sum or int(markers[j]) == 1:  # 1: written by a version before checksums
                        c["unverified"] += 1
                    elif marker_value(data) != int(markers[j]):
                        damage.append(Damage(kind, j, "checksum mismatch (data changed after it was written)"))
                    else:
                        c["verified"] += 1
        return damage, counts

    def _read_blocks(self, kind: str, group: list[int]):
        """Yield (block, data or None, error or None) for ``group`` (sorted block indices): one read of
        the span when it reads, else block by block (to name the unreadable one)."""
        if not group:
            return
        first, last = group[0], group[-1]
        n = self.block_latent_frames
        try:
            if kind == "latents":
                span = self._latents[first * n:(last + 1) * n]
                for j in group:
                    yield j, span[(j - first) * n:(j - first + 1) * n], None
            else:
                lo, hi = self.frame_range(first)[0], self.frame_range(last)[1]
                span = self._frames[lo:hi]
                for j in group:
                    a, b = self.frame_range(j)
                    yield j, span[a - lo:b - lo], None
            return
        except Exception:  # noqa: BLE001 - a damaged chunk: find which block, below
            pass
        for j in group:
            try:
                yield j, self._read_block(kind, j), None
            except Exception as error:  # noqa: BLE001 - zarr/codec errors of a damaged chunk
                yield j, None, f"{type(error).__name__}: {error}"

    def _done_values(self, kind: str) -> np.ndarray:
        """Raw marker values of ``kind``, (num_blocks,) uint64, 0 where not done."""
        arr = self._done_array(kind)
        out = np.zeros(self.num_blocks, dtype=np.uint64)
        m = min(self.num_blocks, arr.shape[0])
        out[:m] = arr[:m]
        return out

    def unverified_blocks(self, *, tail_block: int | None = None) -> tuple[int, list[Damage]]:
        """(first, damage): ``first`` = the first block whose latents or frames are not done and intact
        (num_blocks if none); ``damage``: the done blocks that do not verify. A block whose frames are not
        done but are kept whole as the frames tail (``tail_block``, see
        :meth:`~hpcvideo.store.RunStore.fill_frames_from_tail`) counts as intact. Reads every done block."""
        damage, _ = self.verify_blocks()
        bad = {d.block for d in damage}
        for kind in DONE_KINDS:
            for j in np.flatnonzero(self._done_values(kind) == 0):
                if not (kind == "frames" and j == tail_block):
                    bad.add(int(j))
        return (min(bad) if bad else self.num_blocks), damage

    def drop_unreadable_chunks(self, blocks) -> list[str]:
        """Delete the chunk files of ``blocks`` ((kind, block index) pairs, e.g. :class:`Damage`) that cannot be
        decoded at all, so that rewriting those blocks (a read-modify-write where a frames block shares a
        chunk) does not fail on them; they read as zeros until rewritten. Call before recomputing those
        blocks. Returns the removed paths."""
        self._require_writable()
        removed = []
        wanted = {(b.kind, b.block) if isinstance(b, Damage) else (b[0], int(b[1])) for b in blocks}
        for kind, arr in (("latents", self._latents), ("frames", self._frames)):
            size = arr.chunks[0]
            chunks = set()
            for k, j in wanted:
                if k == kind:
                    a, b = ((j * self.block_latent_frames, (j + 1) * self.block_latent_frames)
                            if kind == "latents" else self.frame_range(j))
                    if b > a:
                        chunks.update(range(a // size, (b - 1) // size + 1))
            for c in sorted(chunks):
                path = self._path / kind / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
                if not path.exists():
                    continue
                try:
                    arr[c * size:min((c + 1) * size, arr.shape[0])]
                except Exception:  # noqa: BLE001 - undecodable: remove it
                    path.unlink()
                    removed.append(str(path))
        return removed

    # ------------------------------------------------------------------ the summary
    def _summary_group(self, mode: str = "r"):
        return zarr.open_group(self._zstore, path="done", mode=mode, zarr_format=3)

    def _scan_summary(self) -> dict:
        """The summary from every marker (reads num_blocks marker chunks per kind)."""
        out = {"num_blocks": self.num_blocks}
        for kind in DONE_KINDS:
            done = self._done_values(kind) != 0
            leading = len(done) if done.all() else int(np.argmin(done))
            out[kind] = {"count": int(done.sum()), "leading": leading}
        out["frames"]["written"] = int(sum(b - a for j in np.flatnonzero(self._done_values("frames"))
                                           for a, b in [self.frame_range(int(j))]))
        return out

    def _stored_summary(self) -> dict | None:
        try:
            summary = self._summary_group().attrs.get("summary")
        except Exception:  # noqa: BLE001 - a damaged done/zarr.json: count the markers instead
            return None
        if not isinstance(summary, dict) or summary.get("num_blocks") != self.num_blocks:
            return None
        return summary

    def done_summary(self) -> dict:
        """{"num_blocks", "latents": {"count", "leading"}, "frames": {"count", "leading", "written"}}: done
        blocks per kind, the leading run of done blocks and the frames of the done blocks. Read from the
        summary kept with the markers (no scan; O(1) of the video's length) for stores of more than
        ``SCAN_MAX_BLOCKS`` blocks that have one, else counted from the markers."""
        if self.num_blocks > SCAN_MAX_BLOCKS:
            summary = self._stored_summary()
            if summary is not None:
                return summary
        return self._scan_summary()

    def _update_summary(self, kind: str, block_index: int, old: int, new: int) -> None:
        """Apply one marker change (old -> new value) of block ``block_index`` to the kept summary.
        Called with the marker already written; one RMW of done/zarr.json under the handle's lock."""
        if bool(old) == bool(new):
            return
        with self._summary_lock:
            summary = self._summary_cache
            if summary is None:
                summary = self._stored_summary()
                if summary is not None:  # the stored one, as it was before this change
                    summary = {**summary, kind: dict(summary[kind])}
            if summary is None:
                summary = self._scan_summary()  # a store made before summaries: count once (the change included)
            else:
                entry = summary[kind]
                entry["count"] += 1 if new else -1
                if kind == "frames":
                    a, b = self.frame_range(block_index)
                    entry["written"] += (b - a) if new else -(b - a)
                if not new and block_index < entry["leading"]:
                    entry["leading"] = block_index
                elif new and block_index == entry["leading"]:
                    arr, k = self._done_array(kind), block_index + 1
                    while k < self.num_blocks and arr[k] != 0:  # blocks done out of order join the run
                        k += 1
                    entry["leading"] = k
            self._summary_group("r+").update_attributes({"summary": summary})
            self._summary_cache = summary

    def _resize_summary(self) -> None:
        """After a resize: the kept summary covers the new block count (the new blocks are not done)."""
        with self._summary_lock:
            summary = self._summary_cache or self._stored_summary_any()
            if summary is None:
                return  # counted at the first marker change
            summary = {**summary, "num_blocks": self.num_blocks}
            self._summary_group("r+").update_attributes({"summary": summary})
            self._summary_cache = summary

    def _stored_summary_any(self) -> dict | None:
        try:
            summary = self._summary_group().attrs.get("summary")
        except Exception:  # noqa: BLE001
            return None
        return summary if isinstance(summary, dict) else None

    def clear_all_done(self) -> None:
        """Mark every block not done (a run restarting from scratch writes them all again); reads only the
        summary when nothing is done."""
        summary = self.done_summary()
        for kind in DONE_KINDS:
            if summary[kind]["count"]:
                self.clear_done(kind, np.flatnonzero(self._done_values(kind)))

    def require_complete(self) -> None:
        """Raise StoreError naming the blocks whose latents or frames are not marked done (the done summary
        first: O(1) of the video's length when every block is done)."""
        summary = self.done_summary()
        if all(summary[kind]["count"] == self.num_blocks for kind in DONE_KINDS):
            return
        missing = {kind: np.flatnonzero(self._done_values(kind) == 0).tolist() for kind in DONE_KINDS}
        parts = [f"{kind} of block(s) {_blocks(blocks)}" for kind, blocks in missing.items() if blocks]
        if parts:
            raise StoreError(f"run store {self._path}: the run ended but the {' and the '.join(parts)} are not "
                             "written (another writer cleared them, or the store was changed meanwhile); "
                             "run the same command again to write them")


def _runs(indices, most: int) -> list[list[int]]:
    """Sorted ``indices`` cut into runs of consecutive indices of at most ``most`` each (one zarr read each)."""
    runs: list[list[int]] = []
    for j in (int(i) for i in indices):
        if runs and runs[-1][-1] == j - 1 and len(runs[-1]) < most:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


def _blocks(blocks: list[int]) -> str:
    return ", ".join(str(b) for b in blocks[:10]) + (f" ... ({len(blocks)} in all)" if len(blocks) > 10 else "")


VERIFY_OK, VERIFY_DAMAGED, VERIFY_INCOMPLETE = 0, 1, 3  # exit codes of `hpcvideo verify`


class VerifyMixin:
    """:meth:`verify`: the check of a whole store (``hpcvideo verify``), reading and writing nothing else."""

    def checkpoint_kinds(self) -> list[str]:
        """The checkpoint kinds present under ``state/`` (a pointer group or a slot of it)."""
        folder = self._path / "state"
        names = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        return sorted({name[:-2] if name.endswith(("_0", "_1")) else name for name in names})

    def verify(self) -> dict:
        """Read every done block back against its checksum, and every checkpoint record against its sha256.

        Returns (JSON-serialisable) ``{"path", "ok", "complete", "exit_code", "num_blocks", "blocks":
        {kind: {"done", "verified", "unverified", "missing": [block, ...]}}, "damage": [line, ...],
        "checkpoints": {kind: {"pointer": "ok" | "unreadable" | "missing", "records": [{"tick", "slot",
        "intact", "error"}]}}, "summary_ok"}``. Damage: a done block that does not verify, a pointer that
        cannot be read, a newest checkpoint record whose slot does not verify (an older record may
        be mid-overwrite: reported, not damage), a done summary that disagrees with the markers.
        ``exit_code``: VERIFY_OK (intact and complete), VERIFY_DAMAGED, VERIFY_INCOMPLETE (intact, blocks not
        done yet)."""
        damage, counts = self.verify_blocks()
        problems = [str(d) for d in damage]
        for kind in DONE_KINDS:
            counts[kind]["missing"] = np.flatnonzero(self._done_values(kind) == 0).tolist()
        checkpoints = {}
        for kind in self.checkpoint_kinds():
            pointer, unreadable = self._pointer(kind)
            records = []
            for index, meta in enumerate(self.checkpoint_records(kind)):
                try:
                    self._read_slot(kind, meta)
                    error = None
                except Exception as e:  # noqa: BLE001
                    error = f"{type(e).__name__}: {e}"
                records.append({"tick": meta["tick"], "slot": meta["slot"], "intact": error is None, "error": error})
                if index == 0 and error is not None:
                    problems.append(f"checkpoint '{kind}' at tick {meta['tick']} (slot {meta['slot']}) does not "
                                    f"verify: {error}")
            state = "unreadable" if unreadable else ("ok" if pointer is not None else "missing")
            if unreadable:
                problems.append(f"checkpoint pointer state/{kind}/zarr.json is unreadable (a resume uses the "
                                f"slots' own records: {sum(r['intact'] for r in records)} intact)")
            checkpoints[kind] = {"pointer": state, "records": records}
        stored = self._stored_summary()
        summary_ok = stored is None or stored == self._scan_summary()
        if not summary_ok and self.num_blocks > SCAN_MAX_BLOCKS:  # smaller stores: status counts the markers
            problems.append("the done summary disagrees with the markers (status would be wrong)")
        complete = all(not counts[kind]["missing"] for kind in DONE_KINDS) and self.num_blocks > 0
        code = VERIFY_DAMAGED if problems else (VERIFY_OK if complete else VERIFY_INCOMPLETE)
        return {"path": str(self._path), "ok": not problems, "complete": complete, "exit_code": code,
                "num_blocks": self.num_blocks, "blocks": counts, "damage": problems, "checkpoints": checkpoints,
                "summary_ok": summary_ok}


def format_verify(report: dict) -> str:
    """:meth:`VerifyMixin.verify`'s report as the lines ``hpcvideo verify`` prints."""
    state = "damaged" if not report["ok"] else ("intact, complete" if report["complete"] else "intact, incomplete")
    lines = [f"{report['path']}: {state}"]
    for kind, c in report["blocks"].items():
        extra = f", {c['unverified']} without checksum (made before checksums)" if c["unverified"] else ""
        missing = f"; not done: {_blocks(c['missing'])}" if c["missing"] else ""
        lines.append(f"{kind:<10} {c['done']}/{report['num_blocks']} blocks done, {c['verified']} verified{extra}{missing}")
    for kind, info in report["checkpoints"].items():
        records = ", ".join(f"tick {r['tick']} {'intact' if r['intact'] else 'DAMAGED'}" for r in info["records"])
        lines.append(f"checkpoint {kind}: pointer {info['pointer']}; {records or 'no record'}")
    lines += [f"DAMAGE     {line}" for line in report["damage"]]
    if not report["ok"]:
        lines.append("rerun the same generate command to recompute what does not verify")
    return "\n".join(lines)
