"""Status while running: per-rank heartbeats in the store, rates, ETA, staleness, `hpcvideo status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from hpcvideo import progress as progress_mod
from hpcvideo.cli import main
from hpcvideo.progress import Heartbeat, format_status, progress, read_heartbeats, run_status
from hpcvideo.store import RunStore
from tests.helpers import MPI_KILLED, MPI_KILLED_LAST, cli, copy_store, needs_mpiexec

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
    # no keep-alive thread: this test owns the clock
    main = Heartbeat(store.path, rank=0, num_ticks=7, interval_s=5.0, store=store, keepalive=False)
    other = Heartbeat(store.path, rank=1, num_ticks=7, interval_s=5.0, keepalive=False)  # no RunStore: plain files only
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
    assert p["stale"] is False and p["state"] == "running"
    # rank 0 buffered the tick times and wrote them with the beat
    times = RunStore.open(store.path).tick_times()
    np.testing.assert_array_equal(times[:, 0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(times[:, 1], [1002.0, 1004.0, 1006.0])
    # nobody reports for 2 intervals + 5 s while the store says running: stale (the keep-alive thread of a
    # live process writes every interval, whatever a tick takes)
    assert progress(store, now=1006.0 + 2 * 5 + 5 - 0.1)["state"] == "running"
    late = progress(store, now=1006.0 + 2 * 5 + 5 + 0.1)
    assert late["stale"] is True and all(r["stale"] for r in late["ranks"])
    assert late["state"] == "stale" and late["eta_s"] is None and "no heartbeat from rank" in late["reason"]
    clock.t = 1010.0
    assert main.beat(7, force=True, state="finished")
    done = progress(store, now=5000.0)
    assert done["eta_s"] == 0.0 and done["blocks_in_flight"] is None and done["ranks"][0]["stale"] is False


def test_heartbeats_keep_the_store_a_clean_zarr_hierarchy(store):
    import xarray as xr

    Heartbeat(store.path, rank=0, num_ticks=7, store=store, keepalive=False).beat(1, tick_s=0.5, force=True)
    Heartbeat(store.path, rank=3, num_ticks=7, keepalive=False).beat(1)
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


BEAT_AND_DIE = ("import os, signal, sys; from hpcvideo.progress import Heartbeat; "
                "Heartbeat(sys.argv[1], rank=0, num_ticks=7, world_size=1, attempt='a').beat(3); "
                "os.kill(os.getpid(), signal.SIGKILL)")  # a rank killed with no chance to say so


def _edit_record(store, rank: int, **changes) -> None:
    meta = store.path / "heartbeat" / f"rank{rank}" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["heartbeat"].update(changes)
    meta.write_text(json.dumps(doc))


def test_a_rank_killed_on_this_host_is_reported_stopped_at_once(store):
    store.set_status("running")  # what rank 0 sets at the start
    killed = subprocess.run([sys.executable, "-c", BEAT_AND_DIE, str(store.path)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    p = progress(store)
    assert p["ranks"][0]["age_s"] < 2 * 5 + 5  # well before the heartbeat is overdue
    assert (p["state"], p["stale"], p["ranks"][0]["gone"], p["tick"], p["eta_s"]) == ("stopped", True, True, 3, None)
    assert "rank 0 (pid" in p["reason"] and "is gone" in p["reason"]
    status = run_status(store.path)
    assert (status["status"], status["state"]) == ("running", "stopped")  # the store's word, and the truth
    first = format_status(status).splitlines()[0]
    assert first.startswith(f"{store.path}: stopped (rank 0 (pid ") and first.endswith("the store says running)")
    assert "ticks      3/7 when it stopped" in format_status(status)
    # the same record from another host cannot be checked from here: running until it is overdue
    record = read_heartbeats(store.path)[0]
    _edit_record(store, 0, host="elsewhere")
    assert progress(store, now=record["time"] + 1)["state"] == "running"
    assert progress(store, now=record["time"] + 2 * 5 + 5 + 1)["state"] == "stale"
    # a live pid on this host that is another process (the pid was reused: another start time) is gone too
    _edit_record(store, 0, host=record["host"], pid=os.getpid(), proc_start=record["proc_start"])
    assert progress(store)["ranks"][0]["gone"] is True
    mine = Heartbeat(store.path, rank=0, num_ticks=7, keepalive=False)
    mine.beat(3)
    assert progress(store)["ranks"][0]["gone"] is False and progress(store)["state"] == "running"


def test_the_keepalive_thread_reports_a_live_process_during_a_long_tick(store):
    beat = Heartbeat(store.path, rank=0, num_ticks=7, interval_s=0.1)
    beat.beat(1, force=True)
    first = read_heartbeats(store.path)[0]
    time.sleep(0.6)  # one tick as long as 6 intervals: the thread keeps writing the record
    alive = read_heartbeats(store.path)[0]
    assert alive["time"] >= first["time"] + 0.1 and (alive["tick"], alive["tick_time"]) == (1, first["tick_time"])
    assert beat.beat(2, state="finished")  # a final state is written at once and stops the thread
    assert beat._thread is None
    last = read_heartbeats(store.path)[0]
    time.sleep(0.3)
    assert read_heartbeats(store.path)[0] == last and last["state"] == "finished" and last["tick"] == 2


def test_ranks_of_an_earlier_attempt_are_not_listed_as_current(store, monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(progress_mod.time, "time", clock)
    for rank in range(3):  # the first start of the job: 3 ranks, killed at tick 2
        Heartbeat(store.path, rank=rank, num_ticks=7, world_size=3, attempt="first", keepalive=False).beat(2)
    clock.t = 2000.0  # resumed on 2 ranks; rank 1 has not reported yet
    Heartbeat(store.path, rank=0, num_ticks=7, world_size=2, attempt="second", keepalive=False).beat(2)
    p = progress(store, now=2001.0)
    assert [r["rank"] for r in p["ranks"]] == [0] and p["missing_ranks"] == [1]
    assert [(r["rank"], r["attempt"], r["stale"]) for r in p["earlier_ranks"]] == [(1, "first", False), (2, "first", False)]
    assert (p["state"], p["attempt"], p["world_size"]) == ("running", "second", 2)  # old records are not "stale"
    clock.t = 2001.0
    Heartbeat(store.path, rank=1, num_ticks=7, world_size=2, attempt="second", keepalive=False).beat(2)
    p = progress(store, now=2002.0)
    assert [r["rank"] for r in p["ranks"]] == [0, 1] and p["missing_ranks"] == []
    assert [r["rank"] for r in p["earlier_ranks"]] == [2] and p["state"] == "running"
    lines = format_status(run_status(store.path)).splitlines()
    assert [line.split()[1] for line in lines if line.startswith("rank ")] == ["0", "1"]
    assert "earlier    rank 2 of an earlier attempt, last heard 17 min ago (not part of this run now)" in lines


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
def test_status_after_real_kills_and_a_resume_on_fewer_ranks(tmp_path, mpi_runs, forker):
    """2 ranks (mpiexec), rank 0 SIGKILLed at the start of tick 5 with the default 5 s heartbeat: `status`
    at once says stopped, at tick 5 like the checkpoint; resumed on 1 rank and killed at tick 6: rank 1
    is only an earlier attempt's; resumed to the end: finished. (The 2-rank run is a real mpiexec job, the last
    run of the session's 2-rank launch, and its `status` is read right after the kill (tests/conftest.py:
    MPI_KILLED); the 1-rank kill is a fork of the pre-imported worker; `status` and the last resume run in this
    process, on a copy of the killed store.)"""
    name = "tiny-test-rank-0-killed-on-2"
    assert MPI_KILLED[name] == (["tiny-test"], 2, "tick:5", None) and name in MPI_KILLED_LAST
    run_ = mpi_runs(2)[name]
    killed = run_["killed"]
    assert killed["result"].returncode != 0, killed["result"].stderr
    status = json.loads(killed["status_json"])
    p = status["progress"]
    assert (status["status"], status["state"], p["state"], p["stale"]) == ("running", "stopped", "stopped", True)
    assert (p["tick"], status["last_checkpoint_tick"], p["num_ticks"]) == (5, 5, 7)  # checkpoint_every_ticks: 1
    assert [(r["rank"], r["tick"], r["gone"]) for r in p["ranks"][:1]] == [(0, 5, True)]
    # rank 1 is killed by mpiexec or stops by itself first (its failure monitor sees rank 0 go): either is not running
    assert p["ranks"][1]["rank"] == 1 and (p["ranks"][1]["gone"] or p["ranks"][1]["state"] == "stopped")
    assert p["world_size"] == 2 and p["earlier_ranks"] == [] and p["eta_s"] is None
    text = killed["status_text"]
    path = run_["path"]
    assert text.splitlines()[0].startswith(f"{path}: stopped (rank ") and "ticks      5/7 when it stopped" in text

    path = copy_store(path, tmp_path / "run.zarr")
    killed = forker.run("generate", "tiny-test", "--output", path, "--no-progress", fault="tick:6", check=False)
    assert killed.returncode != 0, killed.stderr
    p = json.loads(cli("status", path, "--json").stdout)["progress"]
    assert (p["state"], p["tick"], p["world_size"]) == ("stopped", 6, 1)
    assert [r["rank"] for r in p["ranks"]] == [0] and [r["rank"] for r in p["earlier_ranks"]] == [1]
    assert p["attempt"] != p["earlier_ranks"][0]["attempt"]
    lines = cli("status", path).stdout.splitlines()
    assert [line for line in lines if line.startswith("rank ")] and not [line for line in lines if line.startswith("rank 1")]
    assert any(line.startswith("earlier    rank 1 of an earlier attempt") for line in lines)

    cli("generate", "tiny-test", "--output", path, "--no-progress")
    status = json.loads(cli("status", path, "--json").stdout)
    assert (status["status"], status["state"], status["progress"]["tick"]) == ("complete", "finished", 7)
    assert [r["state"] for r in status["progress"]["ranks"]] == ["finished"]


@pytest.mark.e2e
def test_status_from_another_process_of_a_run_killed_midway(tmp_path, tiny_model_dir, forker, capsys):
    """The run dies (SIGKILL) at the start of tick 4 of 7; `hpcvideo status` in a fresh process sees how far it got.
    (Both are forks of the pre-imported worker: real processes, no torch import each.)"""
    path = tmp_path / "run.zarr"
    result = forker.run("generate", "tiny-test", "--output", path, "--set", "store.heartbeat_every_s=0.001", "--no-progress",
                        fault="tick:4", check=False)
    assert result.returncode != 0  # killed
    out = forker.run("status", path, "--json", "--seams").stdout
    status = json.loads(out)
    p = status["progress"]
    assert status["status"] == "running" and not status["complete"] and status["state"] == "stopped"
    assert (p["tick"], p["num_ticks"], p["blocks_in_flight"]) == (4, 7, [1, 3])  # block 0 left after tick 3
    assert p["eta_s"] is None and p["mean_ticks_per_s"] > 0  # no ETA for a run that stopped
    assert [(r["rank"], r["state"], r["pid"] > 0, r["gone"]) for r in p["ranks"]] == [(0, "running", True, True)]
    assert status["last_checkpoint_tick"] == 4  # checkpoint_every_ticks: 1
    assert status["seams"]["kind"] == "block" and status["seams"]["num_frames"] == status["num_frames_ready"]
    times = RunStore.open(path).tick_times()
    assert times.shape == (4, 2) and np.isfinite(times).all() and (times[:, 0] > 0).all()
    assert main(["status", str(path)]) == 0
    text = capsys.readouterr().out
    assert "ticks      4/7 when it stopped" in text and "in flight  blocks 1..3" in text and "rank 0" in text
