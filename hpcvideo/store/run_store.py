"""The run store's handle: create / open, attributes, resize, the latents and frames arrays and their
done markers, housekeeping and the status summary. Checkpoints (:mod:`.checkpoints`) and the per-tick
log (:mod:`.heartbeat`) are mixed in. The layout and the rules for several writers: :mod:`hpcvideo.store`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr
from zarr.storage import LocalStore

from ..config import RunConfig, config_diff
from ..config.identity import store_defaults
from .base import (DONE_KINDS, PARTIAL_RE, RESERVED_ATTRS, STATUSES, VAE_TEMPORAL_STRIDE, ConfigMismatchError,
                   StoreError, block_frame_range, check_num_frames, normalise_config, num_frames_for, positive_int)
from .checkpoints import CheckpointsMixin
from .heartbeat import TicksMixin
from .integrity import MARKER_DTYPE, IntegrityMixin, VerifyMixin


class RunStore(CheckpointsMixin, TicksMixin, IntegrityMixin, VerifyMixin):
    """A handle on one run store. Build with ``RunStore.create`` or ``RunStore.open``."""

    FORMAT_VERSION = 1

    def __init__(self, path: Path, zstore: LocalStore, mode: str):
        self._path = path
        self._zstore = zstore
        self._mode = mode
        self._init_integrity()
        self.refresh()

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path, *, config: dict, num_latent_frames: int, block_latent_frames: int,
               latent_channels: int, latent_height: int, latent_width: int,
               height: int, width: int, fps: float, model_id: str,
               vae_temporal_stride: int = VAE_TEMPORAL_STRIDE, num_frames: int | None = None) -> "RunStore":
        """Make a new run store at ``path`` (refused if a run store is already there).

        latents: (num_latent_frames, latent_channels, latent_height, latent_width) float32;
        frames: (num_frames, height, width, 3) uint8. ``num_latent_frames`` (whole blocks) must be
        a multiple of ``block_latent_frames``; ``num_frames`` (default: all decoded frames,
        4*(num_latent_frames-1)+1) must reach into the last block (ValueError otherwise). ``vae_temporal_stride``: pixel frames per latent frame
        after the first (4: Wan's causal VAE; 1: a per-frame 2-D VAE, UNet3D models, where
        num_frames = num_latent_frames). A directory left by an interrupted create (a zarr
        group without format_version) is overwritten with a warning.
        """
        n = positive_int("block_latent_frames", block_latent_frames)
        L = positive_int("num_latent_frames", num_latent_frames)
        if L % n:
            raise ValueError(f"num_latent_frames={L} must be a multiple of block_latent_frames={n}")
        C, h, w = (positive_int(k, v) for k, v in (("latent_channels", latent_channels),
                   ("latent_height", latent_height), ("latent_width", latent_width)))
        H, W = positive_int("height", height), positive_int("width", width)
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str, got {type(model_id).__name__}")
        config = normalise_config(config)
        stride = positive_int("vae_temporal_stride", vae_temporal_stride)
        F = num_frames_for(L, stride) if num_frames is None else positive_int("num_frames", num_frames)
        check_num_frames(F, L, n, stride)

        path = Path(path)
        if path.exists():
            if cls.exists(path):
                raise StoreError(f"a run store already exists at {path}; open it with RunStore.open "
                                 "(resume) or choose another path")
            if not path.is_dir():
                raise StoreError(f"{path} exists and is not a directory")
            if (path / "zarr.json").exists():
                warnings.warn(f"{path} holds an unfinished run store (interrupted create?); overwriting it",
                              stacklevel=2)
            elif any(path.iterdir()):
                raise StoreError(f"{path} exists, is not empty and is not a run store; refusing to overwrite")

        zstore = LocalStore(path)
        extra = {"vae_temporal_stride": stride} if stride != VAE_TEMPORAL_STRIDE else {}
        root = zarr.open_group(zstore, mode="w", zarr_format=3, attributes={
            "config": config, "model_id": model_id, "fps": float(fps),
            "block_latent_frames": n, "status": "created", **extra})
        root.create_array("latents", shape=(L, C, h, w), chunks=(n, C, h, w), dtype="float32",
                          fill_value=0.0,
                          dimension_names=("latent_frame", "channel", "latent_height", "latent_width"))
        root.create_array("frames", shape=(F, H, W, 3),
                          chunks=(stride * n, H, W, 3), dtype="uint8", fill_value=0,
                          dimension_names=("frame", "height", "width", "rgb"))
        # markers hold a checksum of their block (hpcvideo.store.integrity); the summary: none done yet
        done = root.create_group("done", attributes={"summary": {
            "num_blocks": L // n, "latents": {"count": 0, "leading": 0},
            "frames": {"count": 0, "leading": 0, "written": 0}}})
        for kind in DONE_KINDS:
            done.create_array(kind, shape=(L // n,), chunks=(1,), dtype=MARKER_DTYPE, fill_value=0,
                              compressors=None, dimension_names=("block",))
        root.create_group("state")
        # Written last: a store without format_version is an unfinished create.
        root.update_attributes({"format_version": cls.FORMAT_VERSION})
        return cls(path, zstore, "r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> "RunStore":
        """Open an existing run store; ``mode`` is "r" (read-only) or "r+" (read/write)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no run store at {path} (path does not exist)")
        return cls(path, LocalStore(path, read_only=(mode == "r")), mode)

    @staticmethod
    def exists(path) -> bool:
        """True if ``path`` holds a (finished-creating) run store of any format version."""
        try:
            g = zarr.open_group(LocalStore(Path(path), read_only=True), mode="r", zarr_format=3)
        except Exception:
            return False
        return "format_version" in g.attrs

    def refresh(self) -> None:
        """Re-read metadata from disk (after another process resized the store or changed attrs)."""
        try:
            root = zarr.open_group(self._zstore, mode=self._mode, zarr_format=3)
        except Exception as e:
            raise StoreError(f"{self._path} is not a Zarr v3 group, so not a run store: {e}") from e
        attrs = root.attrs.asdict()
        version = attrs.get("format_version")
        if version is None:
            raise StoreError(f"{self._path} is a Zarr group but not an hpcvideo run store (no "
                             "format_version attribute; an interrupted create?)")
        if version != self.FORMAT_VERSION:
            raise StoreError(f"{self._path} has run store format_version={version!r}; this hpcvideo "
                             f"reads format_version {self.FORMAT_VERSION} only")
        try:
            self._latents = root["latents"]
            self._frames = root["frames"]
            self._done = {k: root[f"done/{k}"] for k in DONE_KINDS}
        except KeyError as e:
            raise StoreError(f"run store {self._path} is missing array {e}") from e
        self._root, self._attrs = root, attrs
        n, L = attrs["block_latent_frames"], self._latents.shape[0]
        last_start = block_frame_range(L // n - 1, n, self.vae_temporal_stride)[0] if L >= n else 0
        if (self._frames.shape[0] <= last_start
                or any(a.shape[0] < L // n for a in self._done.values())):
            warnings.warn(f"run store {self._path}: arrays disagree on length (an interrupted "
                          f"resize?); call resize({L}) or larger to finish it", stacklevel=2)

    # ---------------------------------------------------------------- properties
    path = property(lambda self: self._path)
    mode = property(lambda self: self._mode)
    config = property(lambda self: copy.deepcopy(self._attrs["config"]), doc="the stored run config")
    block_latent_frames = property(lambda self: int(self._attrs["block_latent_frames"]))
    fps = property(lambda self: float(self._attrs["fps"]))
    model_id = property(lambda self: self._attrs["model_id"])
    status = property(lambda self: self._attrs["status"], doc="as of open/refresh/set_status")
    num_latent_frames = property(lambda self: int(self._latents.shape[0]))
    num_frames = property(lambda self: int(self._frames.shape[0]), doc="pixel frames of the video (N)")
    vae_temporal_stride = property(lambda self: int(self._attrs.get("vae_temporal_stride", VAE_TEMPORAL_STRIDE)),
                                   doc="pixel frames per latent frame (4: Wan; 1: per-frame VAE)")
    num_blocks = property(lambda self: self.num_latent_frames // self.block_latent_frames)
    latent_shape = property(lambda self: tuple(self._latents.shape[1:]), doc="(C, h, w)")
    frame_shape = property(lambda self: tuple(self._frames.shape[1:3]), doc="(H, W)")
    attrs = property(lambda self: copy.deepcopy(self._attrs), doc="all root attributes")

    def frame_range(self, block_index: int) -> tuple[int, int]:
        """Pixel frames [start, stop) of block ``block_index`` (0 <= block_index < num_blocks) in the
        store, i.e. cut at num_frames (the last block's decoded frames past it are not stored)."""
        if not 0 <= block_index < self.num_blocks:
            raise IndexError(f"block_index={block_index} out of range [0, {self.num_blocks})")
        return block_frame_range(block_index, self.block_latent_frames, self.vae_temporal_stride, self.num_frames)

    # ---------------------------------------------------------------- config / attrs
    def check_config(self, config: dict, ignore: Iterable[str] = ()) -> None:
        """Raise ConfigMismatchError listing every dotted key whose value differs from the store's.

        ``ignore``: dotted keys (a key ignores its whole subtree) not compared, e.g. output paths.
        """
        # keys added to the config after this store was made compare with their defaults
        defaults = store_defaults(self._attrs["config"], normalise_config(RunConfig().to_dict()))
        diff = config_diff(self._attrs["config"], normalise_config(config), ignore, defaults=defaults)
        if diff:
            raise ConfigMismatchError(self._path, diff)

    def update_config(self, config: dict) -> None:
        """Replace the stored config (after an extension: resize, then update_config)."""
        self._update_root_attrs({"config": normalise_config(config)})

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._update_root_attrs({"status": status})

    def update_attrs(self, **attrs) -> None:
        """Store extra JSON-serialisable root attributes (e.g. ``timings={...}``)."""
        bad = [k for k in attrs if k in RESERVED_ATTRS]
        if bad:
            raise ValueError(f"attrs {bad} are reserved; use update_config/set_status "
                             f"(reserved: {RESERVED_ATTRS})")
        try:
            attrs = json.loads(json.dumps(attrs, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"attrs must be JSON-serialisable: {e}") from e
        self._update_root_attrs(attrs)

    def _update_root_attrs(self, new: dict) -> None:
        self._require_writable()
        root = zarr.open_group(self._zstore, mode="r+", zarr_format=3)  # fresh read, then rewrite
        # Group.update_attributes writes zarr.json once, atomically. (Not attrs.update: that is
        # MutableMapping.update, one file write per key, so a kill could leave a mix.)
        root = root.update_attributes(new)
        self._root, self._attrs = root, root.attrs.asdict()

    # ---------------------------------------------------------------- shape changes
    def resize(self, num_latent_frames: int, num_frames: int | None = None) -> None:
        """Grow the store to ``num_latent_frames`` (whole blocks) and ``num_frames`` pixel frames
        (default: all decoded frames, 4*(L-1)+1); existing data untouched.

        A last block whose frames were cut at the old num_frames loses its done/frames marker first
        (its frames past the old end are missing until written, e.g. by :meth:`fill_frames_from_tail`).
        Only one rank may call this; other ranks must reopen afterwards. Shrinking is refused.
        Frames are resized last, so an interrupted resize is finished by calling it again.
        """
        self._require_writable()
        n, old, old_frames = self.block_latent_frames, self.num_latent_frames, self.num_frames
        stride = self.vae_temporal_stride
        L = positive_int("num_latent_frames", num_latent_frames)
        if L % n:
            raise ValueError(f"num_latent_frames={L} must be a multiple of block_latent_frames={n}")
        if L < old:
            raise StoreError(f"cannot shrink run store {self._path} from {old} to {L} latent frames")
        F = num_frames_for(L, stride) if num_frames is None else positive_int("num_frames", num_frames)
        if F < old_frames:
            raise StoreError(f"cannot shrink run store {self._path} from {old_frames} to {F} frames")
        check_num_frames(F, L, n, stride)
        if F > old_frames:
            cut = self._block_of_frame(old_frames - 1)
            if cut < self._done["frames"].shape[0] and block_frame_range(cut, n, stride)[1] > old_frames:
                self.clear_done("frames", [cut])  # its frames [old_frames, ...) are not written yet
        for arr, length in [*((a, L // n) for a in self._done.values()), (self._latents, L), (self._frames, F)]:
            if arr.shape[0] < length:
                arr.resize((length, *arr.shape[1:]))
        self.refresh()  # reopen every array with its new shape
        self._resize_summary()

    def _block_of_frame(self, frame: int) -> int:
        """Index of the block whose decoded frames include pixel frame ``frame`` (>= 0)."""
        n, stride = self.block_latent_frames, self.vae_temporal_stride
        latent = -(-frame // stride)  # latent frame 0 -> frame 0; latent i > 0 -> frames 4(i-1)+1 .. 4i
        return latent // n

    # ---------------------------------------------------------------- data
    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"run store {self._path} is open read-only; open it with mode='r+' to write")

    def _check_covers(self, name: str, arr, start: int, stop: int, what: str) -> None:
        if start < 0 or stop > arr.shape[0]:
            raise StoreError(
                f"{what} needs {name}[{start}:{stop}] but this handle's {name} has length "
                f"{arr.shape[0]}; zarr would silently drop the write. If another rank resized the "
                "store, reopen it after the resize (RunStore.open or refresh())")

    def write_block_latents(self, block_index: int, latents: np.ndarray) -> None:
        """Write block ``block_index``'s latents, shape (n, C, h, w), cast to float32."""
        self._require_writable()
        n = self.block_latent_frames
        self._check_covers("latents", self._latents, block_index * n, (block_index + 1) * n,
                           f"block {block_index}")
        latents = np.asarray(latents)
        expected = (n, *self.latent_shape)
        if latents.shape != expected or not np.issubdtype(latents.dtype, np.floating):
            raise ValueError(f"latents of block {block_index} must be float of shape (n, C, h, w) = "
                             f"{expected}, got {latents.dtype} {latents.shape}")
        latents = latents.astype(np.float32, copy=False)
        self._latents[block_index * n:(block_index + 1) * n] = latents
        self._remember_marker("latents", block_index, latents)

    def write_block_frames(self, block_index: int, frames: np.ndarray, *, keep_tail: bool = True) -> None:
        """Write block ``block_index``'s pixel frames, uint8 (f, H, W, 3): every frame the block decodes
        to (f = stop - start of :func:`block_frame_range`), or only those below num_frames
        (:meth:`frame_range`). Frames past num_frames are not written to ``frames``; with
        ``keep_tail`` the whole decoded block is kept as the checkpoint ``state/frames_tail`` (first),
        so that a longer num_frames on the same blocks needs no decode.

        Read-modify-writes the chunk shared with the previous block: one frames writer only.
        """
        self._require_writable()
        n, stride = self.block_latent_frames, self.vae_temporal_stride
        start, stop = block_frame_range(block_index, n, stride)
        cut = min(stop, self.num_frames)
        # a block wholly past the end: the handle may predate a resize (zarr would drop the write)
        self._check_covers("frames", self._frames, start, cut if start < cut else stop, f"block {block_index}")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.shape[1:] != (*self.frame_shape, 3) or frames.shape[0] not in (
                stop - start, cut - start):
            raise ValueError(f"frames of block {block_index} must be uint8 of shape (f, H, W, 3) with f = "
                             f"{stop - start} (decoded) or {cut - start} (below num_frames={self.num_frames}), "
                             f"(H, W) = {self.frame_shape}, got {frames.dtype} {frames.shape}")
        if keep_tail and cut < stop and frames.shape[0] == stop - start:
            self._save_frames_tail(block_index, frames)
        self._frames[start:cut] = frames[: cut - start]
        self._remember_marker("frames", block_index, frames[: cut - start])

    def _done_array(self, kind: str):
        if kind not in DONE_KINDS:
            raise ValueError(f"done kind must be one of {DONE_KINDS}, got {kind!r}")
        return self._done[kind]

    def mark_done(self, kind: str, block_index: int) -> None:
        """Mark block ``block_index`` of ``kind`` ("latents" | "frames") done; call AFTER its data write.

        The marker holds the checksum of the block's data (:mod:`hpcvideo.store.integrity`): of what this
        handle's last write of that block was handed, else of what is on disk now."""
        self._require_writable()
        arr = self._done_array(kind)
        block_index = int(block_index)
        self._check_covers(f"done/{kind}", arr, block_index, block_index + 1, f"block {block_index}")
        old, new = int(arr[block_index]), self._new_marker(kind, block_index)
        arr[block_index] = new
        self._update_summary(kind, block_index, old, new)

    def clear_done(self, kind: str, block_indices: Iterable[int]) -> None:
        """Mark blocks ``block_indices`` of ``kind`` not done (before they are written again)."""
        self._require_writable()
        arr = self._done_array(kind)
        for j in block_indices:
            j = int(j)
            self._check_covers(f"done/{kind}", arr, j, j + 1, f"block {j}")
            old = int(arr[j])
            if old:
                arr[j] = 0
                self._update_summary(kind, j, old, 0)

    def done(self, kind: str) -> np.ndarray:
        """Completion markers of ``kind``, bool of shape (num_blocks,), read from disk now."""
        arr = self._done_array(kind)
        out = np.zeros(self.num_blocks, dtype=bool)
        m = min(self.num_blocks, arr.shape[0])
        out[:m] = arr[:m] != 0
        return out

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        """Latent frames [start, stop): float32 (stop - start, C, h, w)."""
        self._check_read("latents", start, stop, self.num_latent_frames)
        return self._latents[start:stop]

    def read_frames(self, start: int, stop: int) -> np.ndarray:
        """Pixel frames [start, stop): uint8 (stop - start, H, W, 3)."""
        self._check_read("frames", start, stop, self.num_frames)
        return self._frames[start:stop]

    @staticmethod
    def _check_read(name: str, start: int, stop: int, length: int) -> None:
        if not 0 <= start <= stop <= length:
            raise IndexError(f"{name}[{start}:{stop}] out of range; {name} has length {length}")

    def num_frames_ready(self) -> int:
        """Frames of the leading run of blocks whose frames are marked done (what iter_frames yields)."""
        k = self.done_summary()["frames"]["leading"]
        return self.frame_range(k - 1)[1] if k else 0

    def iter_frames(self, batch_frames: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, uint8 (b, H, W, 3)) batches of done frames in order; stops at the first
        block not done. Holds one batch at a time."""
        batch_frames = positive_int("batch_frames", batch_frames)
        end = self.num_frames_ready()
        for start in range(0, end, batch_frames):
            yield start, self._frames[start:min(start + batch_frames, end)]

    # ---------------------------------------------------------------- housekeeping
    def sweep_orphans(self) -> list[str]:
        """Delete the ``<name>.<32 hex>.partial`` temp files a killed writer left (zarr's, heartbeat records').

        Call from one rank on resume, before any writer starts (it would break a live write).
        Returns the removed paths.
        """
        self._require_writable()
        removed = []
        for dirpath, _, filenames in os.walk(self._path):
            for name in filenames:
                if PARTIAL_RE.match(name):
                    p = os.path.join(dirpath, name)
                    os.remove(p)
                    removed.append(p)
        return sorted(removed)

    # ---------------------------------------------------------------- status
    def status_dict(self) -> dict:
        """Progress summary (JSON-serialisable) for ``hpcvideo status`` and notebooks.

        ``complete`` is True when every block's frames are marked done; ``num_frames_written``
        counts the frames of all done blocks, ``num_frames_ready`` the leading exportable run. Reads the
        done summary and the newest checkpoint record, not every marker: O(1) of the video's length
        (:meth:`done_summary`).
        """
        summary = self.done_summary()
        done_l, done_f = summary["latents"], summary["frames"]
        k = done_f["leading"]
        pointer = self.latest_checkpoint("resume")
        try:
            status = zarr.open_group(self._zstore, mode="r", zarr_format=3).attrs["status"]
        except Exception:
            status = self.status
        H, W = self.frame_shape
        return {
            "path": str(self._path), "status": status, "model_id": self.model_id,
            "complete": bool(self.num_blocks and done_f["count"] == self.num_blocks),
            "num_frames": self.num_frames, "num_frames_written": int(done_f["written"]),
            "num_frames_ready": self.frame_range(k - 1)[1] if k else 0,
            "num_latent_frames": self.num_latent_frames, "num_blocks": self.num_blocks,
            "block_latent_frames": self.block_latent_frames,
            "blocks_latents_done": int(done_l["count"]), "blocks_frames_done": int(done_f["count"]),
            "last_checkpoint_tick": pointer["tick"] if pointer else None,
            "last_checkpoint_time": pointer["written_at"] if pointer else None,
            "fps": self.fps, "height": H, "width": W,
        }

    def __repr__(self) -> str:
        return (f"RunStore({str(self._path)!r}, mode={self._mode!r}, num_latent_frames="
                f"{self.num_latent_frames}, num_blocks={self.num_blocks}, status={self.status!r})")

