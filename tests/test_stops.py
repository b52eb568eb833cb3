"""Clean stops (hpcvideo.runtime.signals): SIGINT / SIGTERM on any rank stop every rank at the next tick with a
checkpoint, one line and a documented exit status; a second one exits at once; a local ``--ranks N`` parent
forwards signals to its ranks, its ranks stop when it dies, and no MPICH shared-memory segment is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from hpcvideo.faults import FaultPlan
from hpcvideo.runtime import signals
from hpcvideo.runtime.preempt import Preempted
from hpcvideo.runtime.signals import CleanStop, exit_code, stopped_line
from hpcvideo.store import RunStore
from hpcvideo.store.lock import lock_path

from tests.helpers import assert_same_run, cli, cli_subprocess, clean_env, needs_mpiexec


class _World1:
    comm = None
    world_size = 1


def test_exit_codes_of_a_stop_are_documented():
    assert [exit_code(name) for name in ("SIGINT", "INT", "SIGTERM", "USR2", "SIGHUP")] == [130, 130, 143, 75, 129]
    line, code = stopped_line(Preempted(4, "INT"))
    assert code == 130 and line == ("stopped at tick 4 after SIGINT: checkpoint written; rerun the same command to "
                                    "resume from it (exit 130)")
    assert stopped_line(Preempted(4))[1] == 75  # USR2: the requeue line the sbatch scripts know


def test_a_second_ctrl_c_exits_at_once_and_a_sigterm_after_usr2_does_not(monkeypatch):
    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    previous = signal.getsignal(signal.SIGINT)
    with CleanStop(announce=False) as request:
        signal.raise_signal(signal.SIGINT)
        assert request.requested and exits == [] and request.should_stop(_World1()) and request.agreed == "SIGINT"
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is previous
    with CleanStop(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2), announce=False) as request:
        signal.raise_signal(signal.SIGUSR2)  # SLURM's warning, then its SIGTERM: still a stop at the next tick
        signal.raise_signal(signal.SIGTERM)
        assert exits == [130] and request.received == "SIGUSR2"
        signal.raise_signal(signal.SIGINT)  # but a second interrupt after that one: at once
        assert exits == [130, 130]


def test_a_signal_fault_is_parsed_and_sent_to_this_process():
    plan = FaultPlan.parse("SIGTERM:tick:3@1")
    assert (plan.action, plan.point, plan.index, plan.rank) == ("SIGTERM", "tick", 3, 1)
    with pytest.raises(ValueError, match="'SIGFOO' is not a signal name"):
        FaultPlan.parse("SIGFOO:tick:3")


@pytest.mark.e2e
def test_sigint_on_one_rank_stops_at_the_next_tick_then_resumes_bit_identical(tmp_path, tiny_test_arrays):
    """Ctrl-C during tick 3: no traceback, a checkpoint at tick 4, exit 130, the lock given back; the rerun
    ends bit-identical to the uninterrupted run."""
    path = tmp_path / "run.zarr"
    previous = signal.getsignal(signal.SIGINT)
    result = cli("generate", "tiny-test", "--output", path, "--no-progress", fault="SIGINT:tick:3", check=False)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "hpcvideo generate: stopped at tick 4 after SIGINT: checkpoint written; rerun the same command to resume "
        "from it (exit 130)")
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    status = RunStore.open(path).status_dict()
    assert not status["complete"] and status["last_checkpoint_tick"] == 4
    assert not lock_path(path).exists() and signal.getsignal(signal.SIGINT) is previous
    cli("generate", "tiny-test", "--output", path, "--no-progress")
    assert_same_run(path, tiny_test_arrays)


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
def test_sigterm_on_one_rank_of_two_stops_both_then_resumes_bit_identical(tmp_path, tiny_test_arrays):
    """``--ranks 2`` (the CLI's own mpiexec), SIGTERM to rank 1 only during tick 3: both ranks stop at tick 5
    (the agreement posted at boundary 4 is read at boundary 5: no rank waits for another), rank 0 names the
    signal, the parent exits 143 with no "BAD TERMINATION" banner and no segment left; the rerun (one rank)
    ends bit-identical."""
    from hpcvideo.runtime.shm import list_segments, mapped_segments

    path = tmp_path / "run.zarr"
    before = list_segments()
    result = cli_subprocess("generate", "tiny-test", "--output", path, "--no-progress", "--ranks", 2,
                            fault="SIGTERM:tick:3@1", check=False, env=clean_env(), timeout=240)
    assert result.returncode == 143, result.stderr
    assert "hpcvideo generate: stopped at tick 5 after SIGTERM: checkpoint written" in result.stderr
    assert "BAD TERMINATION" not in result.stdout + result.stderr
    assert "stopped at tick 5 after SIGTERM" in (Path(f"{path}.logs") / "rank1.log").read_text()
    assert RunStore.open(path).status_dict()["last_checkpoint_tick"] == 5
    leftover = {p.name for p in list_segments() - before} - mapped_segments()  # new ones other jobs map are theirs
    assert not lock_path(path).exists() and not leftover and "shared-memory segment" not in result.stderr
    cli("generate", "tiny-test", "--output", path, "--no-progress")
    assert_same_run(path, tiny_test_arrays)


# ------------------------------------------------------------------ the --ranks parent, with a stand-in mpiexec

_RANK = """
import os, signal, sys, time
open(sys.argv[1], "w").close()  # a segment this "rank" leaves behind, as a killed MPICH rank does
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
open(sys.argv[2], "w").close()
time.sleep(60)
"""
_MPIEXEC = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the rank may see it: the parent signals ranks, not mpiexec
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], *sys.argv[2:]]))
"""


def test_the_parent_forwards_ctrl_c_to_its_ranks_and_removes_segments_they_left(tmp_path):
    segment = Path("/dev/shm") / f"mpich_shm_hpcvideotest{uuid.uuid4().hex[:8]}_0"
    ready = tmp_path / "ready"

    def interrupt() -> None:  # the user's Ctrl-C, once the rank is up
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # from another thread: delivered to the main thread, as a terminal's

    previous = signal.getsignal(signal.SIGINT)
    sender = threading.Thread(target=interrupt, daemon=True)
    sender.start()
    try:
        code = signals.supervise([sys.executable, "-c", _MPIEXEC, textwrap.dedent(_RANK), str(segment), str(ready)],
                                 clean_env())
    finally:
        sender.join()
        segment.unlink(missing_ok=True)
    assert code == 130 and signal.getsignal(signal.SIGINT) is previous
    assert ready.exists() and not segment.exists()


def test_a_rank_stops_when_its_parent_is_gone(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a parent that was SIGKILLed: no such process any more
    monkeypatch.setattr(signals, "WATCH_EVERY_S", 0.01)
    with CleanStop(announce=False) as request:
        request.watch_launcher({signals.LAUNCHER_VAR: f"{child.pid}:"})
        deadline = time.monotonic() + 10
        while not request.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request.requested and request.received == "SIGHUP"


def test_clean_shm_outside_slurm_removes_segments_no_process_uses(monkeypatch, tmp_path):
    from hpcvideo.runtime import shm

    tag = uuid.uuid4().hex[:8]
    stale, in_use, young = (Path("/dev/shm") / f"mpich_shm_hpcvideotest{tag}{kind}_0" for kind in ("a", "b", "c"))
    for path in (stale, in_use, young):
        path.write_bytes(b"\0" * 64)
    old = time.time() - 2 * shm.LOCAL_MIN_AGE_S
    os.utime(stale, (old, old))
    os.utime(in_use, (old, old))
    monkeypatch.setattr(shm, "list_segments", lambda shm_dir=shm.SHM_DIR: {stale, in_use, young})  # ours only
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    try:
        with open(in_use, "rb"):  # a live job's segment: held open
            assert shm.main(None) == 0
        assert not stale.exists() and in_use.exists() and young.exists()  # young: maybe a job in MPI_Init
    finally:
        for path in (stale, in_use, young):
            path.unlink(missing_ok=True)
