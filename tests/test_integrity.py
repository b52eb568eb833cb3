"""Damaged data is found, and a rerun recomputes it: checksums in the done markers, `hpcvideo verify`, the
resume that restarts before the first block that does not verify, recoverable checkpoint pointers, status
without a scan of every marker, and export's refusals.

Each damage is what an interrupted copy of a store (a full disk, a failed rsync) leaves: bytes flipped
in a latents or frames chunk, a chunk copied over another, a deleted chunk, an emptied pointer."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import zarr

from hpcvideo.config import load_config
from hpcvideo.export import export_mp4
from hpcvideo.runner import run
from hpcvideo.store import RunStore, StoreError
from hpcvideo.store.integrity import SCAN_MAX_BLOCKS, VERIFY_DAMAGED, VERIFY_INCOMPLETE, VERIFY_OK
from tests.helpers import assert_same_run, cli, copy_store
from hpcvideo.runtime import init_rank_env, shutdown_rank_env
from tests.test_runner import FakeFamily, FakeSink, FakeSpec
from tests.test_store import block_frames, block_latents, make


def flip(path, offset=-8, count=8) -> None:
    """Invert ``count`` bytes of the file at ``path`` from ``offset``."""
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def chunk(store_path, name: str, index: int):
    """The chunk file ``index`` (along the first axis) of array ``name`` (latents: a block; frames: 4n frames)."""
    return store_path / name / "c" / str(index) / "0" / "0" / "0"


def filled(path, num_latent_frames=6) -> RunStore:
    """A store of 3 blocks whose latents and frames are all written and marked done."""
    store = make(path, num_latent_frames)
    for j in range(store.num_blocks):
        store.write_block_latents(j, block_latents(j))
        store.mark_done("latents", j)
        store.write_block_frames(j, block_frames(store, j))
        store.mark_done("frames", j)
    return store


DAMAGES = {  # what an interrupted copy leaves -> the blocks whose parts no longer verify
    "flipped_bytes_in_a_latents_chunk": (lambda p: flip(chunk(p, "latents", 1)), ["block 1 latents"]),
    "a_chunk_copied_over_another": (lambda p: shutil.copy(chunk(p, "latents", 0), chunk(p, "latents", 2)),
                                    ["block 2 latents"]),
    "a_deleted_chunk": (lambda p: chunk(p, "latents", 1).unlink(), ["block 1 latents"]),
    # frames chunk 1 holds frames [8, 16): part of block 1 ([5, 13)) and of block 2 ([13, 21))
    "flipped_bytes_in_a_frames_chunk": (lambda p: flip(chunk(p, "frames", 1)),
                                        ["block 1 frames", "block 2 frames"]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_finds(tmp_path, damage):
    store = filled(tmp_path / "run.zarr")
    assert store.verify()["exit_code"] == VERIFY_OK and cli("verify", store.path).returncode == VERIFY_OK
    apply, expected = DAMAGES[damage]
    apply(store.path)
    report = RunStore.open(store.path).verify()
    assert [line.split(":")[0] for line in report["damage"]] == expected
    result = cli("verify", store.path, check=False)
    assert result.returncode == VERIFY_DAMAGED and "DAMAGE     " + expected[0] in result.stdout
    with pytest.raises(StoreError, match="damaged"):  # export refuses it, unless asked
        export_mp4(store.path, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_verify_of_an_unfinished_store_says_incomplete(tmp_path):
    store = make(tmp_path / "run.zarr")
    store.write_block_latents(0, block_latents(0))
    store.mark_done("latents", 0)
    report = store.verify()
    assert report["ok"] and not report["complete"] and report["exit_code"] == VERIFY_INCOMPLETE
    assert report["blocks"]["latents"]["missing"] == [1, 2] and report["blocks"]["frames"]["missing"] == [0, 1, 2]


def test_a_store_made_before_checksums_opens_resumes_and_verifies_unverified(tmp_path):
    """Old stores have uint8 markers (1 = done): they keep working; verify reads them but cannot check them."""
    store = filled(tmp_path / "run.zarr")
    root = zarr.open_group(store.path, mode="r+")
    for kind in ("latents", "frames"):
        root["done"].create_array(kind, shape=(3,), chunks=(1,), dtype="uint8", fill_value=0, compressors=None,
                                  dimension_names=("block",), overwrite=True)[:] = [1, 1, 0]
    root["done"].update_attributes({"summary": None})
    old = RunStore.open(store.path, mode="r+")
    assert not old.has_checksums() and old.done("frames").tolist() == [True, True, False]
    assert old.status_dict()["blocks_frames_done"] == 2
    old.mark_done("frames", 2)
    old.mark_done("latents", 2)
    assert int(zarr.open_array(store.path / "done" / "frames", mode="r")[2]) == 1  # no room for a checksum
    report = old.verify()
    assert report["ok"] and report["exit_code"] == VERIFY_OK
    assert report["blocks"]["latents"] == {"done": 3, "verified": 0, "unverified": 3, "missing": []}
    new = filled(tmp_path / "new.zarr")  # a new store resumed by an earlier hpcvideo: its markers are 1
    zarr.open_array(new.path / "done" / "frames", mode="r+")[1] = 1
    assert RunStore.open(new.path).verify()["blocks"]["frames"] == {"done": 3, "verified": 2, "unverified": 1,
                                                                     "missing": []}


def test_an_emptied_resume_pointer_falls_back_to_the_slots_that_verify(tmp_path):
    store = make(tmp_path / "run.zarr")
    for tick in (3, 5):
        store.save_state(f"tick {tick}".encode(), tick=tick, num_blocks=3, stale_from=tick - 1)
    (store.path / "state" / "resume" / "zarr.json").write_text("")
    s = RunStore.open(store.path, mode="r+")
    assert s.status_dict()["last_checkpoint_tick"] == 5  # status reads the slots' records
    assert s.verify()["checkpoints"]["resume"]["pointer"] == "unreadable" and s.verify()["exit_code"] == VERIFY_DAMAGED
    with pytest.warns(UserWarning, match="unreadable"):
        blob, meta = s.load_state()
    assert blob == b"tick 5" and meta["stale_from"] == 4
    flip(store.path / "state" / "resume_1" / "c" / "0", offset=0, count=2)  # the newest slot, tick 5
    with pytest.warns(UserWarning):
        assert s.load_state()[0] == b"tick 3"
    s.save_state(b"tick 6", tick=6, num_blocks=3)  # keeps the intact slot (tick 3), rewrites the pointer
    assert not s.pointer_damaged() and [m["tick"] for m in s.checkpoint_records()] == [6, 3]
    assert s.load_state()[0] == b"tick 6"
    assert s.verify()["exit_code"] == VERIFY_INCOMPLETE


def test_status_of_a_store_of_100000_blocks_takes_under_a_second(tmp_path):
    """The done summary is kept with the markers; status never reads the 2 x 100,000 marker chunks."""
    num_blocks = 100_000
    store = RunStore.create(tmp_path / "long.zarr", config={"seed": 0}, num_latent_frames=num_blocks,
                            block_latent_frames=1, latent_channels=1, latent_height=1, latent_width=1,
                            height=2, width=2, fps=16.0, model_id="tiny")
    assert store.num_blocks > SCAN_MAX_BLOCKS
    for j in (0, 1, 2, 5):
        store.write_block_latents(j, np.full((1, 1, 1, 1), j, np.float32))
        store.mark_done("latents", j)
        store.write_block_frames(j, np.full((1 if j == 0 else 4, 2, 2, 3), j, np.uint8))
        store.mark_done("frames", j)
    store.clear_done("frames", [1])
    start = time.perf_counter()
    status = json.loads(cli("status", store.path, "--json").stdout)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 1.0, elapsed_s
    assert (status["blocks_latents_done"], status["blocks_frames_done"]) == (4, 3)
    assert (status["num_frames_ready"], status["num_frames_written"], status["complete"]) == (1, 9, False)
    assert status["num_blocks"] == num_blocks


def test_the_done_summary_equals_the_markers_after_writes_clears_and_a_resize(tmp_path):
    store = filled(tmp_path / "run.zarr")
    store.clear_done("latents", [1])
    store.clear_done("frames", [0, 2])
    store.resize(10)  # 5 blocks; the cut last block: no cut here (21 frames -> 37)
    store.write_block_frames(3, block_frames(store, 3))
    store.mark_done("frames", 3)
    reopened = RunStore.open(store.path)
    assert reopened._stored_summary() == reopened._scan_summary() == {
        "num_blocks": 5, "latents": {"count": 2, "leading": 1},
        "frames": {"count": 2, "leading": 0, "written": 16}}


def test_export_to_a_directory_or_an_existing_file_is_refused(tmp_path):
    store = filled(tmp_path / "run.zarr")
    folder = tmp_path / "videos"
    folder.mkdir()
    result = cli("export", store.path, folder, check=False)
    assert result.returncode == 2 and "is a directory; give a file name" in result.stderr
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"keep me")
    result = cli("export", store.path, existing, check=False)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert existing.read_bytes() == b"keep me"
    assert "21 frames" in cli("export", store.path, existing, "--overwrite").stdout
    store.clear_done("frames", [2])
    result = cli("export", store.path, tmp_path / "part.mp4", check=False)
    assert result.returncode == 2 and "incomplete" in result.stderr and not (tmp_path / "part.mp4").exists()
    assert "13 frames" in cli("export", store.path, tmp_path / "part.mp4", "--allow-incomplete").stdout


# ------------------------------------------------------------------ the runner (a fake strategy, in process)

@pytest.fixture
def env():
    env = init_rank_env(device="cpu")
    yield env
    shutdown_rank_env(env)


def _cfg(path):
    return load_config("tiny-test", [f"store.path={path}"], check_paths=False)  # 4 blocks, 4 steps, 7 ticks


def _submitted(spec):
    return sorted(spec.sink.units)


def test_a_rerun_restarts_before_the_first_block_that_does_not_verify(tmp_path, env, caplog):
    path = tmp_path / "run.zarr"
    run(_cfg(path), env, progress=False, spec=FakeSpec(), family=FakeFamily())
    store = RunStore.open(path, mode="r+")
    zarr.open_array(path / "done" / "latents", mode="r+")[2] = 12345  # not the checksum of block 2's latents
    spec = FakeSpec()
    with caplog.at_level(logging.WARNING, logger="hpcvideo"):
        run(_cfg(path), env, progress=False, spec=spec, family=FakeFamily())
    # the final checkpoint (tick 7) recomputes from block 4, the extension snapshot (tick 4) from block 1
    assert _submitted(spec) == [1, 2, 3]
    assert "block 2 latents: checksum mismatch" in caplog.text and "'extend' at tick 4" in caplog.text
    zarr.open_array(path / "done" / "frames", mode="r+")[0] = 7  # block 0 too: no checkpoint precedes it
    spec = FakeSpec()
    run(_cfg(path), env, progress=False, spec=spec, family=FakeFamily())
    assert _submitted(spec) == [0, 1, 2, 3] and "from scratch" in caplog.text
    assert store.verify()["exit_code"] == VERIFY_OK


class ForgetfulSink(FakeSink):
    """Marks every unit but block 2's frames done (as a second writer clearing a marker would leave it)."""

    def submit(self, unit, latents):
        super().submit(unit, latents)
        if unit == 2:
            self.store.clear_done("frames", [2])


def test_a_block_still_not_done_at_the_end_is_an_error_naming_it(tmp_path, env):
    spec = FakeSpec()
    spec.build = lambda ctx: (FakeSpec.build(spec, ctx)[0], ForgetfulSink(ctx.store))
    with pytest.raises(StoreError, match=r"the frames of block\(s\) 2 are not written"):
        run(_cfg(tmp_path / "run.zarr"), env, progress=False, spec=spec, family=FakeFamily())
    assert RunStore.open(tmp_path / "run.zarr").status != "complete"


# ------------------------------------------------------------------ real runs of tiny-test

@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["flipped_bytes_in_a_frames_chunk", "a_deleted_chunk"])
def test_a_rerun_recomputes_a_damaged_store_bit_identically(tmp_path, tiny_test_run, tiny_test_arrays, damage):
    path = copy_store(tiny_test_run, tmp_path / "run.zarr")
    DAMAGES[damage][0](path)
    assert cli("verify", path, check=False).returncode == VERIFY_DAMAGED
    cli("generate", "tiny-test", "--output", path, "--no-progress")
    assert_same_run(path, tiny_test_arrays)
    assert cli("verify", path).returncode == VERIFY_OK


@pytest.mark.e2e
def test_an_emptied_resume_pointer_after_a_failure_resumes_bit_identically(tmp_path, tiny_test_arrays):
    path = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="injected fault at tick 5"):
        cli("generate", "tiny-test", "--output", path, "--set", "store.checkpoint_every_ticks=2", "--no-progress",
            fault="raise:tick:5")
    (path / "state" / "resume" / "zarr.json").write_text("")
    status = json.loads(cli("status", path, "--json").stdout)
    assert status["last_checkpoint_tick"] == 4 and not status["complete"]
    cli("generate", "tiny-test", "--output", path, "--set", "store.checkpoint_every_ticks=2", "--no-progress")
    assert_same_run(path, tiny_test_arrays)
    assert json.loads(cli("status", path, "--json").stdout)["status"] == "complete"
    assert cli("verify", path).returncode == VERIFY_OK


def test_a_resume_repairs_a_checkpoint_pointer_whose_newest_slot_does_not_verify(tmp_path):
    store = make(tmp_path / "run.zarr")
    for tick in (2, 4):
        store.save_state(f"tick {tick}".encode(), tick=tick, num_blocks=3, kind="extend")
    flip(store.path / "state" / "extend_1" / "c" / "0", offset=0, count=2)  # tick 4's slot
    store.save_state(b"tail", tick=0, num_blocks=3, kind="frames_tail")
    (store.path / "state" / "frames_tail_0" / "c" / "0").write_bytes(b"")  # its only slot: nothing intact
    assert store.verify()["exit_code"] == VERIFY_DAMAGED
    lines = store.repair_checkpoints()
    assert lines == ["checkpoint pointer 'extend' was its newest record (tick 4) does not verify: now names tick 2 "
                     "(slot 0)", "checkpoint pointer 'frames_tail' was its newest record (tick 0) does not verify "
                     "and no slot verifies: dropped"]
    assert store.load_state("extend")[0] == b"tick 2" and store.load_state("frames_tail") is None
    store.save_state(b"tick 5", tick=5, num_blocks=3, kind="extend")  # into the damaged slot, not over tick 2's
    assert [m["tick"] for m in store.checkpoint_records("extend")] == [5, 2]
    assert store.verify()["exit_code"] == VERIFY_INCOMPLETE and store.repair_checkpoints() == []


def test_an_undecodable_chunk_of_a_block_not_done_yet_is_dropped_before_it_is_written_again(tmp_path):
    """A run killed between a block's frames and its marker, whose chunk is then damaged: the rewrite of that
    block (a read-modify-write of the chunk) would fail on it for ever."""
    from hpcvideo.store.recovery import plan_resume

    store = filled(tmp_path / "run.zarr")
    store.clear_done("frames", [1, 2])
    flip(chunk(store.path, "frames", 1))  # frames [8, 16): blocks 1 and 2, neither done
    store.save_state(b"state", tick=3, num_blocks=3, stale_from=1)
    plan = plan_resume(store, 3, repair=True)
    assert plan.damage == [] and plan.recompute_from == 1 and len(plan.repairs) == 1
    assert "frames/c/1/0/0/0" in plan.repairs[0]
    store.write_block_frames(1, block_frames(store, 1))  # now a plain write over zeros
    store.mark_done("frames", 1)
    assert store.verify_blocks(["frames"])[0] == []
