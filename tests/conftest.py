"""Shared test set-up: a private model cache per session, offline hub, quiet logs; session fixtures for what
several files only read (the tiny models, one finished tiny-test run) and the forker (tests/helpers.py).

Layers (markers, pyproject.toml): unit (in this process, seconds), e2e (whole runs of the CLI, in this process,
a fork or a subprocess), mpi (several ranks under mpiexec), slurm (a real SLURM). `python -m pytest -q tests`
runs them all; `-m unit` is the quick loop, `-m "not slurm"` skips the cluster lab."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def hpcvideo_cache(tmp_path_factory):
    """Every test and every subprocess builds/reads the tiny model in a session-private cache."""
    cache = tmp_path_factory.mktemp("hpcvideo-cache")
    previous = os.environ.get("HPCVIDEO_CACHE")
    os.environ["HPCVIDEO_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield cache
    if previous is None:
        os.environ.pop("HPCVIDEO_CACHE", None)
    else:
        os.environ["HPCVIDEO_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(hpcvideo_cache):
    from hpcvideo.models import ensure_tiny_wan

    return ensure_tiny_wan()


@pytest.fixture(scope="session")
def tiny_unet3d_dir(hpcvideo_cache):
    from hpcvideo.models.unet3d import ensure_tiny_unet3d

    return ensure_tiny_unet3d()


@pytest.fixture(scope="session")
def forker(hpcvideo_cache):
    """One pre-imported worker per session; each ``forker.run(...)`` is a real, killable process (tests/helpers.py)."""
    from tests.helpers import Forker

    worker = Forker()
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def tiny_test_run(tmp_path_factory, tiny_model_dir):
    """The finished tiny-test run (29 frames = 4 blocks of 2 latent frames, 4 steps, 1 rank), made once per
    session in this process. Read it only; a test that changes a store takes a copy (tests.helpers.copy_store)."""
    from tests.helpers import cli

    path = tmp_path_factory.mktemp("tiny-test-run") / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--no-progress")
    return path


@pytest.fixture(scope="session")
def tiny_test_arrays(tiny_test_run):
    """(latents, frames) of :func:`tiny_test_run`: the uninterrupted reference every resume is compared with."""
    from tests.helpers import store_arrays

    return store_arrays(tiny_test_run)


LAYERS = ("unit", "e2e", "mpi", "slurm")


def pytest_collection_modifyitems(config, items):
    """A test with none of the layer markers is a unit test (pieces in this process): `-m unit` selects it."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in LAYERS):
            item.add_marker(pytest.mark.unit)
