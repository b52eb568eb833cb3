"""Benchmark of CFG parallelism (``runtime.cfg_parallel``) against the plain DualParal pipeline on the same
number of ranks; prints one JSON object.

    python bench/bench_cfg_parallel.py            # 2 ranks, the wide tiny model, best of 2 (about 2-3 minutes on 2 cores)
    python bench/bench_cfg_parallel.py --quick    # a smaller video, 1 repeat

Both layouts run the same video on 2 ranks (``mpiexec -n 2 python -m hpcvideo.cli generate tiny-test ...``, as
bench/bench_pipeline.py runs them): "pipeline" = 2 stages of the 4 transformer blocks, each stage running the
cond and uncond branch of every item; "cfg_parallel" = 2 groups of 1 stage, rank 0 the cond branch of all 4
blocks, rank 1 the uncond branch. The runs alternate (pipeline, cfg_parallel, pipeline, ...) so that both see
the same machine load; each run records the 1-minute load average before it. Two videos: 4 blocks (4 in
flight) and 1 block (1 in flight: the pipeline's stages alternate). The model is the tiny model
folder with a wide transformer (hidden 512, ffn 2048: bench_pipeline.py's speedup_wide), so the transformer
dominates as in real Wan models. Reported: the denoising loop's and the whole run's seconds (best of
``--repeats``), speed-up = pipeline / cfg_parallel, per-rank wait fractions and bytes sent; the latents of
the two layouts must be exactly equal (both equal the 1-rank run, tested in tests/test_cfg_parallel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_pipeline import WIDE_TRANSFORMER, build_wide_model, run_cli, slim, workload  # noqa: E402

LAYOUTS = {"pipeline": {}, "cfg_parallel": {"runtime.cfg_parallel": "true"}}
# blocks of the video: "many_blocks" keeps min(blocks, steps) = 4 blocks in flight (the pipeline's stages stay
# busy); "one_block" keeps 1 (per tick the cond and uncond items of one block: the pipeline's second stage waits
# for the first, the case of few blocks in flight, e.g. a few-step distilled model on a short video)
WORKLOADS = {"many_blocks": 4, "one_block": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller video and 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per layout, alternating (default 2, quick 1)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from hpcvideo.store import RunStore

    repeats = args.repeats or (1 if args.quick else 2)
    root = Path(tempfile.mkdtemp(prefix="bench_cfg_parallel_"))
    started = time.perf_counter()
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads_per_rank": 1,
                          "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
              "quick": args.quick, "repeats": repeats, "ranks": 2}
    try:
        wide = build_wide_model(root, **WIDE_TRANSFORMER)
        steps = 4 if args.quick else 8
        for label, blocks in WORKLOADS.items():
            w = workload(size=64, block=4, blocks=blocks, steps=steps, model_path=wide)
            result = {"workload": {"model": "tiny + wide transformer (hidden 512, ffn 2048, 4 blocks)", "pixels": "64x64",
                                   "blocks": blocks, "block_latent_frames": 4, "steps": steps, "guidance_scale": 5.0}}
            runs: dict[str, list] = {name: [] for name in LAYOUTS}
            latents = {}
            for k in range(repeats):
                for name, extra in LAYOUTS.items():  # alternating: A, B, A, B, ...
                    keep = root / f"{label}-{name}-{k}.zarr"
                    run = run_cli(2, {**w, **extra}, keep=keep)
                    runs[name].append(slim(run))
                    store = RunStore.open(keep)
                    latents[name] = store.read_latents(0, store.num_latent_frames)
                    shutil.rmtree(keep, ignore_errors=True)
            best = {name: {"denoise_s": min(r["denoise_s"] for r in rs), "total_s": min(r["total_s"] for r in rs),
                           "cli_wall_s": min(r["cli_wall_s"] for r in rs)} for name, rs in runs.items()}
            result.update(runs=runs, best=best, latents_equal=bool(np.array_equal(latents["pipeline"], latents["cfg_parallel"])),
                          speedup_cfg_parallel_vs_pipeline={
                              key: round(best["pipeline"][key] / best["cfg_parallel"][key], 3)
                              for key in ("denoise_s", "total_s", "cli_wall_s")})
            report[label] = result
        report["latents_equal"] = all(report[label]["latents_equal"] for label in WORKLOADS)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if not report.get("latents_equal"):
        sys.exit(1)


if __name__ == "__main__":
    main()
