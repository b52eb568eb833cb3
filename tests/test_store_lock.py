"""One writer per run store (hpcvideo.store.lock): a second writer is refused naming the holder, a stale lock
is broken with a message, a requeue of the same SLURM job takes it over, readers never need it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hpcvideo.store import RunStore, StoreError
from hpcvideo.store.lock import StoreLock, StoreLocked, lock_path, read_lock

from tests.helpers import assert_same_run, cli, copy_store


def _plant(store_path, **record) -> None:
    """A lock file as another process would have left it."""
    full = {"host": "elsewhere", "pid": 4242, "pid_ns": None, "proc_start": None, "job_id": None,
            "started_at": time.time() - 60, "token": "planted", **record}
    lock_path(store_path).write_text(json.dumps(full))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_two_writers_on_one_output_the_second_is_refused_naming_the_holder(tmp_path, tiny_test_run):
    path = copy_store(tiny_test_run, tmp_path / "run.zarr")
    before = RunStore.open(path).status_dict()
    with StoreLock.acquire(path, job_id="") as held:  # a live writer (this process)
        result = cli("generate", "tiny-test", "--output", path, "--frames", 61, "--no-progress", check=False)
        assert result.returncode == 2, result.stderr
        assert f"host {socket.gethostname()} pid {os.getpid()}" in result.stderr and "another run" in result.stderr
        assert held.held()  # the refused writer did not touch the lock ...
        # ... nor the store: not grown to 61 frames, markers and checkpoint as they were
        assert RunStore.open(path).status_dict() == before
        status = cli("status", path, "--json")  # readers need no lock; they name the writer
        assert json.loads(status.stdout)["num_frames"] == before["num_frames"]
        writer = json.loads(status.stdout)["writer"]
        assert (writer["host"], writer["pid"], writer["stale"]) == (socket.gethostname(), os.getpid(), False)
        assert f"writer     host {socket.gethostname()} pid {os.getpid()} since " in cli("status", path).stdout
    assert not lock_path(path).exists()
    assert json.loads(cli("status", path, "--json").stdout)["writer"] is None


def test_a_finished_run_leaves_no_lock_and_a_rerun_takes_it_again(tmp_path, tiny_test_run, tiny_test_arrays):
    path = copy_store(tiny_test_run, tmp_path / "run.zarr")
    cli("generate", "tiny-test", "--output", path, "--no-progress")  # resumes a complete run: nothing to do
    assert not lock_path(path).exists()
    assert_same_run(path, tiny_test_arrays)


def test_a_stale_lock_of_a_gone_process_on_this_host_is_broken_with_a_message(tmp_path, caplog):
    store = tmp_path / "run.zarr"
    _plant(store, host=socket.gethostname(), pid=_dead_pid())
    with caplog.at_level("WARNING", logger="hpcvideo"):
        with StoreLock.acquire(store, job_id="") as lock:
            assert read_lock(store)["token"] == lock.record["token"]
    assert "breaking the lock of" in caplog.text and "no longer running on this host" in caplog.text


def test_a_lock_held_elsewhere_is_refused_until_its_keepalive_is_long_overdue(tmp_path):
    store = tmp_path / "run.zarr"
    _plant(store, job_id="77")
    with pytest.raises(StoreLocked, match="host elsewhere pid 4242 SLURM job 77"):
        StoreLock.acquire(store, job_id="78")  # another job: the holder may be alive on its node
    old = time.time() - 3600
    os.utime(lock_path(store), (old, old))  # not refreshed for an hour: its node died
    with StoreLock.acquire(store, job_id="78", stale_after_s=600) as lock:
        assert lock.held()
    assert not lock_path(store).exists()


def test_a_requeue_of_the_same_slurm_job_takes_the_lock_over_at_once(tmp_path):
    store = tmp_path / "run.zarr"
    _plant(store, job_id="77")  # fresh, on another node: the killed first start of job 77
    with StoreLock.acquire(store, job_id="77") as lock:
        assert read_lock(store)["job_id"] == "77" and read_lock(store)["token"] == lock.record["token"]
    # but not from a process of the same job that is seen alive here (a second step of one allocation)
    _plant(store, job_id="77", host=socket.gethostname(), pid=os.getpid())
    with pytest.raises(StoreLocked, match="SLURM job 77"):
        StoreLock.acquire(store, job_id="77")


def test_a_lock_broken_by_another_is_not_released_by_its_old_holder(tmp_path):
    store = tmp_path / "run.zarr"
    first = StoreLock.acquire(store, job_id="")
    _plant(store)  # someone else's lock now (as after a takeover)
    first.release()
    assert read_lock(store)["token"] == "planted"
    with pytest.raises(StoreError):
        StoreLock.acquire(store, job_id="")
