"""Shared test set-up: a private model cache per session, offline hub, quiet logs."""

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
