"""Export a run store's frames to a video file with PyAV, streaming (constant memory).

PyAV encodes in-process (no ffmpeg subprocess, so no fork under MPI). The frames are read back against
their done markers' checksums first: a damaged or incomplete store is refused, unless
``allow_incomplete``, which exports the leading run of blocks that are done and verify (so a store still
being written exports cleanly). An existing output file is refused unless ``overwrite``.
"""

from __future__ import annotations

import os
import warnings
from fractions import Fraction
from pathlib import Path

import av
from tqdm import tqdm

from hpcvideo.store import RunStore, StoreError

_CRF_CODECS = ("libx264", "libx265")


def check_output(out_path, *, overwrite: bool = False) -> Path:
    """``out_path`` as a Path if a video file may be written there: IsADirectoryError for a directory,
    FileExistsError for an existing file (unless ``overwrite``), NotADirectoryError / FileNotFoundError
    when its folder is a file / does not exist."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(f"output {out_path} is a directory; give a file name, e.g. {out_path / 'video.mp4'}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"output {out_path} exists; pass --overwrite (overwrite=True) to replace it")
    parent = out_path.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"output {out_path}: {parent} is not a directory")
    if not parent.exists():
        raise FileNotFoundError(f"output {out_path}: folder {parent} does not exist")
    return out_path


def exportable_frames(store: RunStore, *, allow_incomplete: bool = False) -> int:
    """Frames of ``store`` that may be exported: all of them when every block's frames are done and verify;
    else StoreError naming the damaged / missing blocks, or (``allow_incomplete``) the frames of the leading
    run of blocks whose frames are done and verify (damaged latents do not shorten it). Reads every done
    block once."""
    damage, _ = store.verify_blocks()
    ready = store.num_frames_ready()
    frames_damage = [d.block for d in damage if d.kind == "frames"]
    if frames_damage:
        ready = min(ready, store.frame_range(min(frames_damage))[0])
    if ready == 0 and not frames_damage:
        raise StoreError(f"run store {store.path} has no finished frames to export "
                         f"({store.done_summary()['frames']['count']} of {store.num_blocks} blocks done, "
                         "and block 0 is not among them)")
    if not allow_incomplete:
        if damage:
            shown = "; ".join(str(d) for d in damage[:5]) + (" ..." if len(damage) > 5 else "")
            raise StoreError(f"run store {store.path} is damaged ({shown}); rerun the same generate command to "
                             f"recompute it, or pass --allow-incomplete to export the {ready} frames before it")
        if ready < store.num_frames:
            summary = store.done_summary()["frames"]
            raise StoreError(f"run store {store.path} is incomplete: {summary['count']} of {store.num_blocks} blocks' "
                             f"frames done, {ready} of {store.num_frames} frames ready; finish the run (rerun generate) "
                             f"or pass --allow-incomplete to export the first {ready}")
    return ready


def export_mp4(store_path, out_path, *, fps: float | None = None, batch_frames: int = 64,
               codec: str = "libx264", crf: int = 18, allow_incomplete: bool = False, overwrite: bool = False) -> int:
    """Encode the frames of the run store at ``store_path`` into ``out_path``; return the count.

    Frames (H, W, 3) uint8 RGB are read ``batch_frames`` at a time and encoded as yuv420p (H and W
    must be even). ``fps`` defaults to the store's. ``crf`` (constant rate factor, lower = better)
    applies to libx264/libx265 and is ignored with a warning otherwise. The file is written under a
    temporary name next to ``out_path`` and renamed when complete. Refused before anything is written:
    an output that is a directory or an existing file (unless ``overwrite``) (:func:`check_output`), a
    damaged or incomplete store (StoreError, unless ``allow_incomplete``: then the leading frames that
    are done and verify, :func:`exportable_frames`); StoreError also if no frame can be exported.
    """
    if isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames < 1:
        raise ValueError(f"batch_frames must be a positive integer, got {batch_frames!r}")
    out_path = check_output(out_path, overwrite=overwrite)
    store = RunStore.open(store_path, mode="r")
    num_frames = exportable_frames(store, allow_incomplete=allow_incomplete)
    if num_frames == 0:
        raise StoreError(f"run store {store.path} has no frames to export: block 0 does not verify")
    height, width = store.frame_shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got height={height}, width={width}")
    fps = store.fps if fps is None else fps
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)

    tmp_path = out_path.with_name(f".{out_path.stem}.{os.getpid()}.partial{out_path.suffix}")
    written = 0
    try:
        with av.open(str(tmp_path), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec in _CRF_CODECS:
                stream.options = {"crf": str(crf)}
            elif crf != 18:
                warnings.warn(f"crf={crf} is ignored for codec {codec!r} (only {_CRF_CODECS})", stacklevel=2)
            with tqdm(total=num_frames, unit="frame", desc=f"export {out_path.name}", disable=None) as bar:
                for start in range(0, num_frames, batch_frames):
                    frames = store.read_frames(start, min(start + batch_frames, num_frames))  # (b, H, W, 3) uint8
                    for frame in frames:
                        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                        container.mux(stream.encode(vf))
                    written += len(frames)
                    bar.update(len(frames))
            container.mux(stream.encode(None))  # flush
        os.replace(tmp_path, out_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return written
