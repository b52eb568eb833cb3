"""The stop agreement of hpcvideo.runtime.preempt: a signal to one rank stops every rank at the
same step boundary; without an installed handler nothing is exchanged; Preempted is a clean exit."""

from __future__ import annotations

import os
import signal

import pytest

from hpcvideo.runtime.preempt import (
    EXIT_REQUEUE, Preempted, StopRequest, install_stop_handler, should_stop, uninstall_stop_handler,
)

from tests.helpers import cli_signalled


class _World1:
    comm = None
    world_size = 1


def test_the_handler_only_sets_a_flag_and_is_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    assert should_stop(_World1(), None) is False  # no request: no stop, no message
    request = install_stop_handler()
    try:
        assert signal.getsignal(signal.SIGUSR2) != previous
        assert should_stop(_World1(), request) is False
        os.kill(os.getpid(), signal.SIGUSR2)  # the process goes on: no exit, no exception
        assert request.requested and request.received == "SIGUSR2" and should_stop(_World1(), request) is True
    finally:
        uninstall_stop_handler(request)
    assert signal.getsignal(signal.SIGUSR2) == previous and not request.installed
    uninstall_stop_handler(request)  # idempotent
    assert signal.getsignal(signal.SIGUSR2) == previous


def test_stop_requests_are_objects_that_nest_and_restore_in_order():
    """No state in the module: two requests are independent, and each restores what it replaced."""
    previous = signal.getsignal(signal.SIGUSR2)
    with StopRequest() as outer:
        with StopRequest() as inner:
            os.kill(os.getpid(), signal.SIGUSR2)  # the handler installed last gets it
            assert inner.requested and not outer.requested
            assert inner.should_stop(_World1()) and not outer.should_stop(_World1())
        assert signal.getsignal(signal.SIGUSR2) == outer._handle  # the inner one gave back the outer handler
        os.kill(os.getpid(), signal.SIGUSR2)
        assert outer.requested and outer.received == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) == previous


def test_preempted_is_a_clean_exit_that_callers_turn_into_a_requeue():
    stop = Preempted(12)
    assert isinstance(stop, SystemExit) and stop.code == 0  # passes abort_on_failure without MPI_Abort
    assert "step 12" in str(stop) and EXIT_REQUEUE == 75


@pytest.mark.mpi
@pytest.mark.parametrize("signal_rank", [0, 2])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(mpi_world, signal_rank):
    """The "preempt:R:3" scenarios of the 3-rank launch (tests/conftest.py: mpi_world; tests/mpi/preempt.py)."""
    reports = mpi_world(3)[f"preempt:{signal_rank}:3"]
    assert [r["stopped"] for r in reports] == [4, 4, 4]  # the boundary after the signal, on every rank
    assert [r["signalled"] for r in reports] == [r == signal_rank for r in range(3)]


@pytest.mark.e2e
def test_generate_under_slurm_stops_at_a_tick_with_exit_75_for_the_sbatch_scripts(tmp_path, tiny_model_dir):
    """What slurm/*.sbatch rely on: USR2 -> checkpoint at the next tick -> exit 75 (then they requeue).
    The CLI runs in this process (SLURM_JOB_ID set) and a thread sends the USR2, as SLURM would."""
    from hpcvideo.store import RunStore

    path = tmp_path / "run.zarr"
    frames = 4 * (2 * 40 - 1) + 1  # 40 blocks, 43 ticks: time to signal it mid-run
    result = cli_signalled("generate", "tiny-test", "--output", path, "--frames", frames, "--no-progress", store=path,
                           min_checkpoint_tick=3)
    stderr = result.stderr
    assert result.returncode == EXIT_REQUEUE, stderr
    assert "after USR2: checkpoint written, requeue to continue (exit 75)" in stderr
    status = RunStore.open(path).status_dict()
    stopped_at = int(stderr.split("stopped at step ")[1].split()[0])
    assert not status["complete"] and status["last_checkpoint_tick"] == stopped_at and 3 <= stopped_at < 43
