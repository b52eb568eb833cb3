"""export_mp4: stream a tiny run store to mp4 and read it back."""

from __future__ import annotations

import av
import numpy as np
import pytest

from hpcvideo.export import export_mp4
from hpcvideo.store import RunStore, StoreError

H = W = 32


def frame_values(a: int, b: int) -> np.ndarray:
    """(b - a, H, W, 3) uint8: flat grey levels that change with the frame index, plus a colour bar."""
    f = np.empty((b - a, H, W, 3), np.uint8)
    f[:] = (40 + 8 * np.arange(a, b, dtype=np.uint8))[:, None, None, None]
    f[:, :, : W // 2, 0] = 200
    return f


@pytest.fixture
def store(tmp_path) -> RunStore:
    s = RunStore.create(tmp_path / "run.zarr", config={"seed": 0}, num_latent_frames=4, block_latent_frames=2,
                        latent_channels=4, latent_height=4, latent_width=4, height=H, width=W,
                        fps=8.0, model_id="tiny")
    return s


def read_mp4(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        return np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]), rate


def test_export_round_trip(store, tmp_path):
    for j in range(store.num_blocks):
        store.write_block_frames(j, frame_values(*store.frame_range(j)))
        store.mark_done("frames", j)
    out = tmp_path / "video.mp4"
    assert export_mp4(store.path, out, batch_frames=3) == store.num_frames == 13
    got, rate = read_mp4(out)
    assert got.shape == (13, H, W, 3) and rate == pytest.approx(8.0)
    diff = np.abs(got.astype(np.int16) - frame_values(0, 13)).mean()
    assert diff < 4.0, diff
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_export_stops_at_first_block_not_done_and_fps_override(store, tmp_path):
    store.write_block_frames(0, frame_values(*store.frame_range(0)))
    store.mark_done("frames", 0)  # block 1 is not done
    out = tmp_path / "part.mp4"
    with pytest.raises(StoreError, match="incomplete: 1 of 2 blocks' frames done, 5 of 13 frames ready"):
        export_mp4(store.path, out, fps=24)  # refused unless asked for
    assert not out.exists()
    assert export_mp4(store.path, out, fps=24, allow_incomplete=True) == 5
    got, rate = read_mp4(out)
    assert len(got) == 5 and rate == pytest.approx(24.0)


def test_export_refuses_empty_store(store, tmp_path):
    with pytest.raises(StoreError, match="no finished frames"):
        export_mp4(store.path, tmp_path / "empty.mp4")
    assert not (tmp_path / "empty.mp4").exists()
