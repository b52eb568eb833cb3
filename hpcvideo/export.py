"""Export a run store's frames to a video file with PyAV, streaming (constant memory).

PyAV encodes in-process (no ffmpeg subprocess, so no fork under MPI). Only the leading run of
blocks whose frames are marked done is exported, so a store still being written exports cleanly.
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


def export_mp4(store_path, out_path, *, fps: float | None = None, batch_frames: int = 64,
               codec: str = "libx264", crf: int = 18) -> int:
    """Encode the done frames of the run store at ``store_path`` into ``out_path``; return the count.

    Frames (H, W, 3) uint8 RGB are read ``batch_frames`` at a time and encoded as yuv420p (H and W
    must be even). ``fps`` defaults to the store's. ``crf`` (constant rate factor, lower = better)
    applies to libx264/libx265 and is ignored with a warning otherwise. The file is written under a
    temporary name next to ``out_path`` and renamed when complete. Raises StoreError if no block's
    frames are done.
    """
    store = RunStore.open(store_path, mode="r")
    num_frames = store.num_frames_ready()
    if num_frames == 0:
        raise StoreError(f"run store {store.path} has no finished frames to export "
                         f"({store.status_dict()['blocks_frames_done']} of {store.num_blocks} blocks done, "
                         "and block 0 is not among them)")
    height, width = store.frame_shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got height={height}, width={width}")
    fps = store.fps if fps is None else fps
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)

    out_path = Path(out_path)
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
                for _, frames in store.iter_frames(batch_frames):  # (b, H, W, 3) uint8
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
