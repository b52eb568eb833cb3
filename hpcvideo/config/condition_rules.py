"""Checks of the ``condition`` section (no torch, no weights): the image file exists and is readable, and
its SHA-256 (the run's identity: a changed image at the same path is another run). The checks against the
model (does it take an image?) are :func:`model_problems` here (called by each strategy's
``model_problems``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def path_problems(cfg, bad: set[str]) -> list[str]:
    """``condition.image``: an existing readable image file; ``condition.init_video``: an existing video file;
    ``condition.init_store``: an existing run store (relative paths from the CWD). One line each."""
    return _image_problems(cfg, bad) + _init_problems(cfg, bad)


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")


def _init_problems(cfg, bad: set[str]) -> list[str]:
    c = cfg.condition
    problems = []
    if c.init_video is not None and c.init_store is not None:
        return [f"condition.init_video={c.init_video!r} and condition.init_store={c.init_store!r} are both set; "
                "allowed: one of them"]
    if c.init_video is not None and "condition.init_video" not in bad:
        p = Path(c.init_video).expanduser()
        allowed = f"allowed: a video file ({', '.join(VIDEO_SUFFIXES)}) or null"
        if not p.is_file():
            problems.append(f"condition.init_video={c.init_video!r} is not an existing file (relative paths are taken "
                            f"from {os.getcwd()}); {allowed}")
        elif p.suffix.lower() not in VIDEO_SUFFIXES:
            problems.append(f"condition.init_video={c.init_video!r} has suffix {p.suffix!r}; {allowed}")
    if c.init_store is not None and "condition.init_store" not in bad:
        p = Path(c.init_store).expanduser()
        if not (p / "zarr.json").is_file():
            problems.append(f"condition.init_store={c.init_store!r} is not a run store (no zarr.json; relative paths "
                            f"are taken from {os.getcwd()}); allowed: a run store folder or null")
        elif cfg.store.path is not None and p.resolve() == Path(cfg.store.path).expanduser().resolve():
            problems.append(f"condition.init_store={c.init_store!r} is the run's own store.path; allowed: another run store")
    if (c.init_video is not None or c.init_store is not None) and not problems:
        if c.image is not None:
            problems.append(f"condition.image={c.image!r} with a video to continue: allowed: one of them")
        if cfg.strategy.name != "dualparal":
            problems.append(f"strategy.name={cfg.strategy.name!r}: continuing a video needs DualParal (its first "
                            "block's context); allowed: 'dualparal'")
        elif cfg.strategy.context_latent_frames < 1:
            problems.append("strategy.context_latent_frames=0: continuing a video gives the first block that many "
                            "frames of it as context; allowed: >= 1")
    return problems


def _image_problems(cfg, bad: set[str]) -> list[str]:
    image = cfg.condition.image
    if image is None or "condition.image" in bad:
        return []
    allowed = f"allowed: a readable image file ({', '.join(IMAGE_SUFFIXES)}) or null"
    p = Path(image).expanduser()
    if image == "":
        return [f"condition.image='' is empty; {allowed}"]
    if not p.exists():
        return [f"condition.image={image!r} does not exist (relative paths are taken from {os.getcwd()}); {allowed}"]
    if not p.is_file():
        return [f"condition.image={image!r} is not a file; {allowed}"]
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        return [f"condition.image={image!r} has suffix {p.suffix!r}; {allowed}"]
    if not os.access(p, os.R_OK):
        return [f"condition.image={image!r} is not readable; {allowed}"]
    return []


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def with_image_hash(cfg):
    """``cfg`` with ``condition.image_sha256`` set from the image file and ``condition.init_sha256`` from the
    video to continue (its file, or the store frames it uses); ``cfg`` itself when nothing changes. The
    resolved config is what a run store records, so a changed input is another run."""
    c = cfg.condition
    image = c.image
    image_digest = file_sha256(image) if image is not None and Path(image).expanduser().is_file() else c.image_sha256
    init_digest = c.init_sha256
    if c.init_video is not None and Path(c.init_video).expanduser().is_file():
        init_digest = file_sha256(c.init_video)
    elif c.init_store is not None and (Path(c.init_store).expanduser() / "zarr.json").is_file():
        init_digest = _store_frames_sha256(cfg)
    if (image_digest, init_digest) == (c.image_sha256, c.init_sha256):
        return cfg
    from . import RunConfig

    d = cfg.to_dict()
    d["condition"]["image_sha256"], d["condition"]["init_sha256"] = image_digest, init_digest
    return RunConfig.from_dict(d)


def _store_frames_sha256(cfg) -> str | None:
    """SHA-256 of the frames of ``condition.init_store`` that a continuation reads (its last ready ones)."""
    from ..store import RunStore, StoreError

    try:
        store = RunStore.open(Path(cfg.condition.init_store).expanduser(), mode="r")
        ready = store.num_frames_ready()
        count = 1 + 4 * (max(cfg.strategy.context_latent_frames, 1) - 1)
        frames = store.read_frames(max(0, ready - count), ready)
    except (StoreError, OSError, KeyError):
        return None
    return hashlib.sha256(frames.tobytes()).hexdigest()


def model_problems(cfg, info: dict) -> list[str]:
    """Problems of ``cfg``'s ``condition`` with the model whose JSON facts are ``info`` (no weights): an image
    needs a model that takes one (``expand_timesteps``: Wan2.2 TI2V; or an image-to-video checkpoint, which
    needs one, on DualParal, with max_sequence_length 512 when it has an image encoder); an image or a video
    to continue needs a VAE that encodes. One line each."""
    problems = _model_kind_problems(cfg, info)
    c = cfg.condition
    uses_vae = [f"condition.{k}={v!r}" for k, v in (("image", c.image), ("init_video", c.init_video),
                                                    ("init_store", c.init_store)) if v is not None]
    if not problems and uses_vae and info.get("vae_encodes") is False:
        problems.append(f"{uses_vae[0]}: the VAE of {info.get('model_id', cfg.model.path)} cannot encode (no residual "
                        "blocks: a decode-only test VAE such as the tiny Wan's); allowed: null, or a model whose VAE "
                        "encodes")
    return problems


def _model_kind_problems(cfg, info: dict) -> list[str]:
    image = cfg.condition.image
    name = info.get("model_id", cfg.model.path)
    if info.get("condition_channels"):
        problems = []
        if cfg.condition.init_video or cfg.condition.init_store:
            problems.append(f"condition.init_video/init_store: continuing a video with an image-to-video checkpoint "
                            f"({name}) is not supported; allowed: a text-to-video or TI2V model")
        if image is None:
            problems.append(f"condition.image=None: {name} is an image-to-video model; allowed: an image file "
                            "(--image PATH)")
        if cfg.strategy.name != "dualparal":
            problems.append(f"strategy.name={cfg.strategy.name!r}: image-to-video checkpoints ({name}) run with "
                            "DualParal only; allowed: 'dualparal'")
        if info.get("image_dim") and cfg.sampling.max_sequence_length != 512:
            problems.append(f"sampling.max_sequence_length={cfg.sampling.max_sequence_length}: {name} puts its image "
                            "tokens before 512 text tokens (diffusers' WanAttnProcessor); allowed: 512")
        return problems
    if (cfg.condition.init_video or cfg.condition.init_store) and info.get("condition_channels") is None:
        return []  # unet3d: DualParal refuses the family
    if image is None or info.get("expand_timesteps"):
        return []
    return [f"condition.image={image!r}: {name} does not take an image (text-to-video only); allowed: null, "
            "or a model with expand_timesteps in its model_index.json (Wan2.2 TI2V, e.g. "
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers) or an image-to-video checkpoint (WanImageToVideoPipeline)"]
