"""Rank environment, failure handling and local relaunch.

Multi-rank tests run ``mpiexec -n K python tests/mpi/<script>.py`` (gloo on CPU) as subprocesses with a
timeout: the exchange checks read the scenarios of tests/mpi/scenarios.py run in the one launch per world size
(the ``mpi_world`` fixture of tests/conftest.py); each failure case (a rank that raises, is killed, hangs) ends its job, so it
has a launch of its own. The rest checks the pieces in this process without initialising MPI here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from hpcvideo.launch.local import find_mpiexec, maybe_relaunch, mpi_flavour, strip_ranks_option
from hpcvideo.runtime import RankEnv, abort_on_failure, check_world_size, start_failure_monitor, stop_failure_monitor, under_mpi_launcher
from hpcvideo.runtime.env import choose_master_addr, choose_master_port, rank_table

from tests.helpers import LAUNCHER_PREFIXES, MPI_SCRIPTS as SCRIPTS, ROOT, clean_env, mpirun_script as mpirun, needs_mpiexec


# ----------------------------------------------------------------------------- in-process pieces


def test_under_mpi_launcher_reads_each_launchers_variables():
    assert not under_mpi_launcher({})
    assert under_mpi_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"})  # MPICH hydra
    assert under_mpi_launcher({"OMPI_COMM_WORLD_SIZE": "2"})  # Open MPI
    assert under_mpi_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})  # srun
    # the batch shell of an allocation is not a rank: --ranks there must still spawn
    assert not under_mpi_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})


def test_singleton_guard_names_the_srun_flag():
    with pytest.raises(RuntimeError, match=r"--mpi=pmi2.*--mpi=pmix"):
        check_world_size(1, {"SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="different MPI library"):
        check_world_size(1, {"PMI_SIZE": "4"})  # another library's mpiexec: singletons
    check_world_size(1, {"SLURM_NTASKS": "1"})
    check_world_size(4, {"SLURM_NTASKS": "4"})
    check_world_size(4, {"PMI_SIZE": "4", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})  # hydra's proxies via srun


def test_singleton_guard_in_a_real_process():
    """SLURM_NTASKS=2 but started plainly (MPI singleton, world 1): init_rank_env refuses."""
    code = "from hpcvideo.runtime import init_rank_env; init_rank_env(device='cpu')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env(SLURM_NTASKS="2"), cwd=ROOT
    )
    assert result.returncode != 0
    assert "--mpi=pmi2" in result.stderr and "SLURM_NTASKS=2" in result.stderr


def test_rendezvous_address_and_port():
    assert choose_master_addr(single_node=False, environ={"MASTER_ADDR": "10.1.2.3"}) == "10.1.2.3"
    assert choose_master_port({"MASTER_PORT": "29555"}) == 29555
    assert 0 < choose_master_port({}) < 65536
    from hpcvideo.runtime.env import _default_route_addr

    if _default_route_addr() is None:
        pytest.skip("no default route on this machine")
    assert not choose_master_addr(single_node=False, environ={}).startswith("127.")  # usable from other nodes


def test_rank_table():
    assert rank_table((("a", 11), ("a", 12), ("b", 13))) == "node a: rank 0 pid 11, rank 1 pid 12; node b: rank 2 pid 13"


def test_strip_ranks_option():
    assert strip_ranks_option(["generate", "x.yaml", "--ranks", "3", "--seed", "1"]) == ["generate", "x.yaml", "--seed", "1"]
    assert strip_ranks_option(["--ranks=4", "a"]) == ["a"]
    assert strip_ranks_option(["a", "--", "--ranks", "2"]) == ["a", "--", "--ranks", "2"]


def test_maybe_relaunch_stays_in_process(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    assert maybe_relaunch(None, []) is None
    assert maybe_relaunch(1, ["--ranks", "1"]) is None
    with pytest.raises(ValueError, match="--ranks=0"):
        maybe_relaunch(0, [])
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "3")
    assert maybe_relaunch(3, ["--ranks", "3"]) is None  # already a rank


def test_single_process_failure_propagates():
    import torch

    env = RankEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node="n", device=torch.device("cpu"), backend=None, comm=None)
    monitor = start_failure_monitor(env)
    with pytest.raises(KeyError):
        with abort_on_failure(env):
            raise KeyError("x")
    stop_failure_monitor(monitor)
    stop_failure_monitor(monitor)


def test_mpiexec_is_the_installed_one():
    mpiexec = find_mpiexec()
    assert mpiexec.is_file()
    assert mpi_flavour(mpiexec) in ("mpich", "openmpi")


# ----------------------------------------------------------------------------- multi-rank


def test_rank_env_of_a_plain_process():
    """A plain process: an mpi4py singleton, no process group."""
    command = [sys.executable, str(SCRIPTS / "rank_env.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    check_reports(json.loads(result.stdout.strip().splitlines()[-1]), 1, result.stderr)


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 3, 4])  # 3 ranks also: test_relaunch_under_mpiexec_with_rank_logs
def test_rank_env_and_tensor_exchange(mpi_world, num_ranks):
    """The "exchange" scenario of the one launch per world size (tests/conftest.py: mpi_world)."""
    world = mpi_world(num_ranks)
    check_reports(world["exchange"], num_ranks, world["result"].stderr)


@pytest.mark.mpi
def test_runs_leave_no_request_pending_at_mpi_finalize(mpi_world):
    """The 4-rank launch (scenarios, then every 4-rank run, each with its per-tick stop agreement posted one tick
    ahead) ends without MPICH's "Builtin communicator ... has pending 1 references" (runtime.preempt.settle)."""
    result = mpi_world(4)["result"]
    assert result.returncode == 0, result.stderr
    assert "pending" not in result.stderr, result.stderr


def check_reports(reports: list[dict], num_ranks: int, stderr: str) -> None:
    assert [r["rank"] for r in reports] == list(range(num_ranks))
    assert [r["local_rank"] for r in reports] == list(range(num_ranks))  # one node
    assert {(r["world_size"], r["local_world_size"], r["device"]) for r in reports} == {(num_ranks, num_ranks, "cpu")}
    assert [r["is_main"] for r in reports] == [True] + [False] * (num_ranks - 1)
    if num_ranks == 1:
        assert reports[0]["backend"] is None and reports[0]["addr"] is None
        return
    assert {r["backend"] for r in reports} == {"gloo"}
    # every rank joined rank 0's choice, announced by rank 0; not a hard-coded loopback
    announced = re.search(r"gloo via tcp://([^:\s]+):(\d+)", stderr)
    assert announced, stderr
    assert {(r["addr"], r["port"]) for r in reports} == {(announced.group(1), int(announced.group(2)))}
    for r in reports:
        assert r["received"] == [float((r["rank"] - 1) % num_ranks)] * 3
        assert r["all_reduce"] == num_ranks * (num_ranks + 1) / 2


def _exit_latency_s(result: subprocess.CompletedProcess, end: float, failing: int) -> float:
    failed_at = float(re.search(rf"rank {failing}: failing at ([\d.]+)", result.stderr).group(1))
    return end - failed_at


@pytest.mark.mpi
@needs_mpiexec
def test_a_raising_rank_stops_every_rank():
    result, wall_s = mpirun(3, "fail.py", "raise", "1")
    end = time.time()
    assert result.returncode != 0
    assert "rank 1 failed:" in result.stderr and "ValueError: injected failure on rank 1" in result.stderr
    # the peers' monitors name the failed rank before the Abort
    assert "stopping because rank 1 failed" in result.stderr
    assert "unexpected" not in result.stdout
    latency_s = _exit_latency_s(result, end, failing=1)
    print(f"raise: all ranks gone {latency_s:.2f} s after the failure (job wall {wall_s:.1f} s)")
    assert latency_s < 60


@pytest.mark.mpi
@needs_mpiexec
def test_a_killed_rank_stops_every_rank():
    """Plain mpiexec (hydra cleans up): the job ends at once.

    Hydra's "BAD TERMINATION ... PID p" names *a* process of the job, not reliably the dead one
    (seen: rank 0, 1 or 2 for a SIGKILL of rank 2), and the peers are SIGKILLed within ~10 ms, too
    soon to say anything; so the only sure sign here is "Killed (signal 9)".
    """
    result, wall_s = mpirun(3, "fail.py", "kill", "2")
    end = time.time()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unexpected" not in output
    assert "BAD TERMINATION" in output and "signal 9" in output
    latency_s = _exit_latency_s(result, end, failing=2)
    print(f"kill (hydra cleanup): all ranks gone {latency_s:.2f} s after the SIGKILL (job wall {wall_s:.1f} s)")
    assert latency_s < 60


def test_the_failure_monitor_names_a_dead_local_peer(tmp_path):
    """Where no launcher kills the survivors (srun without --kill-on-bad-exit), the failure monitor of
    a rank sees a peer's process on its node gone, names it and ends the rank with exit code 1."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    script = f"""
import os, time, torch
from mpi4py import MPI
from hpcvideo.runtime import RankEnv, start_failure_monitor
env = RankEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, node="n", device=torch.device("cpu"),
              backend="gloo", comm=MPI.COMM_SELF, peers=(("n", os.getpid()), ("n", {dead.pid})))
start_failure_monitor(env, poll_s=0.05)
time.sleep(30)
print("unexpected: still running")
"""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"rank 0: stopping because rank 1 (pid {dead.pid} on n) is no longer running" in result.stderr
    assert "unexpected" not in result.stdout and time.monotonic() - start < 20


def test_gone_peers_names_a_dead_local_rank():
    """The check the peers of a silently killed rank use (gloo error path and monitor) to name it."""
    import torch

    from hpcvideo.runtime.failure import gone_peers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    peers = (("n", os.getpid()), ("n", dead.pid), ("other", dead.pid))  # rank 2 is remote: not checked
    env = RankEnv(rank=0, local_rank=0, world_size=3, local_world_size=2, node="n", device=torch.device("cpu"), backend="gloo", comm=None, peers=peers)
    assert gone_peers(env) == [1]


@pytest.mark.mpi
@needs_mpiexec
def test_a_stuck_rank_times_out_instead_of_hanging():
    """Rank 1 lives but never sends: rank 0's gloo recv raises after timeout_s (3 s) and the job ends."""
    result, wall_s = mpirun(2, "fail.py", "hang", "1")
    end = time.time()
    assert result.returncode != 0
    assert "Timed out" in result.stderr and "stopping because rank" in result.stderr
    latency_s = _exit_latency_s(result, end, failing=1)
    print(f"hang: all ranks gone {latency_s:.2f} s after rank 1 got stuck (timeout_s 3, job wall {wall_s:.1f} s)")
    assert latency_s < 3 + 10


@pytest.mark.mpi
@needs_mpiexec
def test_relaunch_under_mpiexec_with_rank_logs(tmp_path):
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "tests.mpi.entry", "--ranks", "3", "--expect", "3", "--log-dir", str(logs)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, env=clean_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # only rank 0 reaches the terminal; every rank has its log with its stdout and stderr
    assert "rank 0/3" in result.stdout
    assert "rank 1/3" not in result.stdout + result.stderr
    reports = json.loads(result.stdout.split("REPORTS ", 1)[1].splitlines()[0])
    check_reports(reports, 3, result.stderr)
    for rank in range(3):
        text = (logs / f"rank{rank}.log").read_text()
        assert f"rank {rank}/3: addr=" in text and f"rank {rank}: a line on stderr" in text
