"""Seam metric on synthetic run stores whose seams are known exactly."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from hpcvideo.config import load_config
from hpcvideo.metrics import frame_differences, seam_metric, unit_boundaries
from hpcvideo.store import RunStore

N = 2  # block_latent_frames: blocks of 8 pixel frames (the first of 5)
STEP = 2  # grey level added per frame: every within-block difference is exactly 2
CONFIG = {"strategy": {"name": "dualparal", "block_latent_frames": N}}


def make_store(path, *, jumps, size=8, config=CONFIG, done_blocks=None) -> RunStore:
    """len(jumps)+1 blocks; frame t is flat grey 2t + sum of jumps of the boundaries at or before t (mod 256)."""
    num_blocks = len(jumps) + 1
    store = RunStore.create(path, config=config, num_latent_frames=N * num_blocks, block_latent_frames=N,
                            latent_channels=1, latent_height=1, latent_width=1, height=size, width=size,
                            fps=16.0, model_id="synthetic")
    offsets = np.concatenate([[0], np.cumsum(jumps)])
    for j in range(num_blocks) if done_blocks is None else done_blocks:
        a, b = store.frame_range(j)
        t = np.arange(a, b)
        unit = np.searchsorted([store.frame_range(k)[0] for k in range(1, num_blocks)], t, side="right")
        grey = (STEP * t + offsets[unit]) % 256
        store.write_block_frames(j, np.broadcast_to(grey[:, None, None, None], (b - a, size, size, 3)).astype(np.uint8))
        store.mark_done("frames", j)
    return store


@pytest.mark.parametrize("batch_frames", [1, 5, 8, 64])
def test_known_seams_give_known_ratios(tmp_path, batch_frames):
    # jumps of 10, 0, 20 grey levels at blocks 1, 2, 3: seam differences 12, 2, 22 against 2 within
    store = make_store(tmp_path / "run.zarr", jumps=[10, 0, 20])
    m = seam_metric(store, batch_frames=batch_frames, return_frame_diff=True)
    assert m["kind"] == "block" and m["boundaries"] == [5, 13, 21] and m["num_frames"] == 29
    assert m["seam_diff"] == [12.0, 2.0, 22.0]
    assert m["within_diff"] == [2.0, 2.0, 2.0]
    assert m["ratio"] == [6.0, 1.0, 11.0]
    assert m["seam_mean"] == 12.0 and m["within_mean"] == 2.0 and m["overall"] == 6.0
    assert (m["worst_boundary"], m["worst_ratio"]) == (21, 11.0)
    expected = np.full(28, 2.0)
    expected[[4, 12, 20]] = [12, 2, 22]  # frame_diff[i] is d[i + 1]
    np.testing.assert_array_equal(m["frame_diff"], expected)


def test_seamless_video_scores_one_and_local_denominators(tmp_path):
    assert seam_metric(make_store(tmp_path / "a.zarr", jumps=[0, 0]))["ratio"] == [1.0, 1.0]
    # a static block (within difference 0) next to a moving one: local denominator, not the global one
    store = make_store(tmp_path / "b.zarr", jumps=[6], size=4)
    assert seam_metric(store)["ratio"] == [8 / 2]


def test_live_store_reads_only_ready_frames(tmp_path):
    # blocks 0 and 1 done, block 3 done but not contiguous: 13 frames ready, the seam at 13 not yet seen
    store = make_store(tmp_path / "run.zarr", jumps=[10, 30, 20], done_blocks=[0, 1, 3])
    m = seam_metric(RunStore.open(store.path))
    assert (m["num_frames"], m["boundaries"], m["ratio"]) == (13, [5], [6.0])
    empty = make_store(tmp_path / "empty.zarr", jumps=[10], done_blocks=[])
    m = seam_metric(empty)
    assert (m["num_frames"], m["num_seams"], m["overall"], m["worst_ratio"]) == (0, 0, None, None)


def test_explicit_and_stored_boundaries(tmp_path):
    store = make_store(tmp_path / "run.zarr", jumps=[10, 0, 20])
    m = seam_metric(store.path, boundaries=[21, 9])  # a path works too; 9 is inside block 1: no seam there
    assert (m["kind"], m["boundaries"], m["seam_diff"]) == ("custom", [9, 21], [2.0, 22.0])
    with pytest.raises(ValueError, match="> 0"):
        seam_metric(store, boundaries=[0, 5])
    store.update_attrs(seam_boundaries={"kind": "clip", "frames": [13]})
    assert unit_boundaries(store.path) == ("clip", [13])
    # one seam at 13 (jump 0: d = 2) against the unit means around it, which now hold the jumps at 5 and 21:
    # frames 1..12 sum 11*2 + 12, frames 14..28 sum 14*2 + 22
    assert seam_metric(store.path)["ratio"] == [pytest.approx(2 / ((34 + 50) / 27))]


def test_boundaries_follow_the_config(tmp_path):
    cfg = load_config("tiny-test", check_paths=False)
    store = RunStore.create(tmp_path / "dp.zarr", config=cfg.to_dict(), num_latent_frames=cfg.num_latent_frames,
                            block_latent_frames=cfg.strategy.block_latent_frames, latent_channels=1, latent_height=1,
                            latent_width=1, height=8, width=8, fps=16.0, model_id="tiny")
    assert unit_boundaries(store) == ("block", [cfg.block_first_frame(j) for j in range(1, cfg.num_blocks)])
    clip_cfg = {**CONFIG, "strategy": {"name": "videoinfinity"}}
    assert unit_boundaries(make_store(tmp_path / "vi.zarr", jumps=[1, 1], config=clip_cfg)) == ("clip", [5, 13])


def test_memory_does_not_grow_with_length(tmp_path):
    """Peak allocation is about one batch of frames: 32x the length costs (almost) no more memory."""
    peaks = {}
    for blocks in (2, 64):
        store = make_store(tmp_path / f"{blocks}.zarr", jumps=[3] * (blocks - 1), size=48)
        seam_metric(store, batch_frames=8)  # warm-up: zarr's one-off allocations (codecs, event loop)
        tracemalloc.start()
        m = seam_metric(store, batch_frames=8)
        peaks[blocks] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert m["num_seams"] == blocks - 1 and m["num_frames"] == store.num_frames
    video_bytes = store.num_frames * 48 * 48 * 3  # 64 blocks: 505 frames, 3.5 MB as uint8
    # measured: ~0.4 MB and ~0.6 MB; reading the whole video would be >= 3.5 MB (7 MB as int16)
    assert peaks[64] < 2.5 * peaks[2] and peaks[64] < video_bytes / 4, (peaks, video_bytes)


def test_frame_differences_stop(tmp_path):
    store = make_store(tmp_path / "run.zarr", jumps=[10])
    diffs = np.concatenate([d for _, d in frame_differences(store, batch_frames=3, stop=7)])
    np.testing.assert_array_equal(diffs, [2, 2, 2, 2, 12, 2])


def test_seams_against_the_other_latent_frame_boundaries(tmp_path):
    # grey steps 2 per frame, 6 where a latent frame starts (t = 1, 5, 9, ...: as a Wan decode moves more
    # there); block seams at 5, 13, 21 add jumps 0, 6, 6; the prompt switches at frame 13
    config = {**CONFIG, "sampling": {"prompts": [{"from_frame": 0, "prompt": "a"}, {"from_frame": 13, "prompt": "b"}]}}
    store = RunStore.create(tmp_path / "run.zarr", config=config, num_latent_frames=8, block_latent_frames=N,
                            latent_channels=1, latent_height=1, latent_width=1, height=4, width=4, fps=16.0,
                            model_id="synthetic")
    t = np.arange(store.num_frames)
    grey = 2 * t + 4 * np.where(t >= 1, (t - 1) // 4 + 1, 0) + 6 * (t >= 13) + 6 * (t >= 21)
    for j in range(store.num_blocks):
        a, b = store.frame_range(j)
        store.write_block_frames(j, np.broadcast_to(grey[a:b, None, None, None], (b - a, 4, 4, 3)).astype(np.uint8))
        store.mark_done("frames", j)
    m = seam_metric(store)
    assert m["seam_diff"] == [6.0, 12.0, 12.0] and m["latent_step"] == 4
    assert m["latent_mean"] == 6.0  # frames 1, 9, 17, 25: latent steps that are no seam
    assert m["prompt_switches"] == [13]
    assert (m["normalised"], m["normalised_prompt_switch"]) == ((6 + 12) / 2 / 6, 12 / 6)
    assert m["normalised_all"] == 10 / 6
