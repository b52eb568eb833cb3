"""What a new user meets first: single-rank runs without an MPI library, a complete wheel, presets and
demo weights found as package data from any directory, and ``train-demo`` never writing into the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli

HPCVIDEO = [sys.executable, "-m", "hpcvideo.cli"]
NO_MPI = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}  # what mpi4py without an MPI library does: fail to dlopen


def run(args, *, cwd, env=None, timeout=300):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    environ.update(env or {})
    return subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def test_the_simulated_missing_mpi_library_really_fails_to_load(tmp_path):
    result = run([sys.executable, "-c", "from mpi4py import MPI"], cwd=tmp_path, env=NO_MPI)
    assert result.returncode != 0 and "cannot load MPI library" in result.stderr


@pytest.mark.e2e
def test_single_rank_run_needs_no_mpi_library(tmp_path):
    store = tmp_path / "one.zarr"
    result = run([*HPCVIDEO, "generate", "tiny-test", "--output", str(store)], cwd=tmp_path, env=NO_MPI)
    assert result.returncode == 0, result.stderr
    assert "complete=True" in result.stdout


@pytest.mark.e2e
def test_ranks_without_mpi_library_is_one_clear_error_before_anything_is_created(tmp_path):
    store = tmp_path / "two.zarr"
    result = run([*HPCVIDEO, "generate", "tiny-test", "--output", str(store), "--ranks", "2"], cwd=tmp_path, env=NO_MPI)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "hpcvideo[mpi]" in result.stderr and "--ranks 1" in result.stderr
    assert not store.exists()


def test_launcher_without_mpi_library_names_the_fix():
    from hpcvideo.runtime.env import MPIUnavailable, _import_mpi

    os.environ["MPI4PY_LIBMPI"] = NO_MPI["MPI4PY_LIBMPI"]
    try:
        if "mpi4py.MPI" in sys.modules:
            pytest.skip("mpi4py.MPI is already loaded in this process")
        with pytest.raises(MPIUnavailable, match=r"cannot load an MPI library .*hpcvideo\[mpi\]"):
            _import_mpi()
    finally:
        os.environ.pop("MPI4PY_LIBMPI")


def test_presets_and_demo_weights_are_package_data():
    import hpcvideo
    from hpcvideo.config import DEMO_WEIGHTS_DIR, PRESETS_DIR, list_presets

    package = Path(hpcvideo.__file__).resolve().parent
    assert PRESETS_DIR.resolve().parent == package and DEMO_WEIGHTS_DIR.resolve().parent.parent == package
    assert {"demo-cpu", "tiny-cpu", "tiny-test"} <= set(list_presets())
    assert (ROOT / "configs").resolve() == PRESETS_DIR.resolve()  # the top-level folder users browse
    assert (DEMO_WEIGHTS_DIR / "model_index.json").is_file()


@pytest.mark.e2e
def test_wheel_is_complete_and_runs_the_demo_from_another_directory(tmp_path):
    """``pip install .`` builds this wheel: it must hold presets and weights, and run from anywhere."""
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    # a copy without build outputs: setuptools builds in the source tree, and a stale build/lib of this
    # checkout (a module since removed) would end up in the wheel
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                 "-w", str(wheels)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("hpcvideo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert presets and {f"hpcvideo/configs/{name}" for name in presets} <= names
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "hpcvideo/demo/weights").rglob("*") if p.is_file()}
    assert shipped and shipped <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = run([sys.executable, "-c", "import hpcvideo; print(hpcvideo.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site)), where  # the wheel's copy, not the checkout
    result = run([*HPCVIDEO, "generate", "demo-cpu", "--output", "runs/demo.zarr", "--frames", "13", "--no-progress"],
                 cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert "13/13 frames, complete=True" in result.stdout
    exported = run([*HPCVIDEO, "export", "runs/demo.zarr", "runs/demo.mp4"], cwd=elsewhere, env=env)
    assert exported.returncode == 0 and (elsewhere / "runs/demo.mp4").stat().st_size > 0, exported.stderr


def test_train_demo_never_writes_into_the_package(tmp_path, monkeypatch):
    from hpcvideo.demo import WEIGHTS_DIR, default_output, output_problem

    assert "inside the installed package" in output_problem(WEIGHTS_DIR)
    assert "inside the installed package" in output_problem(WEIGHTS_DIR / "sub")
    assert output_problem(tmp_path / "mine") is None
    monkeypatch.setenv("HPCVIDEO_CACHE", str(tmp_path / "cache"))
    assert default_output() == tmp_path / "cache" / "demo-weights"
    monkeypatch.delenv("HPCVIDEO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_output() == tmp_path / "xdg" / "hpcvideo" / "demo-weights"
    before = {p: p.stat().st_mtime_ns for p in WEIGHTS_DIR.rglob("*")}
    result = cli("train-demo", "--output", WEIGHTS_DIR, check=False)  # in this process: the refusal comes before any work
    assert result.returncode == 2 and "inside the installed package" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in WEIGHTS_DIR.rglob("*")} == before
