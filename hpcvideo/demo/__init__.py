"""A small Wan2.1 text-to-video model that hpcvideo trains itself, shipped in the package.

No real checkpoint can be downloaded on the CPU machines, so this subpackage makes one: synthetic
motion clips with captions (:mod:`.data`), the model's small configs (:mod:`.model`) and the
training command ``hpcvideo train-demo`` (:mod:`.train`). The trained diffusers folder lives in
``hpcvideo/demo/weights`` (``model.path: demo``; preset ``configs/demo-cpu.yaml``). Retraining writes to a
folder the user names (default: a user cache folder), never into the installed package; use the result
with ``--set model.path=FOLDER``.

This module imports neither torch nor numpy (the CLI builds its parser from it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the shipped diffusers folder (read only)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed hpcvideo package: never written to


def default_output() -> Path:
    """Where ``hpcvideo train-demo`` writes without ``--output``: ``$HPCVIDEO_CACHE/demo-weights``, else
    ``$XDG_CACHE_HOME/hpcvideo/demo-weights``, else ``~/.cache/hpcvideo/demo-weights``."""
    if os.environ.get("HPCVIDEO_CACHE"):
        return Path(os.environ["HPCVIDEO_CACHE"]) / "demo-weights"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hpcvideo" / "demo-weights"


def output_problem(output: str | os.PathLike) -> str | None:
    """Why ``--output`` cannot be used (a folder inside the installed package), or None."""
    resolved = Path(output).expanduser().resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        return (f"train-demo --output {str(output)!r} is inside the installed package ({PACKAGE_DIR}); "
                "name a folder of your own (default: a cache folder) and use it with --set model.path=FOLDER")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hpcvideo train-demo`` options (defaults: about an hour of one CPU thread; see hpcvideo.demo.train)."""
    parser.add_argument("--output", default=None,
                        help="diffusers folder to write (default: ~/.cache/hpcvideo/demo-weights, or "
                        "$HPCVIDEO_CACHE/demo-weights); never inside the installed package")
    parser.add_argument("--work-dir", default=None, help="checkpoints and cached latents (default: OUTPUT.work); "
                        "rerun the same command to continue an interrupted training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--num-clips", type=int, default=1536, help="clips encoded for the transformer stage")
    parser.add_argument("--transformer-steps", type=int, default=8000)
    parser.add_argument("--decoder-steps", type=int, default=1200,
                        help="decoder refinement with the encoder frozen (stage 4)")
    parser.add_argument("--vae-motion-steps", type=int, default=600,
                        help="VAE steps with the within-chunk motion weight, after the first VAE stage")
    parser.add_argument("--motion-weight", type=float, default=16.0,
                        help="loss weight of the pixels a chunk's motion changes (motion stage and decoder stage)")
    parser.add_argument("--transformer-shape-weight", type=float, default=4.0,
                        help="flow-matching loss weight 1 + W x shape coverage per latent pixel (0: plain MSE)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
