"""The Zarr run store: one Zarr v3 group per run, the single source of truth for progress.

Layout (``L`` = latent frames generated, whole blocks of ``n`` = block_latent_frames; ``N`` =
num_frames, the video's pixel frames, any number the blocks cover: ``4*(L-n-1)+1 < N <= 4*(L-1)+1``)::

    RUN.zarr/                  attrs: format_version, config, model_id, fps, block_latent_frames,
                               status, + whatever update_attrs() stores (timings, ...)
      latents                  (L, C, h, w) float32, chunks (n, C, h, w)      one chunk per block
      frames                   (N, H, W, 3) uint8,   chunks (4n, H, W, 3)     exactly the video's frames
      done/latents             (L // n,) uint8, chunks (1,)                   one file per marker
      done/frames              (L // n,) uint8, chunks (1,)
      state/<kind>             group; its attrs are the checkpoint pointer (see save_state)
      state/<kind>_0, _1       (nbytes,) uint8, the two checkpoint slots
      state/frames_tail        checkpoint kind: every decoded frame of the last block when it reaches past
                               N (write_block_frames), so a longer N on the same blocks is completed
                               without decoding again (fill_frames_from_tail)
      heartbeat/rank<R>        per-rank heartbeat (plain JSON, see hpcvideo.progress)
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
* every file zarr writes is atomic (temp file + rename, zarr >= 3.1.3); a SIGKILL can leave
  ``<name>.<32 hex>.partial`` temp files, which sweep_orphans removes on resume.

This is the only module of hpcvideo that imports zarr.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zarr
from zarr.storage import LocalStore

from .config import RunConfig, config_diff, format_diff
from .layout import block_frame_range as _layout_block_frame_range

VAE_TEMPORAL_STRIDE = 4  # Wan VAE: pixel frames per latent frame (after the first)
STATUSES = ("created", "running", "complete", "failed")
DONE_KINDS = ("latents", "frames")
_RESERVED_ATTRS = ("format_version", "config", "model_id", "fps", "block_latent_frames", "status", "vae_temporal_stride")
TAIL_KIND = "frames_tail"  # checkpoint kind holding the decoded frames of a last block cut at num_frames
# zarr/storage/_local.py: path.with_suffix(f".{uuid.uuid4().hex}.partial")
_PARTIAL_RE = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class StoreError(RuntimeError):
    """A run store is missing, malformed, read-only, or would be written out of its shape."""


class ConfigMismatchError(StoreError):
    """The store was made with a different config. ``.diff``: [(dotted_key, store_value, command_value)]."""

    def __init__(self, path: Path, diff: list[tuple[str, Any, Any]]):
        self.diff = diff
        lines = format_diff(diff)
        super().__init__(
            f"run store {path} was made with a different config ({len(diff)} key(s) differ):\n{lines}\n"
            "Use the same config to resume, or a new output path for a new run."
        )


def num_frames_for(num_latent_frames: int, temporal_stride: int = VAE_TEMPORAL_STRIDE) -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames: 4*(L-1)+1."""
    return temporal_stride * (num_latent_frames - 1) + 1


def block_frame_range(block_index: int, block_latent_frames: int, temporal_stride: int = VAE_TEMPORAL_STRIDE,
                      num_frames: int | None = None) -> tuple[int, int]:
    """Pixel frames [start, stop) decoded from block ``block_index`` of ``block_latent_frames``;
    with ``num_frames``, cut at the video's N (:func:`hpcvideo.layout.block_frame_range`)."""
    return _layout_block_frame_range(block_index, block_latent_frames, temporal_stride, num_frames)


def _normalise_config(config: dict) -> dict:
    """JSON round trip (tuples -> lists, ...) so the command's config compares like the stored one."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-serialisable (no NaN/inf): {e}") from e


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class RunStore:
    """A handle on one run store. Build with ``RunStore.create`` or ``RunStore.open``."""

    FORMAT_VERSION = 1
    STATE_CHUNK_BYTES = 16 * 2**20  # chunk size of a checkpoint slot, bytes

    def __init__(self, path: Path, zstore: LocalStore, mode: str):
        self._path = path
        self._zstore = zstore
        self._mode = mode
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
        n = _positive_int("block_latent_frames", block_latent_frames)
        L = _positive_int("num_latent_frames", num_latent_frames)
        if L % n:
            raise ValueError(f"num_latent_frames={L} must be a multiple of block_latent_frames={n}")
        C, h, w = (_positive_int(k, v) for k, v in (("latent_channels", latent_channels),
                   ("latent_height", latent_height), ("latent_width", latent_width)))
        H, W = _positive_int("height", height), _positive_int("width", width)
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if not isinstance(model_id, str):
            raise TypeError(f"model_id must be a str, got {type(model_id).__name__}")
        config = _normalise_config(config)
        stride = _positive_int("vae_temporal_stride", vae_temporal_stride)
        F = num_frames_for(L, stride) if num_frames is None else _positive_int("num_frames", num_frames)
        _check_num_frames(F, L, n, stride)

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
        done = root.create_group("done")
        for kind in DONE_KINDS:
            done.create_array(kind, shape=(L // n,), chunks=(1,), dtype="uint8", fill_value=0,
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
        defaults = _normalise_config(RunConfig().to_dict())
        diff = config_diff(self._attrs["config"], _normalise_config(config), ignore, defaults=defaults)
        if diff:
            raise ConfigMismatchError(self._path, diff)

    def update_config(self, config: dict) -> None:
        """Replace the stored config (after an extension: resize, then update_config)."""
        self._update_root_attrs({"config": _normalise_config(config)})

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._update_root_attrs({"status": status})

    def update_attrs(self, **attrs) -> None:
        """Store extra JSON-serialisable root attributes (e.g. ``timings={...}``)."""
        bad = [k for k in attrs if k in _RESERVED_ATTRS]
        if bad:
            raise ValueError(f"attrs {bad} are reserved; use update_config/set_status "
                             f"(reserved: {_RESERVED_ATTRS})")
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
        L = _positive_int("num_latent_frames", num_latent_frames)
        if L % n:
            raise ValueError(f"num_latent_frames={L} must be a multiple of block_latent_frames={n}")
        if L < old:
            raise StoreError(f"cannot shrink run store {self._path} from {old} to {L} latent frames")
        F = num_frames_for(L, stride) if num_frames is None else _positive_int("num_frames", num_frames)
        if F < old_frames:
            raise StoreError(f"cannot shrink run store {self._path} from {old_frames} to {F} frames")
        _check_num_frames(F, L, n, stride)
        if F > old_frames:
            cut = self._block_of_frame(old_frames - 1)
            if cut < self._done["frames"].shape[0] and block_frame_range(cut, n, stride)[1] > old_frames:
                self._done["frames"][cut] = 0  # its frames [old_frames, ...) are not written yet
        for arr, length in [*((a, L // n) for a in self._done.values()), (self._latents, L), (self._frames, F)]:
            if arr.shape[0] < length:
                arr.resize((length, *arr.shape[1:]))
        self.refresh()  # reopen every array with its new shape

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
        self._latents[block_index * n:(block_index + 1) * n] = latents.astype(np.float32, copy=False)

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
            buffer = io.BytesIO()
            np.save(buffer, frames, allow_pickle=False)
            self.save_state(buffer.getvalue(), tick=block_index, num_blocks=self.num_blocks, kind=TAIL_KIND)
        self._frames[start:cut] = frames[: cut - start]

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

    def _done_array(self, kind: str):
        if kind not in DONE_KINDS:
            raise ValueError(f"done kind must be one of {DONE_KINDS}, got {kind!r}")
        return self._done[kind]

    def mark_done(self, kind: str, block_index: int) -> None:
        """Mark block ``block_index`` of ``kind`` ("latents" | "frames") done; call AFTER its data write."""
        self._require_writable()
        arr = self._done_array(kind)
        self._check_covers(f"done/{kind}", arr, block_index, block_index + 1, f"block {block_index}")
        arr[block_index] = 1

    def clear_done(self, kind: str, block_indices: Iterable[int]) -> None:
        self._require_writable()
        arr = self._done_array(kind)
        for j in block_indices:
            self._check_covers(f"done/{kind}", arr, int(j), int(j) + 1, f"block {j}")
            arr[int(j)] = 0

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
        done = self.done("frames")
        k = len(done) if done.all() else int(np.argmin(done))
        return self.frame_range(k - 1)[1] if k else 0

    def iter_frames(self, batch_frames: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, uint8 (b, H, W, 3)) batches of done frames in order; stops at the first
        block not done. Holds one batch at a time."""
        batch_frames = _positive_int("batch_frames", batch_frames)
        end = self.num_frames_ready()
        for start in range(0, end, batch_frames):
            yield start, self._frames[start:min(start + batch_frames, end)]

    # ---------------------------------------------------------------- checkpoints
    def save_state(self, blob: bytes, *, tick: int, num_blocks: int, kind: str = "resume") -> None:
        """Save a checkpoint blob, crash-safe.

        The blob goes to the inactive slot array ``state/<kind>_<1-active>``; only after it is fully
        written is the pointer (attrs of group ``state/<kind>``: slot, tick, num_blocks,
        written_at, nbytes, sha256, previous) rewritten, atomically. A SIGKILL at any instant
        leaves the old or the new checkpoint, never a mix. Different kinds may be saved by
        different ranks; one kind by one rank.
        """
        self._require_writable()
        _check_kind(kind)
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
        _check_kind(kind)
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
                      "starting without it", stacklevel=2)
        return None

    # ---------------------------------------------------------------- housekeeping
    def sweep_orphans(self) -> list[str]:
        """Delete zarr's ``<name>.<32 hex>.partial`` temp files left by a killed writer.

        Call from one rank on resume, before any writer starts (it would break a live write).
        Returns the removed paths.
        """
        self._require_writable()
        removed = []
        for dirpath, _, filenames in os.walk(self._path):
            for name in filenames:
                if _PARTIAL_RE.match(name):
                    p = os.path.join(dirpath, name)
                    os.remove(p)
                    removed.append(p)
        return sorted(removed)

    # ---------------------------------------------------------------- per-tick log (hpcvideo.progress)
    TICKS_PATH, TICKS_CHUNK = "heartbeat/ticks", 4096

    def record_ticks(self, ticks: np.ndarray, values: np.ndarray) -> None:
        """Write per-tick figures: ``values`` (k, 2) float64 = [wall s, end time unix s] of tick indices
        ``ticks`` (k,) into ``heartbeat/ticks`` (grown as needed). One writer (rank 0)."""
        self._require_writable()
        ticks, values = np.asarray(ticks, dtype=np.int64), np.asarray(values, dtype=np.float64)
        if ticks.ndim != 1 or values.shape != (len(ticks), 2) or (ticks < 0).any():
            raise ValueError(f"record_ticks needs ticks (k,) >= 0 and values (k, 2), got {ticks.shape}, {values.shape}")
        if not len(ticks):
            return
        try:
            arr = zarr.open_array(self._zstore, path=self.TICKS_PATH, mode="r+", zarr_format=3)
        except FileNotFoundError:
            arr = self._root.create_array(self.TICKS_PATH, shape=(0, 2), chunks=(self.TICKS_CHUNK, 2),
                                          dtype="float64", fill_value=np.nan, dimension_names=("tick", "field"))
        if arr.shape[0] <= ticks.max():
            arr.resize((int(ticks.max()) + 1, 2))
        lo, hi = int(ticks.min()), int(ticks.max()) + 1
        block = arr[lo:hi]
        block[ticks - lo] = values
        arr[lo:hi] = block

    def tick_times(self) -> np.ndarray:
        """(num_ticks_recorded, 2) float64 [wall s, end time unix s] per tick; NaN rows not run (yet)."""
        try:
            return zarr.open_array(self._zstore, path=self.TICKS_PATH, mode="r", zarr_format=3)[:]
        except FileNotFoundError:
            return np.empty((0, 2))

    def status_dict(self) -> dict:
        """Progress summary (JSON-serialisable) for ``hpcvideo status`` and notebooks.

        ``complete`` is True when every block's frames are marked done; ``num_frames_written``
        counts the frames of all done blocks, ``num_frames_ready`` the leading exportable run.
        """
        done_l, done_f = self.done("latents"), self.done("frames")
        written = sum(b - a for j in np.flatnonzero(done_f) for a, b in [self.frame_range(int(j))])
        pointer = self._read_pointer("resume")
        try:
            status = zarr.open_group(self._zstore, mode="r", zarr_format=3).attrs["status"]
        except Exception:
            status = self.status
        H, W = self.frame_shape
        return {
            "path": str(self._path), "status": status, "model_id": self.model_id,
            "complete": bool(self.num_blocks and done_f.all()),
            "num_frames": self.num_frames, "num_frames_written": int(written),
            "num_frames_ready": self.num_frames_ready(),
            "num_latent_frames": self.num_latent_frames, "num_blocks": self.num_blocks,
            "block_latent_frames": self.block_latent_frames,
            "blocks_latents_done": int(done_l.sum()), "blocks_frames_done": int(done_f.sum()),
            "last_checkpoint_tick": pointer["tick"] if pointer else None,
            "last_checkpoint_time": pointer["written_at"] if pointer else None,
            "fps": self.fps, "height": H, "width": W,
        }

    def __repr__(self) -> str:
        return (f"RunStore({str(self._path)!r}, mode={self._mode!r}, num_latent_frames="
                f"{self.num_latent_frames}, num_blocks={self.num_blocks}, status={self.status!r})")


def _check_num_frames(F: int, L: int, n: int, stride: int) -> None:
    """num_frames F must lie in the last of the L // n blocks: first frame of the last block < F <= 4(L-1)+1."""
    low = block_frame_range(L // n - 1, n, stride)[0]
    high = num_frames_for(L, stride)
    if not low < F <= high:
        raise ValueError(f"num_frames={F} does not end in the last of {L // n} blocks of {n} latent frames; "
                         f"allowed: {low + 1} to {high}")


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or re.search(r"_[01]$", kind):
        raise ValueError(f"checkpoint kind must match {_KIND_RE.pattern} and not end in _0/_1 "
                         f"(slot names), got {kind!r}")
