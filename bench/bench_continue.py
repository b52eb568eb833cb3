"""The seam where a continued video starts (``--init-store``) on the trained demo model; prints one JSON object.

    python bench/bench_continue.py                 # about 2 minutes on 2 cores
    python bench/bench_continue.py --frames 93

Runs (``hpcvideo generate demo-cpu`` in this process, into a temp dir or --out):

  first     the demo job cut to --frames (a red circle moving right)
  next      a continuation of ``first`` (``--init-store``: its last frames are block 0's context), same prompt
  restart   the same as ``next`` without the earlier video (seed 1): what a cut to an unrelated clip looks like

Figures (mean |frame difference| in uint8 units, as hpcvideo.metrics): ``seam`` = |next[0] - first[-1]|,
``restart_seam`` = |restart[0] - first[-1]|, ``within`` = the mean difference of consecutive frames inside
``first`` and ``next``; ``ratio`` = seam / within (1: the seam moves the picture as much as one frame of the
video's own motion), ``restart_ratio`` the same for the cut; ``block_seam_ratio``: the seam metric of
``first`` at its own block boundaries, for comparison. Every video of the demo model starts with a frame
unlike its second (the VAE decodes a video's first latent frame alone): ``first_frame_jump`` = mean
|x[1] - x[0]| over the three runs, and ``seam_next1`` = |next[1] - first[-1]|. Where the red circle is
(hpcvideo.demo.data.colour_centroids): ``circle_jump`` = distance in pixels between its centroid in
``first[-1]`` and in ``next[0]`` (``restart[0]`` for ``restart_circle_jump``), ``circle_step`` = its mean
travel per frame inside the videos.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--out", default=None, help="folder for the run stores (default: a temp dir)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from hpcvideo.cli import main as cli
    from hpcvideo.demo.data import colour_centroids
    from hpcvideo.metrics import seam_metric
    from hpcvideo.store import RunStore

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-continue-"))
    prompt = ["--set", "sampling.prompt=a red circle moving right on a blue gradient background"]
    common = ["--frames", str(args.frames), "--no-progress", *prompt]
    start = time.perf_counter()
    runs = {"first": [], "next": ["--init-store", str(out / "first.zarr")], "restart": ["--seed", "1"]}
    for name, extra in runs.items():
        code = cli(["generate", "demo-cpu", "--output", str(out / f"{name}.zarr"), *common, *extra])
        if code:
            raise SystemExit(f"hpcvideo generate ({name}) exited {code}")
    frames = {name: RunStore.open(out / f"{name}.zarr").read_frames(0, args.frames).astype(np.int16) for name in runs}

    def mean_diff(a, b) -> float:
        return float(np.abs(a - b).mean())

    within = np.concatenate([np.abs(np.diff(frames[n], axis=0)).mean(axis=(1, 2, 3)) for n in ("first", "next")])
    seam, restart = mean_diff(frames["next"][0], frames["first"][-1]), mean_diff(frames["restart"][0], frames["first"][-1])
    red = {name: colour_centroids(frames[name].astype(np.uint8), "red") for name in runs}
    steps = np.concatenate([np.linalg.norm(np.diff(red[n], axis=0), axis=1) for n in ("first", "next")])
    result = {
        "frames": args.frames, "seam": round(seam, 3), "restart_seam": round(restart, 3),
        "within": round(float(within.mean()), 3), "ratio": round(seam / within.mean(), 3),
        "restart_ratio": round(restart / within.mean(), 3),
        "block_seam_ratio": seam_metric(out / "first.zarr")["overall"],
        "first_frame_jump": round(float(np.mean([mean_diff(frames[n][1], frames[n][0]) for n in runs])), 3),
        "seam_next1": round(mean_diff(frames["next"][1], frames["first"][-1]), 3),
        "circle_jump": round(float(np.linalg.norm(red["next"][0] - red["first"][-1])), 2),
        "restart_circle_jump": round(float(np.linalg.norm(red["restart"][0] - red["first"][-1])), 2),
        "circle_step": round(float(np.nanmean(steps)), 2),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
