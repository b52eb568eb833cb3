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
    """``condition.image``: an existing readable image file (relative paths from the CWD). One line each."""
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
    """``cfg`` with ``condition.image_sha256`` set from the image file (``cfg`` itself when there is no
    image or the hash is already that of the file). The resolved config is what a run store records."""
    image = cfg.condition.image
    if image is None or not Path(image).expanduser().is_file():
        return cfg
    digest = file_sha256(image)
    if cfg.condition.image_sha256 == digest:
        return cfg
    from . import RunConfig

    d = cfg.to_dict()
    d["condition"]["image_sha256"] = digest
    return RunConfig.from_dict(d)


def model_problems(cfg, info: dict) -> list[str]:
    """Problems of ``cfg``'s ``condition`` with the model whose JSON facts are ``info`` (no weights): an image
    needs a model that takes one (``expand_timesteps``: Wan2.2 TI2V; or an image-to-video checkpoint, which
    needs one, on DualParal, with max_sequence_length 512 when it has an image encoder). One line each."""
    image = cfg.condition.image
    name = info.get("model_id", cfg.model.path)
    if info.get("condition_channels"):
        problems = []
        if info.get("pos_embed_seq_len"):
            problems.append(f"model.path={cfg.model.path!r}: {name} is a first-last-frame checkpoint (transformer "
                            "pos_embed_seq_len: two images); not supported; allowed: a text-to-video, TI2V or "
                            "image-to-video (one image) Wan checkpoint")
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
    if image is None or info.get("expand_timesteps"):
        return []
    return [f"condition.image={image!r}: {name} does not take an image (text-to-video only); allowed: null, "
            "or a model with expand_timesteps in its model_index.json (Wan2.2 TI2V, e.g. "
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers) or an image-to-video checkpoint (WanImageToVideoPipeline)"]
