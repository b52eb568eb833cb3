"""Real SLURM: jobs submitted with ``hpcvideo submit`` (submitit, 2 MPI ranks over srun --mpi=pmi2,
mpich wheel) to a single-node SLURM brought up by slurm/lab/up.sh on this machine. One store goes
through four allocations: a job whose rank 1 crashes (the user gets the rank's error; the store
stays intact), its resubmission (resumes), stopped twice by SLURM's warning signal (USR2, as before
a time limit) and requeued each time; ``hpcvideo status`` reads the progress while it runs; the
result is bit-identical to an uninterrupted run.

Skipped, with the reason, where SLURM's daemons are not installed or cannot start (CI installs
them: .ci/run). The lab is started once per session and stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpcvideo.store import RunStore
from tests.helpers import ROOT, cli, store_arrays

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

# tiny-test (blocks of 2 latent frames, 4 steps) made longer: 4*(2B - 1) + 1 frames for B blocks, B + 3 ticks;
# B = 24 -> 189 frames, 27 ticks: the crash at tick 5 and two stops 3 checkpoints apart leave the last
# allocation more than 10 ticks to run, so the second signal always meets a running job.
BLOCKS = 24
FRAMES = 4 * (2 * BLOCKS - 1) + 1
TICKS = BLOCKS + 4 - 1
LAB_SETTINGS = [
    "cluster.request_gpus=false", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1", "cluster.mem_gb=1",
    "cluster.timeout_min=15", "cluster.signal_delay_s=60",
]


def _no_lab(reason: str) -> None:
    """Skip, except where SLURM must be there (``HPCVIDEO_REQUIRE_SLURM=1``, set by .ci/run when it could
    install SLURM): then a lab that does not start is a failure, never a silent skip."""
    if os.environ.get("HPCVIDEO_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPCVIDEO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_lab(tmp_path_factory):
    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch") if shutil.which(exe) is None]
    if missing:
        _no_lab(f"SLURM is not installed ({', '.join(missing)} missing; "
                "apt-get install slurmctld slurmd slurm-client munge libpmix-dev, as .ci/run does)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        _no_lab("the single-node SLURM lab needs root (slurmd runs the jobs)")
    lab = tmp_path_factory.mktemp("slurm-lab")
    result = subprocess.run(["bash", str(ROOT / "slurm/lab/up.sh"), str(lab)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        _no_lab(f"SLURM could not be started here: {result.stderr.strip()[-500:]}")
    environ = dict(os.environ)
    environ["SLURM_CONF"] = str(lab / "slurm.conf")
    environ["PATH"] = f"{lab / 'bin'}:{os.path.dirname(sys.executable)}:{environ['PATH']}"
    environ.pop("HPCVIDEO_FAULT", None)
    for key in [k for k in environ if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SLURM_NTASKS", "PMI_"))]:
        environ.pop(key)
    yield environ
    subprocess.run(["bash", str(ROOT / "slurm/lab/down.sh"), str(lab)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def hv(slurm_lab, forker):
    """``hv(*args, timeout=, fault=, check=)``: ``hpcvideo ARGS`` as its own process (a fork of the pre-imported
    worker) in the lab's environment (sbatch exports it, with a fault, to the job)."""
    def run(*args, timeout=300, fault=None, check=True):
        return forker.run(*args, env=slurm_lab, fault=fault, check=check, timeout=timeout)

    return run


def submit(hv, path, *extra, fault=None):
    result = hv("submit", "tiny-test", "--output", path, "--frames", FRAMES, *[f"--set={s}" for s in LAB_SETTINGS],
                *extra, fault=fault, check=False)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]  # "job 123: store PATH  logs FOLDER"
    assert line.startswith("job ") and f"store {path}" in line and f"logs {path}.slurm" in line, result.stdout
    return line.split()[1].rstrip(":")


def job_state(environ, job_id):
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], env=environ, capture_output=True,
                         text=True, timeout=30).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait_for(predicate, what, timeout_s=240, poll_s=0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def release(environ, job_id):
    """A requeued job is held 120 s (EligibleTime = requeue + 121 s in SLURM 22.05): start it now, but not in the
    second of the requeue: slurmd compares the new start's credential with the revocation of the old one in whole
    seconds and fails the job ("Job credential revoked"; seen when the release came 0.3 s after the requeue)."""
    wait_for(lambda: job_state(environ, job_id) == "PENDING", "the job to be pending again")
    time.sleep(1.05 - time.time() % 1.0)  # into the next whole second
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=environ, check=True, timeout=30)


def status(path):
    result = cli("status", path, "--json", check=False)  # in this process: it only reads the store
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.fixture
def reference_run(tmp_path, tiny_model_dir, forker):
    """The same video, uninterrupted, on one local rank (the rank count does not change the result): ``start()``
    forks it from the pre-imported worker (once the test no longer needs the forker) to run while the SLURM jobs
    wait; ``wait()`` gives its exit status. Killed (by its pid) if the test ends first."""
    class Reference:
        pid = code = None

        def start(self) -> None:
            self.pid = forker.start("generate", "tiny-test", "--output", tmp_path / "reference.zarr", "--frames", FRAMES,
                                    "--no-progress")

        def wait(self) -> int:
            self.code = forker.wait_started(timeout=300)
            return self.code

    reference = Reference()
    yield reference
    if reference.pid is not None and reference.code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(reference.pid, signal.SIGKILL)
        forker.wait_started(timeout=60)


def test_crash_then_two_requeues_end_identical_to_an_uninterrupted_run(slurm_lab, hv, reference_run, tmp_path):
    """One store through four allocations of 2-rank submitit jobs (srun --mpi=pmi2, mpich wheel):
    rank 1 crashes (the user gets its error, the store stays intact); the resubmitted job resumes,
    is stopped twice by SLURM's warning signal and requeued each time, and ends bit-identical to an
    uninterrupted run, with ``hpcvideo status`` reading its progress while it runs."""
    path = tmp_path / "run.zarr"
    failed = hv("submit", "tiny-test", "--output", path, "--frames", FRAMES,
                *[f"--set={s}" for s in LAB_SETTINGS], "--wait", fault="raise:tick:5@1", check=False, timeout=400)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "injected fault at tick 5 on rank 1" in failed.stderr  # the rank's own error reaches the user
    crashed = RunStore.open(path).status_dict()  # intact: readable, checkpointed just before the crash
    assert not crashed["complete"] and crashed["last_checkpoint_tick"] in (4, 5)

    job_id = submit(hv, path)  # resubmit: resumes from the store
    reference_run.start()  # the forker's last use in this test
    stops = [crashed["last_checkpoint_tick"]]
    for requeue in range(1, 3):  # SLURM's warning signal (what --signal=USR2@S sends before the time limit), twice
        # polled in this process (a CLI call takes seconds on a busy machine, ticks take ~0.2 s)
        wait_for(lambda: (RunStore.open(path).status_dict()["last_checkpoint_tick"] or 0) >= stops[-1] + 3,
                 "checkpoints of the running job", poll_s=0.05)
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_lab, check=True, timeout=30)
        progress = status(path)  # `hpcvideo status` while the job runs (or is stopping)
        assert progress["status"] == "running" and not progress["complete"]
        assert stops[-1] + 3 <= progress["last_checkpoint_tick"] < TICKS
        # the ranks stop at the next tick, rank 0 checkpoints, submitit requeues: the job runs again from that tick
        # (counted by SLURM: submitit's own "Requeued job" line can be cut off by the requeue's SIGKILL, KillWait=1 s)
        wait_for(lambda: _restarts(slurm_lab, job_id) >= requeue, "submitit to requeue the job")
        release(slurm_lab, job_id)
        wait_for(lambda: len(_resume_ticks(path)) >= requeue + 1, "the requeued job to resume")
        stops.append(_resume_ticks(path)[-1])
        assert stops[-1] >= stops[-2] + 3
    wait_for(lambda: job_state(slurm_lab, job_id) == "COMPLETED", "the job to complete")
    assert reference_run.wait() == 0
    latents, frames = store_arrays(path)
    reference = store_arrays(tmp_path / "reference.zarr")
    assert np.array_equal(latents, reference[0]) and np.array_equal(frames, reference[1])
    assert _restarts(slurm_lab, job_id) == 2 and len(_resume_ticks(path)) == 3


def _restarts(environ, job_id) -> int:
    """How many times SLURM requeued ``job_id`` (``Restarts=`` of ``scontrol show job``)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=environ, capture_output=True, text=True,
                         timeout=30).stdout
    field = [w for w in out.split() if w.startswith("Restarts=")]
    return int(field[0].split("=")[1]) if field else 0


def _resume_ticks(path) -> list[int]:
    """Ticks at which rank 0 resumed, in order, from the stderr logs of every job of this store."""
    text = "".join(p.read_text(errors="replace") for p in sorted(Path(f"{path}.slurm").glob("*_0_log.err")))
    return [int(line.split(" at tick ")[1].split()[0]) for line in text.splitlines() if "resuming" in line and " at tick " in line]


def _job_ids(environ) -> set[str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i"], env=environ, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return set(out.split())


def test_a_job_that_cannot_run_is_refused_before_the_queue(slurm_lab, hv, tmp_path, tiny_model_dir):
    """`submit` with more ranks than the model has blocks, or a preset's placeholder model path: exit 2
    with the key and value, no job, no store."""
    before = _job_ids(slurm_lab)
    path = tmp_path / "runs" / "run.zarr"
    settings = [f"--set={s}" for s in LAB_SETTINGS if "gpus_per_node" not in s]
    for args, needle in (
        (["tiny-test", *settings, "--set", "cluster.gpus_per_node=5"],
         "cluster.gpus_per_node=5 = 5 rank(s): 5 ranks cannot split"),
        (["wan2.1-t2v-14b"], "model.path='/path/to/Wan2.1-T2V-14B-Diffusers' is the preset's placeholder"),
    ):
        refused = hv("submit", *args, "--output", path, check=False)
        assert refused.returncode == 2 and needle in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert _job_ids(slurm_lab) == before and not (tmp_path / "runs").exists()


def test_a_generated_script_with_a_task_count_the_run_cannot_use_fails_before_srun(slurm_lab, hv, tmp_path, tiny_model_dir):
    """`hpcvideo sbatch` writes the script for 2 tasks; submitted with `sbatch --ntasks-per-node=5` (5
    pipeline stages for a 4-block model) the job ends in seconds with exit 2 and the reason in its
    output, before any srun step: no store, no rank log."""
    path = tmp_path / "run.zarr"
    script = hv("sbatch", "tiny-test", "--output", path, *[f"--set={s}" for s in LAB_SETTINGS]).stdout
    (tmp_path / "job.sbatch").write_text(script)
    started = time.monotonic()
    submitted = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=5", "job.sbatch"], cwd=tmp_path, env=slurm_lab,
                               capture_output=True, text=True, timeout=30, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    wait_for(lambda: job_state(slurm_lab, job_id) in ("FAILED", "COMPLETED"), "the job to end", timeout_s=120)
    assert job_state(slurm_lab, job_id) == "FAILED" and time.monotonic() - started < 90
    output = (tmp_path / f"hpcvideo-{job_id}.out").read_text()
    assert "hpcvideo check: error:" in output and "--ranks 5: 5 ranks cannot split the model's 4 transformer blocks" in output
    assert "Traceback" not in output and not path.exists() and not Path(f"{path}.logs").exists()
    exit_code = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_lab, capture_output=True, text=True,
                               timeout=30).stdout
    assert "ExitCode=2:0" in exit_code
