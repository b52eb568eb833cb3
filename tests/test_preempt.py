"""The stop agreement of hpcvideo.runtime.preempt: a signal to one rank stops every rank at the
same step boundary; without an installed handler nothing is exchanged; Preempted is a clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpcvideo.launch.local import find_mpiexec
from hpcvideo.runtime.preempt import (
    EXIT_REQUEUE, Preempted, active_stop_request, install_stop_handler, should_stop, uninstall_stop_handler,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_LOCAL", "MASTER_", "HPCVIDEO_R")


class _World1:
    comm = None
    world_size = 1


def test_the_handler_only_sets_a_flag_and_is_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    assert should_stop(_World1()) is False and active_stop_request() is None  # nothing installed: no stop, no message
    request = install_stop_handler()
    try:
        assert should_stop(_World1()) is False
        os.kill(os.getpid(), signal.SIGUSR2)  # the process goes on: no exit, no exception
        assert request.requested and request.received == "SIGUSR2" and should_stop(_World1()) is True
    finally:
        uninstall_stop_handler()
    assert signal.getsignal(signal.SIGUSR2) == previous and active_stop_request() is None


def test_preempted_is_a_clean_exit_that_callers_turn_into_a_requeue():
    stop = Preempted(12)
    assert isinstance(stop, SystemExit) and stop.code == 0  # passes abort_on_failure without MPI_Abort
    assert "step 12" in str(stop) and EXIT_REQUEUE == 75


@pytest.mark.parametrize("signal_rank", [0, 2])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(signal_rank):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([str(find_mpiexec()), "-n", "3", sys.executable, str(ROOT / "tests/mpi/preempt.py"),
                             str(signal_rank), "3"], capture_output=True, text=True, timeout=120, env=environ, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["stopped"] for r in reports] == [4, 4, 4]  # the boundary after the signal, on every rank
    assert [r["signalled"] for r in reports] == [r == signal_rank for r in range(3)]


@pytest.mark.slow
def test_generate_under_slurm_stops_at_a_tick_with_exit_75_for_the_sbatch_scripts(tmp_path, tiny_model_dir):
    """What slurm/*.sbatch rely on: USR2 -> checkpoint at the next tick -> exit 75 (then they requeue)."""
    import time

    from hpcvideo.store import RunStore

    path = tmp_path / "run.zarr"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    environ.update(SLURM_JOB_ID="12345", OMP_NUM_THREADS="1")  # inside a SLURM job (a batch script)
    frames = 4 * (2 * 40 - 1) + 1  # 40 blocks, 43 ticks: time to signal it mid-run
    process = subprocess.Popen([sys.executable, "-m", "hpcvideo.cli", "generate", "tiny-test", "--output", str(path),
                                "--frames", str(frames), "--no-progress"], env=environ, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if RunStore.exists(path) and (RunStore.open(path).status_dict()["last_checkpoint_tick"] or 0) >= 3:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR2)
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_REQUEUE, stderr
    assert "after USR2: checkpoint written, requeue to continue (exit 75)" in stderr
    status = RunStore.open(path).status_dict()
    stopped_at = int(stderr.split("stopped at step ")[1].split()[0])
    assert not status["complete"] and status["last_checkpoint_tick"] == stopped_at and 3 <= stopped_at < 43
