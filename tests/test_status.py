"""Status while running: per-rank heartbeats in the store, rates, ETA, staleness, `hpcvideo status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from hpcvideo import progress as progress_mod
from hpcvideo.cli import main
from hpcvideo.progress import Heartbeat, format_status, progress, read_heartbeats, run_status
from hpcvideo.store import RunStore

CONFIG = {"video": {"num_frames": 29}, "strategy": {"name": "dualparal", "block_latent_frames": 2},
          "sampling": {"num_inference_steps": 4}}  # 4 blocks, 4 steps: 7 ticks


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore.create(tmp_path / "run.zarr", config=CONFIG, num_latent_frames=8, block_latent_frames=2,
                           latent_channels=1, latent_height=1, latent_width=1, height=8, width=8, fps=16.0,
                           model_id="synthetic")


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_heartbeats_give_rate_eta_in_flight_and_staleness(store, monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(progress_mod.time, "time", clock)
    main = Heartbeat(store.path, rank=0, num_ticks=7, interval_s=5.0, store=store)
    other = Heartbeat(store.path, rank=1, num_ticks=7, interval_s=5.0)  # no RunStore: plain files only
    assert main.beat(0) and other.beat(0)  # the first beat is always written
    clock.t = 1002.0
    assert not main.beat(1, tick_s=2.0)  # throttled: within 5 s of the last write
    clock.t = 1004.0
    assert not main.beat(2, tick_s=2.0)
    clock.t = 1006.0
    assert main.beat(3, tick_s=2.0)  # 3 ticks in 6 s
    assert other.beat(3)
    clock.t = 1007.0
    p = progress(store, now=1007.0)
    assert (p["tick"], p["num_ticks"], p["mean_ticks_per_s"], p["ticks_per_s"]) == (3, 7, 0.5, 0.5)
    assert p["eta_s"] == 8.0  # 4 ticks left at 0.5 ticks/s
    assert p["blocks_in_flight"] == [0, 2]  # after 3 ticks: blocks 0, 1, 2 entered, none left yet
    assert [(r["rank"], r["tick"], r["age_s"], r["stale"]) for r in p["ranks"]] == [(0, 3, 1.0, False), (1, 3, 1.0, False)]
    assert p["stale"] is False
    # rank 0 buffered the tick times and wrote them with the beat
    times = RunStore.open(store.path).tick_times()
    np.testing.assert_array_equal(times[:, 0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(times[:, 1], [1002.0, 1004.0, 1006.0])
    # nobody reports for 3 intervals + 30 s while the store says running: stale
    late = progress(store, now=1006.0 + 3 * 5 + 30 + 1)
    assert late["stale"] is True and all(r["stale"] for r in late["ranks"])
    clock.t = 1010.0
    assert main.beat(7, force=True, state="finished")
    done = progress(store, now=5000.0)
    assert done["eta_s"] == 0.0 and done["blocks_in_flight"] is None and done["ranks"][0]["stale"] is False


def test_heartbeats_keep_the_store_a_clean_zarr_hierarchy(store):
    import xarray as xr

    Heartbeat(store.path, rank=0, num_ticks=7, store=store).beat(1, tick_s=0.5, force=True)
    Heartbeat(store.path, rank=3, num_ticks=7).beat(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about files it does not recognise as nodes
        ds = xr.open_zarr(store.path, consolidated=False)
        reopened = RunStore.open(store.path)
    assert "frames" in ds and reopened.num_blocks == 4
    assert [b["rank"] for b in read_heartbeats(store.path)] == [0, 3]
    (store.path / "heartbeat" / "rank9").mkdir()
    (store.path / "heartbeat" / "rank9" / "zarr.json").write_text("{not json")
    assert [b["rank"] for b in read_heartbeats(store.path)] == [0, 3]  # unreadable records are skipped


def test_status_without_heartbeat(store):
    status = run_status(store.path)
    assert status["progress"]["tick"] is None and status["progress"]["ranks"] == []
    assert "no heartbeat yet" in format_status(status)


@pytest.mark.slow
def test_status_from_another_process_of_a_run_killed_midway(tmp_path, tiny_model_dir, capsys):
    """The run dies (SIGKILL) at the start of tick 4 of 7; `hpcvideo status` in a fresh process sees how far it got."""
    path = tmp_path / "run.zarr"
    env = {**os.environ, "HPCVIDEO_FAULT": "tick:4"}
    result = subprocess.run([sys.executable, "-m", "hpcvideo.cli", "generate", "tiny-test", "--output", str(path),
                             "--set", "store.heartbeat_every_s=0.001", "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # killed
    out = subprocess.run([sys.executable, "-m", "hpcvideo.cli", "status", str(path), "--json", "--seams"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    status = json.loads(out)
    p = status["progress"]
    assert status["status"] == "running" and not status["complete"]
    assert (p["tick"], p["num_ticks"], p["blocks_in_flight"]) == (4, 7, [1, 3])  # block 0 left after tick 3
    assert p["eta_s"] > 0 and p["mean_ticks_per_s"] > 0
    assert [(r["rank"], r["state"], r["pid"] > 0) for r in p["ranks"]] == [(0, "running", True)]
    assert status["last_checkpoint_tick"] == 4  # checkpoint_every_ticks: 1
    assert status["seams"]["kind"] == "block" and status["seams"]["num_frames"] == status["num_frames_ready"]
    times = RunStore.open(path).tick_times()
    assert times.shape == (4, 2) and np.isfinite(times).all() and (times[:, 0] > 0).all()
    assert main(["status", str(path)]) == 0
    text = capsys.readouterr().out
    assert "ticks      4/7" in text and "in flight  blocks 1..3" in text and "rank 0" in text
