"""Helpers shared by the test files: run the CLI (in this process, in a fork of a pre-imported worker, or
in a fresh subprocess), read a finished run's arrays, find mpiexec, a launcher-free environment.

Which way to run the CLI:

* :func:`cli` runs ``hpcvideo.cli.main(argv)`` in this process: no interpreter start, no torch import.
  For everything where the process boundary is not what is tested (refusals, status, export, runs whose
  result is compared). A fault there may only raise (``raise:...``): a SIGKILL would kill pytest.
* :class:`Forker` (the ``forker`` session fixture) runs ``hpcvideo.cli.main(argv)`` in a child forked from
  a worker process that imported torch, diffusers and hpcvideo once and never computes itself: a real
  process that can be really SIGKILLed at an ``HPCVIDEO_FAULT`` point, for the cost of a fork.
* :func:`cli_subprocess` starts ``python -m hpcvideo.cli``: where the interpreter start, the launcher
  environment or an external signal is what is tested.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MPI_SCRIPTS = ROOT / "tests" / "mpi"
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_LOCAL", "MASTER_", "HPCVIDEO_R")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")


@dataclass
class Result:
    """What a CLI call gave: exit status (negative: killed by that signal), its output, its wall time."""

    returncode: int
    stdout: str = ""
    stderr: str = ""
    elapsed_s: float = 0.0
    args: list = field(default_factory=list)


def _check(result: Result, check: bool) -> Result:
    if check and result.returncode != 0:
        raise AssertionError(f"hpcvideo {result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher/rendezvous variables and without a fault (the tests may themselves run
    under a launcher), single-threaded, with this checkout first on the path; ``extra`` added."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(LAUNCHER_PREFIXES)}
    environ.pop("HPCVIDEO_FAULT", None)
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return environ


def cli(*args, fault: str | None = None, check: bool = True, env: dict[str, str] | None = None) -> Result:
    """``hpcvideo ARGS`` in this process (``hpcvideo.cli.main``), stdout and stderr captured; ``env`` entries are set
    for the call (None removes one) and restored after it. ``fault`` must be a ``raise:``, ``SIGINT:`` or ``SIGTERM:`` fault here. A ``--ranks N``
    that relaunches starts ``mpiexec -n N python -m hpcvideo.cli ...`` (its ranks' output is not captured here)."""
    from hpcvideo.cli import main
    from hpcvideo.launch import local

    if fault is not None and not fault.startswith(("raise:", "SIGINT:", "SIGTERM:")):  # the CLI handles these two
        raise ValueError(f"fault={fault!r}: a SIGKILL fault in this process would kill pytest; use the forker")
    argv = [str(a) for a in args]
    changes = {"HPCVIDEO_FAULT": fault, **(env or {})}
    saved = {key: os.environ.get(key) for key in changes}
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    program, showwarning = local.current_program, warnings.showwarning  # main() sets its own warning format
    # `--ranks N` relaunches "this program" under mpiexec: here that must be the CLI, not pytest
    local.current_program = lambda: ["-m", "hpcvideo.cli"]
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse, or a rank that is told to stop
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        local.current_program, warnings.showwarning = program, showwarning
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return _check(Result(code, out.getvalue(), err.getvalue(), time.monotonic() - start, argv), check)


def cli_signalled(*args, store: Path, min_checkpoint_tick: int, signum: int = 0, timeout_s: float = 240) -> Result:
    """``hpcvideo ARGS`` in this process under SLURM (``SLURM_JOB_ID`` set, so the CLI installs its stop handler),
    sent ``signum`` (default USR2) by a watcher thread once ``store`` has a checkpoint at ``min_checkpoint_tick`` or
    later, as SLURM signals a running job. A signal that comes after the command ended meets a no-op handler."""
    from hpcvideo.store import RunStore

    signum = signum or signal.SIGUSR2
    finished = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not finished.is_set():
            if RunStore.exists(store) and (RunStore.open(store).status_dict()["last_checkpoint_tick"] or 0) >= min_checkpoint_tick:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    def ignore(*_) -> None:  # what the CLI's handler replaces, and must restore when the command ends
        pass

    previous = signal.signal(signum, ignore)
    watcher = threading.Thread(target=watch, name="test-signal-sender", daemon=True)
    watcher.start()
    try:
        result = cli(*args, env={"SLURM_JOB_ID": "12345"}, check=False)
        assert signal.getsignal(signum) is ignore, "the CLI left its stop handler installed"
        return result
    finally:
        finished.set()
        watcher.join()
        signal.signal(signum, previous)


def cli_subprocess(*args, fault: str | None = None, check: bool = True, env: dict[str, str] | None = None,
                   launcher: list[str] | None = None, timeout: float = 300, cwd: Path | str | None = None) -> Result:
    """``[launcher...] python -m hpcvideo.cli ARGS`` as a fresh process (``env`` replaces the environment,
    default: this one without a fault)."""
    environ = dict(os.environ) if env is None else dict(env)
    environ.pop("HPCVIDEO_FAULT", None)
    if fault:
        environ["HPCVIDEO_FAULT"] = fault
    argv = [str(a) for a in args]
    command = [*(launcher or []), sys.executable, "-m", "hpcvideo.cli", *argv]
    start = time.monotonic()
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return _check(Result(done.returncode, done.stdout, done.stderr, time.monotonic() - start, argv), check)


def mpi_cli(num_ranks: int, *args, fault: str | None = None, check: bool = True, timeout: float = 300) -> Result:
    """``mpiexec -n N python -m hpcvideo.cli ARGS`` (a plain process for N = 1)."""
    launcher = [MPIEXEC, "-n", str(num_ranks)] if num_ranks > 1 else None
    return cli_subprocess(*args, fault=fault, check=check, launcher=launcher, timeout=timeout)


def mpirun_script(num_ranks: int, script: str, *args: str, mpiexec_flags: tuple[str, ...] = (),
                  timeout_s: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec [flags] -n N python tests/mpi/SCRIPT ARGS`` in a launcher-free environment; (result, wall s)."""
    command = [MPIEXEC, *mpiexec_flags, "-n", str(num_ranks), sys.executable, str(MPI_SCRIPTS / script), *args]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=clean_env(), cwd=ROOT)
    return result, time.monotonic() - start


def store_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """(latents (L, C, h, w) float32, frames (F, H, W, 3) uint8) of a run store that must be complete."""
    from hpcvideo.store import RunStore

    store = RunStore.open(path)
    assert store.status_dict()["complete"], f"{path} is not complete"
    return store.read_latents(0, store.num_latent_frames), store.read_frames(0, store.num_frames)


def assert_same_run(path, reference: tuple[np.ndarray, np.ndarray]) -> None:
    """The run at ``path`` is complete and bit-identical (latents and frames) to ``reference``."""
    latents, frames = store_arrays(path)
    ref_latents, ref_frames = reference
    assert latents.shape == ref_latents.shape and frames.shape == ref_frames.shape
    assert np.array_equal(latents, ref_latents)
    assert np.array_equal(frames, ref_frames)


def copy_store(source: Path, target: Path) -> Path:
    """A private copy of a finished store (for a test that changes it)."""
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------- the shared MPI launches (conftest)

# The scenarios of tests/mpi/scenarios.py that each world size's one shared mpiexec launch runs first (conftest.mpi_launches)
# (OUT, UNET3D, WAN, WAN22: filled in by conftest.mpi_launches).
MPI_SCENARIOS = {
    2: ["exchange", "vi_forward:{out}:{unet3d}:{wan}", "experts:{out}:{wan22}"],
    3: ["exchange", "preempt:0:3", "preempt:2:3"],
    4: ["exchange", "vi_forward:{out}:{unet3d}:{wan}"],
}


# The multi-rank `generate` runs that tests only read, by world size: one launch of tests/mpi/generate_many.py per
# world size runs them all, in this order (name: preset and arguments after `--output PATH --no-progress`).
MPI_RUNS = {
    2: {"tiny-test": ["tiny-test"],  # test_pipeline.py, test_plan.py
        "tiny-test-stages-3-1": ["tiny-test", "--set", "runtime.stage_layers=[3, 1]"],  # test_pipeline.py
        "tiny-test-stages-2-1": ["tiny-test", "--set", "runtime.stage_layers=[2, 1]"],  # test_pipeline.py: refused
        "tiny-vi-wan-25-frames": ["tiny-vi-wan", "--frames", "25"],  # test_videoinfinity_run.py
        # test_golden_hashes.py: the demo preset's settings before its window changed (DEMO_PINNED there)
        "demo-cpu-61-frames": ["demo-cpu", "--frames", "61", "--set", "strategy.block_latent_frames=4", "--set",
                               "strategy.context_latent_frames=2", "--set", "strategy.feature_cache=false"],
        "tiny-test-cfg-parallel": ["tiny-test", "--set", "runtime.cfg_parallel=true"],  # test_cfg_parallel.py
        # test_videoinfinity_run.py: UNet3D on 2 ranks (the clip length derived), then the same command again
        "tiny-vi-unet3d-one-prompt": ["tiny-vi-unet3d", "--set", "sampling.prompt=a red ball rolling on grass"],
        "tiny-vi-unet3d-one-prompt/again": ["tiny-vi-unet3d", "--set", "sampling.prompt=a red ball rolling on grass"],
        # test_conditioning.py: the tiny TI2V model ({ti2v}) from an image ({image}: write_start_image), 3 blocks
        "tiny-ti2v-image-33-frames": [
            "tiny-test", "--frames", "33", "--set", "model.path={ti2v}", "--set", "model.dtype=float32", "--set",
            "video.height=64", "--set", "video.width=64", "--set", "sampling.num_inference_steps=3", "--set",
            "sampling.guidance_scale=4.0", "--set", "sampling.flow_shift=5.0", "--set", "sampling.prompt=a cat", "--set",
            "strategy.block_latent_frames=3", "--set", "strategy.context_latent_frames=1", "--no-progress", "--image",
            "{image}"]},
    3: {},
    4: {"tiny-test": ["tiny-test"],  # test_pipeline.py
        "tiny-vi-wan": ["tiny-vi-wan"],  # test_videoinfinity_run.py
        "tiny-vi-wan-independent": ["tiny-vi-wan", "--set", "strategy.sync_clips=false"],  # test_videoinfinity_run.py
        # test_golden_hashes.py: the Video-Infinity presets' former switch (raw t >= 500, own frame lowered: VI_FORMER)
        "tiny-vi-wan-former": ["tiny-vi-wan", "--set", "strategy.switch_fraction=null", "--set",
                               "strategy.switch_timestep=500", "--set", "strategy.exempt_own_frame=false"],
        "tiny-vi-unet3d-former": ["tiny-vi-unet3d", "--set", "strategy.switch_fraction=null", "--set",
                                  "strategy.switch_timestep=500", "--set", "strategy.exempt_own_frame=false"],
        "tiny-test-cfg-parallel": ["tiny-test", "--set", "runtime.cfg_parallel=true"]},  # test_cfg_parallel.py
}
def write_start_image(path: Path) -> Path:
    """The start image of the TI2V tests: 48 x 80 random RGB pixels (seed 0) as a PNG at ``path``."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


AGAIN = "/again"  # a run named NAME/again is the run NAME's command once more, on NAME's store, right after it

# Runs killed by a launch of their own (HPCVIDEO_FAULT; 1 rank: a fork of the pre-imported worker; or, those of
# MPI_KILLED_LAST, at the end of a shared launch), before the launch of the world size ``resume_ranks``, which
# resumes them with the same arguments as its other runs.
MPI_KILLED = {  # name: (preset and arguments, ranks of the killed run, fault, ranks of the resume or None: see below)
    "tiny-test-killed-on-3": (["tiny-test"], 3, "tick:3", 2),  # test_pipeline.py: another number of ranks
    "tiny-test-killed-on-1": (["tiny-test"], 1, "tick:4", 4),
    "tiny-test-killed-on-2": (["tiny-test"], 2, "frames:1", 3),
    "tiny-test-rank-1-raised": (["tiny-test"], 3, "raise:tick:2@1", 3),  # test_pipeline.py: a failed rank
    "tiny-test-rank-2-killed": (["tiny-test"], 3, "tick:2@2", 3),
    "tiny-vi-wan-rank-1-killed": (["tiny-vi-wan", "--set", "strategy.clip_latent_frames=4"], 2, "tick:2@1", 2),  # VI
    "demo-spread-killed-on-2": (["demo-cpu", "--frames", "61", "--set", "strategy.block_latent_frames=4", "--set",
                                 "strategy.feature_cache=false", "--set", "store.checkpoint_every_ticks=1"], 2, "tick:14",
                                2),  # test_parallel_decode.py: blocks 0-2 left the queue, rank 1 decodes a part of each
    # test_parallel_vae.py: the row-parallel decode, blocks 0-1 written; the resume on 3 ranks decodes them again
    "tiny-test-rows-killed-on-2": (["tiny-test", "--set", "runtime.vae_decode=rows"], 2, "tick:6", 3),
    # test_status.py: what `status` says right after rank 0 of 2 is killed; the test resumes a copy itself
    "tiny-test-rank-0-killed-on-2": (["tiny-test"], 2, "tick:5", None),
}
# Killed runs whose kill is the last run of the shared launch of their own number of ranks (with its fault set for that
# run alone; the kill ends the launch) instead of a launch of their own: that shared launch then comes before the
# launch of the resume's world size. (Not both directions between two world sizes: one launch has to come first.) A run
# that no launch resumes (resume ranks None) must be one of these.
MPI_KILLED_LAST = {"tiny-test-killed-on-3", "tiny-test-rank-0-killed-on-2"}

# The test files that read each shared run, killed run or scenario (a scenario by its name before the first ":"): a
# session whose selected tests come from none of them does not make it (conftest.mpi_launches; `pytest tests/X.py`
# or `-k` pays only for the runs its tests read). A name not listed here is always made.
MPI_READERS = {
    "tiny-test": ("test_pipeline.py", "test_plan.py"),
    "tiny-test-stages-3-1": ("test_pipeline.py",),
    "tiny-test-stages-2-1": ("test_pipeline.py",),
    "tiny-vi-wan-25-frames": ("test_videoinfinity_run.py", "test_plan.py"),
    "demo-cpu-61-frames": ("test_golden_hashes.py",),
    "tiny-test-cfg-parallel": ("test_cfg_parallel.py",),
    "tiny-vi-wan": ("test_videoinfinity_run.py", "test_plan.py"),
    "tiny-vi-wan-independent": ("test_videoinfinity_run.py",),
    "tiny-vi-wan-former": ("test_golden_hashes.py", "test_runtime.py"),  # test_runtime: the 4-rank launch's exit
    "tiny-vi-unet3d-former": ("test_golden_hashes.py",),
    "tiny-vi-unet3d-one-prompt": ("test_videoinfinity_run.py",),
    "tiny-vi-unet3d-one-prompt/again": ("test_videoinfinity_run.py",),
    "tiny-ti2v-image-33-frames": ("test_conditioning.py",),
    "tiny-test-killed-on-3": ("test_pipeline.py",),
    "tiny-test-killed-on-1": ("test_pipeline.py",),
    "tiny-test-killed-on-2": ("test_pipeline.py",),
    "tiny-test-rank-1-raised": ("test_pipeline.py",),
    "tiny-test-rank-2-killed": ("test_pipeline.py",),
    "tiny-vi-wan-rank-1-killed": ("test_videoinfinity_run.py",),
    "demo-spread-killed-on-2": ("test_parallel_decode.py",),
    "tiny-test-rows-killed-on-2": ("test_parallel_vae.py",),
    "tiny-test-rank-0-killed-on-2": ("test_status.py",),
    "exchange": ("test_runtime.py",),
    "preempt": ("test_preempt.py",),
    "vi_forward": ("test_videoinfinity.py", "test_plan.py"),
    "experts": ("test_wan22.py",),
}



# ------------------------------------------------------------------------------------------- the forker


class Forker:
    """A worker process that imports torch, diffusers and hpcvideo once; :meth:`run` forks it and runs
    ``hpcvideo.cli.main(argv)`` in the child (a real process: an ``HPCVIDEO_FAULT`` SIGKILL kills it).
    The worker itself never computes and starts no thread, so every fork is clean."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="hpcvideo-forker-"))
        self._process = subprocess.Popen([sys.executable, "-m", "tests.helpers"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, cwd=ROOT, env=clean_env())
        assert self._process.stdout.readline().strip() == "ready", "the forker did not start"
        self._count = 0
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="forker-answers", daemon=True).start()

    def run(self, *args, fault: str | None = None, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> Result:
        """``hpcvideo ARGS`` in a fresh fork; ``env`` replaces the environment (default: this one); ``fault`` is set."""
        environ = dict(os.environ) if env is None else dict(env)
        environ.pop("HPCVIDEO_FAULT", None)
        if fault:
            environ["HPCVIDEO_FAULT"] = fault
        environ.setdefault("PYTHONPATH", str(ROOT))
        self._count += 1
        out, err = self._dir / f"{self._count}.out", self._dir / f"{self._count}.err"
        argv = [str(a) for a in args]
        request = {"argv": argv, "env": environ, "cwd": os.getcwd(), "stdout": str(out), "stderr": str(err)}
        start = time.monotonic()
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        pid = json.loads(self._readline(60))["pid"]  # the child's, at once
        try:
            code = json.loads(self._readline(timeout))["returncode"]  # the child's exit status, once it ended
        except queue.Empty:  # a child that hangs: kill it, then fail
            os.kill(pid, signal.SIGKILL)
            self._readline(60)
            raise AssertionError(f"hpcvideo {argv} did not end within {timeout} s:\n{out.read_text()}\n{err.read_text()}")
        result = Result(code, out.read_text(), err.read_text(), time.monotonic() - start, argv)
        return _check(result, check)

    def start(self, *args, env: dict[str, str] | None = None) -> int:
        """``hpcvideo ARGS`` in a fresh fork, not waited for: returns the child's pid at once (to be killed from
        outside, as a user or a scheduler would). Call :meth:`wait_started` before anything else uses the forker."""
        environ = dict(os.environ) if env is None else dict(env)
        environ.pop("HPCVIDEO_FAULT", None)
        environ.setdefault("PYTHONPATH", str(ROOT))
        self._count += 1
        out, err = self._dir / f"{self._count}.out", self._dir / f"{self._count}.err"
        request = {"argv": [str(a) for a in args], "env": environ, "cwd": os.getcwd(), "stdout": str(out),
                   "stderr": str(err)}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return json.loads(self._readline(60))["pid"]

    def wait_started(self, timeout: float = 300) -> int:
        """The exit status of the child :meth:`start` forked (negative: killed by that signal)."""
        return json.loads(self._readline(timeout))["returncode"]

    def _readline(self, timeout: float) -> str:
        line = self._lines.get(timeout=timeout)  # queue.Empty after timeout
        if not line:
            raise AssertionError("the forker's worker died")
        return line

    def _read(self) -> None:  # a thread: the worker's answers, line by line ("" at its end)
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put("")

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)
        shutil.rmtree(self._dir, ignore_errors=True)


def _serve() -> None:
    """The forker's worker loop: one JSON request per stdin line, one JSON answer per stdout line."""
    import hpcvideo.cli  # noqa: F401 - the expensive imports, once, before any fork
    import hpcvideo.generate  # noqa: F401
    import hpcvideo.runner  # noqa: F401
    import hpcvideo.strategies.videoinfinity.executor  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the command, never return into this loop
            code = 1
            try:
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                from hpcvideo.cli import main

                try:
                    code = main(request["argv"])
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported like an uncaught error of a real process
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    _serve()
