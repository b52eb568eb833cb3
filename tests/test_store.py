"""Contract tests of the Zarr run store (tiny shapes; one SIGKILL test in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from hpcvideo.config import MISSING
from hpcvideo.store import ConfigMismatchError, RunStore, StoreError

N = 2  # block_latent_frames
C, h, w = 4, 2, 3  # latent channels, height, width
H, W = 16, 16  # pixel height, width
CONFIG = {"seed": 7, "model": {"id": "tiny", "steps": 2}, "video": {"num_frames": 21, "size": [16, 16]}}


def make(path, num_latent_frames=6, config=CONFIG) -> RunStore:
    return RunStore.create(path, config=config, num_latent_frames=num_latent_frames, block_latent_frames=N,
                           latent_channels=C, latent_height=h, latent_width=w, height=H, width=W,
                           fps=16.0, model_id="tiny-wan")


def block_latents(j: int) -> np.ndarray:  # (n, C, h, w)
    return np.random.default_rng(j).standard_normal((N, C, h, w)).astype(np.float32)


def block_frames(store: RunStore, j: int) -> np.ndarray:  # (f, H, W, 3), value encodes the frame index
    a, b = store.frame_range(j)
    idx = np.arange(a, b, dtype=np.uint8)[:, None, None, None]
    return np.broadcast_to(idx * 3 + 1, (b - a, H, W, 3)).copy()


@pytest.fixture
def store(tmp_path) -> RunStore:
    return make(tmp_path / "run.zarr")


def test_create_open_round_trip(store, tmp_path):
    assert RunStore.exists(store.path) and not RunStore.exists(tmp_path / "nope")
    s = RunStore.open(store.path)
    assert (s.num_latent_frames, s.num_frames, s.num_blocks, s.block_latent_frames) == (6, 21, 3, 2)
    assert (s.fps, s.model_id, s.status, s.config) == (16.0, "tiny-wan", "created", CONFIG)
    assert s.latent_shape == (C, h, w) and s.frame_shape == (H, W)
    with pytest.raises(StoreError, match="already exists"):
        make(store.path)


def test_open_refuses_non_stores(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        RunStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a Zarr v3 group"):
        RunStore.open(tmp_path / "plain")
    s = make(tmp_path / "run.zarr")
    meta_path = s.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format_version=99"):
        RunStore.open(s.path)
    del meta["attributes"]["format_version"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="not an hpcvideo run store"):
        RunStore.open(s.path)
    with pytest.warns(UserWarning, match="unfinished"):  # an interrupted create is redone
        make(s.path)


def test_create_validates(tmp_path):
    with pytest.raises(ValueError, match="multiple of block_latent_frames"):
        make(tmp_path / "a.zarr", num_latent_frames=5)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        make(tmp_path / "b.zarr", config={"x": object()})


def test_chunks_and_dimension_names(store):
    import zarr

    g = zarr.open_group(store.path, mode="r")
    lat, fr = g["latents"], g["frames"]
    assert lat.shape == (6, C, h, w) and lat.chunks == (N, C, h, w) and lat.dtype == np.float32
    assert fr.shape == (21, H, W, 3) and fr.chunks == (4 * N, H, W, 3) and fr.dtype == np.uint8
    assert lat.metadata.dimension_names == ("latent_frame", "channel", "latent_height", "latent_width")
    assert fr.metadata.dimension_names == ("frame", "height", "width", "rgb")
    for kind in ("latents", "frames"):
        d = g[f"done/{kind}"]
        assert d.shape == (3,) and d.chunks == (1,) and d.metadata.dimension_names == ("block",)


def test_xarray_open_zarr(store):
    xr = pytest.importorskip("xarray")
    store.write_block_latents(1, block_latents(1))
    ds = xr.open_zarr(store.path, consolidated=False)
    assert ds["latents"].dims == ("latent_frame", "channel", "latent_height", "latent_width")
    assert ds["frames"].dims == ("frame", "height", "width", "rgb")
    assert ds["frames"].dtype == np.uint8 and ds.sizes["frame"] == 21
    np.testing.assert_array_equal(ds["latents"].values[2:4], block_latents(1))
    assert ds.attrs["model_id"] == "tiny-wan"


def test_frame_ranges(store):
    assert [store.frame_range(j) for j in range(3)] == [(0, 5), (5, 13), (13, 21)]
    with pytest.raises(IndexError):
        store.frame_range(3)


def test_write_read_blocks(store):
    for j in (2, 0, 1):  # any order; frames chunks are read-modify-written
        store.write_block_latents(j, block_latents(j))
        store.write_block_frames(j, block_frames(store, j))
    s = RunStore.open(store.path)
    for j in range(3):
        np.testing.assert_array_equal(s.read_latents(2 * j, 2 * j + 2), block_latents(j))
        a, b = s.frame_range(j)
        np.testing.assert_array_equal(s.read_frames(a, b), block_frames(s, j))
    np.testing.assert_array_equal(s.read_frames(0, 21)[:, 0, 0, 0], np.arange(21) * 3 + 1)
    with pytest.raises(ValueError, match="must be uint8"):
        store.write_block_frames(0, np.zeros((5, H, W, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4, 2, 3\)"):
        store.write_block_latents(0, np.zeros((1, C, h, w), np.float32))
    with pytest.raises(StoreError, match="read-only"):
        s.write_block_latents(0, block_latents(0))


def test_done_markers_and_iter_frames(store):
    assert not store.done("latents").any() and list(store.iter_frames()) == []
    for j in (0, 2):
        store.write_block_frames(j, block_frames(store, j))
        store.mark_done("frames", j)
    store.mark_done("latents", 1)
    assert store.done("frames").tolist() == [True, False, True]
    assert store.done("latents").tolist() == [False, True, False]
    batches = list(store.iter_frames(batch_frames=2))  # stops before block 1, not done
    assert [a for a, _ in batches] == [0, 2, 4] and sum(len(f) for _, f in batches) == 5
    store.write_block_frames(1, block_frames(store, 1))
    store.mark_done("frames", 1)
    got = np.concatenate([f for _, f in store.iter_frames(batch_frames=4)])
    np.testing.assert_array_equal(got[:, 0, 0, 0], np.arange(21) * 3 + 1)
    store.clear_done("frames", [1, 2])
    assert store.done("frames").tolist() == [True, False, False]
    with pytest.raises(ValueError, match="done kind"):
        store.mark_done("noise", 0)


def test_resize_keeps_data_and_extends(store):
    for j in range(3):
        store.write_block_latents(j, block_latents(j))
        store.write_block_frames(j, block_frames(store, j))
        store.mark_done("latents", j)
        store.mark_done("frames", j)
    stale = RunStore.open(store.path, mode="r+")
    store.resize(10)
    assert (store.num_latent_frames, store.num_frames, store.num_blocks) == (10, 37, 5)
    assert store.done("frames").tolist() == [True, True, True, False, False]
    for j in range(3):
        np.testing.assert_array_equal(store.read_latents(2 * j, 2 * j + 2), block_latents(j))
    np.testing.assert_array_equal(store.read_frames(0, 21)[:, 0, 0, 0], np.arange(21) * 3 + 1)
    assert store.frame_range(4) == (29, 37)
    store.write_block_latents(4, block_latents(4))
    store.write_block_frames(3, block_frames(store, 3))
    store.mark_done("frames", 3)
    np.testing.assert_array_equal(store.read_latents(8, 10), block_latents(4))
    np.testing.assert_array_equal(store.read_frames(21, 29)[:, 0, 0, 0], np.arange(21, 29) * 3 + 1)
    # a handle opened before the resize refuses (zarr would drop these writes silently) ...
    with pytest.raises(StoreError, match="reopen"):
        stale.write_block_latents(4, block_latents(4))
    with pytest.raises(StoreError, match="reopen"):
        stale.mark_done("frames", 4)
    stale.refresh()  # ... until it is reopened
    stale.mark_done("latents", 4)
    assert RunStore.open(store.path).done("latents").tolist() == [True, True, True, False, True]
    store.update_config({**CONFIG, "video": {"num_frames": 37, "size": [16, 16]}})
    assert RunStore.open(store.path).config["video"]["num_frames"] == 37


def test_shrink_refused(store):
    with pytest.raises(StoreError, match="cannot shrink"):
        store.resize(4)
    with pytest.raises(ValueError, match="multiple"):
        store.resize(7)
    assert store.num_latent_frames == 6


def test_write_beyond_shape_raises(store):
    with pytest.raises(StoreError, match="length 6"):
        store.write_block_latents(3, block_latents(3))
    with pytest.raises(StoreError, match="length 21"):
        store.write_block_frames(3, np.zeros((8, H, W, 3), np.uint8))
    with pytest.raises(StoreError, match="length 3"):
        store.mark_done("latents", 3)
    with pytest.raises(StoreError):
        store.mark_done("latents", -1)


def test_check_config_diff(store):
    store.check_config(CONFIG)
    store.check_config({**CONFIG, "seed": 8}, ignore=["seed"])
    other = {"seed": 8, "model": {"id": "tiny", "steps": 4}, "video": {"num_frames": 21, "size": (16, 16)},
             "extra": True}
    with pytest.raises(ConfigMismatchError) as e:
        store.check_config(other, ignore=["video"])
    assert e.value.diff == [("extra", MISSING, True), ("model.steps", 2, 4), ("seed", 7, 8)]
    msg = str(e.value)
    assert "model.steps: store has 2, command has 4" in msg and "seed: store has 7, command has 8" in msg
    assert isinstance(e.value, StoreError)


def test_status_and_attrs(store):
    store.set_status("running")
    store.update_attrs(timings={"denoise_s": 1.5})
    with pytest.raises(ValueError, match="status must be one of"):
        store.set_status("paused")
    with pytest.raises(ValueError, match="reserved"):
        store.update_attrs(config={})
    store.write_block_frames(0, block_frames(store, 0))
    store.mark_done("frames", 0)
    store.mark_done("frames", 2)
    store.mark_done("latents", 0)
    store.save_state(b"x", tick=5, num_blocks=1)
    d = RunStore.open(store.path).status_dict()
    assert d["status"] == "running" and d["complete"] is False
    assert (d["num_frames"], d["num_frames_written"], d["num_frames_ready"]) == (21, 13, 5)
    assert (d["num_latent_frames"], d["num_blocks"]) == (6, 3)
    assert (d["blocks_latents_done"], d["blocks_frames_done"]) == (1, 2)
    assert d["last_checkpoint_tick"] == 5 and abs(d["last_checkpoint_time"] - time.time()) < 60
    assert d["fps"] == 16.0 and d["path"] == str(store.path)
    json.dumps(d)
    assert RunStore.open(store.path).attrs["timings"] == {"denoise_s": 1.5}
    store.mark_done("frames", 1)
    assert store.status_dict()["complete"] is True


def test_save_load_state_double_buffered(store):
    assert store.load_state() is None
    store.save_state(b"first", tick=1, num_blocks=1)
    store.save_state(b"second!", tick=2, num_blocks=2)
    blob, meta = RunStore.open(store.path).load_state()
    assert blob == b"second!" and meta["tick"] == 2 and meta["num_blocks"] == 2 and meta["nbytes"] == 7
    assert meta["sha256"] == hashlib.sha256(b"second!").hexdigest()
    store.save_state(b"", tick=3, num_blocks=2, kind="decode")  # kinds are independent; empty ok
    assert store.load_state("decode")[0] == b""
    # corrupt the active slot's bytes: load_state warns and falls back to the previous checkpoint
    chunk = store.path / "state" / f"resume_{meta['slot']}" / "c" / "0"
    chunk.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        blob, meta = store.load_state()
    assert (blob, meta["tick"]) == (b"first", 1)
    # corrupt the previous one too: None, with a warning
    (store.path / "state" / f"resume_{meta['slot']}" / "c" / "0").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="no intact checkpoint"):
        assert store.load_state() is None
    with pytest.raises(ValueError, match="kind"):
        store.save_state(b"", tick=0, num_blocks=0, kind="resume_1")


def test_sweep_orphans(store):
    store.write_block_latents(0, block_latents(0))
    orphans = [store.path / "latents" / "c" / "0.0123456789abcdef0123456789abcdef.partial",
               store.path / "state" / "zarr.fedcba9876543210fedcba9876543210.partial"]
    keep = [store.path / "notes.partial", store.path / "x.0123.partial",
            store.path / "x.0123456789ABCDEF0123456789ABCDEF.partial",
            store.path / "x.0123456789abcdef0123456789abcdef.partial.txt"]
    for p in orphans + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"junk")
    assert store.sweep_orphans() == sorted(str(p) for p in orphans)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in orphans)
    np.testing.assert_array_equal(store.read_latents(0, 2), block_latents(0))


_WRITER = """
import sys, numpy as np
from hpcvideo.store import RunStore
RunStore.STATE_CHUNK_BYTES = 4096          # many chunks per blob: more instants to be killed at
s = RunStore.open(sys.argv[1], mode="r+")
for tick in range(10**6):
    nbytes = 8 + (tick * 7919) % 60000
    blob = tick.to_bytes(8, "little") + np.random.default_rng(tick).bytes(nbytes - 8)
    s.save_state(blob, tick=tick, num_blocks=tick // 3)
    if tick == 2:
        print("ready", flush=True)
"""


def expected_blob(tick: int) -> bytes:
    nbytes = 8 + (tick * 7919) % 60000
    return tick.to_bytes(8, "little") + np.random.default_rng(tick).bytes(nbytes - 8)


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.13, 0.31, 0.52])
def test_sigkill_during_checkpoints_leaves_intact_state(store, delay_s):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store.path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = RunStore.open(store.path, mode="r+")
    s.sweep_orphans()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the active checkpoint itself must be intact
        blob, meta = s.load_state()
    tick = int.from_bytes(blob[:8], "little")
    assert tick == meta["tick"] >= 2 and meta["num_blocks"] == tick // 3
    assert hashlib.sha256(blob).hexdigest() == meta["sha256"] and blob == expected_blob(tick)
    s.save_state(b"after", tick=tick + 1, num_blocks=0)  # the store stays usable
    assert s.load_state()[0] == b"after"


def test_any_num_frames_cuts_the_last_block_and_keeps_its_decoded_frames(tmp_path):
    """6 latent frames = 3 blocks of 2 decode to 21 frames; a store of 15 frames keeps frames [0, 15): block 2
    (decoded frames [13, 21)) is cut. Growing to 18 frames clears block 2's frames marker, and the kept
    decode writes the missing frames."""
    store = RunStore.create(tmp_path / "run.zarr", config=CONFIG, num_latent_frames=6, block_latent_frames=N,
                            latent_channels=C, latent_height=h, latent_width=w, height=H, width=W, fps=16.0,
                            model_id="tiny-wan", num_frames=15)
    assert (store.num_frames, store.num_blocks, store.frame_range(2)) == (15, 3, (13, 15))
    decoded = {j: np.full((b - a, H, W, 3), j + 1, dtype=np.uint8)
               for j, (a, b) in enumerate([(0, 5), (5, 13), (13, 21)])}
    for j in range(3):
        store.write_block_latents(j, block_latents(j))
        store.mark_done("latents", j)
        store.write_block_frames(j, decoded[j])  # every decoded frame; only those below 15 are stored
        store.mark_done("frames", j)
    assert store.status_dict()["complete"] and store.status_dict()["num_frames_written"] == 15
    assert store.read_frames_tail()[0] == 2 and np.array_equal(store.read_frames_tail()[1], decoded[2])
    store.write_block_frames(2, decoded[2][:2])  # the cut count is accepted too
    with pytest.raises(ValueError, match="f = 8 \\(decoded\\) or 2 \\(below num_frames=15\\)"):
        store.write_block_frames(2, decoded[2][:3])
    store.resize(6, 18)
    assert store.num_frames == 18 and store.done("frames").tolist() == [True, True, False]
    assert not store.status_dict()["complete"] and store.num_frames_ready() == 13
    assert not store.fill_frames_from_tail(1) and store.fill_frames_from_tail(2)
    assert store.status_dict()["complete"] and np.array_equal(store.read_frames(13, 18), decoded[2][:5])
    with pytest.raises(StoreError, match="cannot shrink"):
        store.resize(6, 16)
    with pytest.raises(ValueError, match="allowed: 14 to 21"):  # 13 frames would leave block 2 empty
        RunStore.create(
            tmp_path / "bad.zarr", config=CONFIG, num_latent_frames=6, block_latent_frames=N, latent_channels=C,
            latent_height=h, latent_width=w, height=H, width=W, fps=16.0, model_id="tiny-wan", num_frames=13)


def test_heartbeat_records_are_written_and_read_back_through_the_store(tmp_path):
    """The store package is the only writer of heartbeats: atomic records per rank, readable as a zarr group,
    and a temp file a killed writer left behind is swept on resume."""
    from hpcvideo.store.heartbeat import ensure_heartbeat_group, heartbeat_path, read_heartbeats, write_heartbeat

    store = tmp_path / "run.zarr"
    ensure_heartbeat_group(store)
    write_heartbeat(store, 1, {"rank": 1, "tick": 3})
    write_heartbeat(store, 0, {"rank": 0, "tick": 4})
    write_heartbeat(store, 1, {"rank": 1, "tick": 5})  # replaces, never appends
    assert read_heartbeats(store) == [{"rank": 0, "tick": 4}, {"rank": 1, "tick": 5}]
    assert list(heartbeat_path(store, 1).parent.iterdir()) == [heartbeat_path(store, 1)]  # no temp file left
    (heartbeat_path(store, 2).parent).mkdir()
    heartbeat_path(store, 2).write_text("{not json")  # a half-copied record is skipped, not an error
    assert [r["rank"] for r in read_heartbeats(store)] == [0, 1]
