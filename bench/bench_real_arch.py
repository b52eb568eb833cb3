"""Wan2.1-T2V-1.3B's architecture on CPU, with random weights; prints one JSON object.

    python bench/bench_real_arch.py                    # a few minutes on 2 cores, about 9 GB of memory at most
    python bench/bench_real_arch.py --folder DIR       # keep the random model folder in DIR (reused when there)
    python bench/bench_real_arch.py --only videoinfinity_exact   # only step 3's 2-layer comparison (a few minutes)

What it does:

1. builds a diffusers folder with Wan2.1-T2V-1.3B's transformer and VAE configs and random float32 weights,
   the transformer in two safetensors shards with an index file as in the real checkpoint, and a small
   umT5 text encoder of the real d_model 4096 (:func:`hpcvideo.models.arch.build_random_folder`);
2. ``reads_only_its_tensors``: loads the two stages of a 2-rank split (``load_wan_transformer_stage``)
   while recording every tensor name read from the shards: each stage must read exactly its blocks and
   the shared modules;
3. runs ``hpcvideo generate`` at a small resolution (32x32 px, bf16, 2 steps, CFG on, 2 blocks of 4
   latent frames): DualParal on 1 and 2 ranks (latents and frames must be bit-identical),
   Video-Infinity on 2 ranks against its single-process reference (one rank whose clip is the video);
   ``videoinfinity_exact``: the same Video-Infinity comparison in float32 and in bf16 on a 2-layer model of
   the same width (hidden 1536, 12 heads x 128, FFN 8960): float32 must be bit-identical; bf16 is not
   (below) and must stay within twice the bf16 reference's own error against the float32 reference;
4. ``memory``: each rank's peak RSS (the run's ``rank_stats``) minus the RSS of a process that imported
   the same libraries, against ``hpcvideo plan``'s peak for the same run and rank (goal: within 10%).
   On the CPU the device is the host, so the plan's peak is its largest phase of everything (``load``:
   the weights plus the pages of the rank's tensors in the mapped safetensors files).

The heavy steps (building the folder, the tensor-read check) run in child processes: a child's peak RSS
starts at its parent's, so this process stays small until the runs are done.

Video-Infinity in bf16 on the CPU is not bit-identical to its reference at this width: a rank computes
every per-token layer (Linear, FFN) on its clip's rows only, and oneDNN's bf16 matmul (AMX/AVX512-BF16
kernels) gives results that depend on the number of rows of the call, not just on the row (1536 -> 8960 on
2x16 vs 2x32 rows: max |diff| 0.0078 on bf16 outputs). With ``torch.backends.mkldnn.enabled = False``
(ATen's own bf16 gemm: row-independent, 40-70x slower) the 2-rank bf16 forward equals the reference bit
for bit; float32 matmuls of these shapes are row-independent. So the exact check is float32, and bf16 is
held to a tolerance measured by the bench itself: e = max |bf16 reference - float32 reference|; the
2-rank bf16 latents must be within 2e of the bf16 reference and of the float32 reference (two runs each
within e of the float32 result are within 2e of each other). Measured (2 layers, 32x32 px, 2 steps;
``--only videoinfinity_exact``: 117 s at load 5.7-6 on the shared 2-core machine): 2-rank vs reference
0.053, 2-rank vs float32 0.050, e = 0.041, max |latents| 3.75; float32 bit-identical.

Not run by the tests (minutes, GBs). Figures on the shared 2-core machine come with its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--set", "model.dtype=bfloat16", "--set", "video.height=32", "--set", "video.width=32",
          "--set", "sampling.num_inference_steps=2", "--set", "runtime.device=cpu", "--set", "runtime.num_threads=1",
          "--no-progress"]
DUALPARAL = ["wan2.1-t2v-1.3b", "--frames", "29", "--set", "strategy.block_latent_frames=4",
             "--set", "strategy.context_latent_frames=1"]  # 8 latent frames = 2 blocks of 4
VIDEOINFINITY = ["wan2.1-t2v-1.3b-vi", "--frames", "29", "--set", "strategy.local_frames=2",
                 "--set", "strategy.global_frames=2"]  # 8 latent frames: clips of 4 on 2 ranks


def environ() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def generate(folder: Path, args: list[str], output: Path, ranks: int, dtype: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "hpcvideo.cli", "generate", *args, "--set", f"model.path={folder}", *COMMON,
           "--output", str(output)] + (["--ranks", str(ranks)] if ranks > 1 else [])
    cmd += ["--set", f"model.dtype={dtype}"] if dtype else []  # after COMMON's: the last override wins
    start = time.perf_counter()
    result = subprocess.run(cmd, env=environ(), capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return {"wall_s": round(time.perf_counter() - start, 1)}


def child(step: str, folder: Path, *extra: str) -> dict:
    """A step in a process of its own: a child's peak RSS starts at its parent's (fork and exec keep the
    high-water mark), so this process stays small until every run is done."""
    out = subprocess.run([sys.executable, __file__, "--folder", str(folder), "--step", step, *extra], env=environ(),
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


def arrays(path: Path):
    """(latents, frames) of a complete run store."""
    from hpcvideo.store import RunStore

    store = RunStore.open(path)
    assert store.status_dict()["complete"], path
    return store.read_latents(0, store.num_latent_frames), store.read_frames(0, store.num_frames)


def baseline_rss_mib() -> float:
    """Peak RSS of a process that imports what a rank imports and nothing more (MiB)."""
    code = ("import resource, torch, diffusers, transformers, zarr, hpcvideo.runner, hpcvideo.cli, "
            "hpcvideo.strategies.dualparal.pipeline, hpcvideo.strategies.videoinfinity.executor, hpcvideo.decode; "
            "from diffusers import WanTransformer3DModel, AutoencoderKLWan; from transformers import UMT5EncoderModel; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], env=environ(), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def reads_only_its_tensors(folder: Path) -> dict:
    """Stage loads of a 2-rank split with every tensor read from the shards recorded."""
    import torch
    from safetensors import safe_open

    import hpcvideo.models.wan as wan
    from hpcvideo.strategies.dualparal.pipeline import split_layers

    read: list[str] = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    import safetensors

    out = {}
    original = safetensors.safe_open
    safetensors.safe_open = Recording
    try:
        index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        every = set(index["weight_map"])
        for rank, layers in enumerate(split_layers(30, 2)):
            read.clear()
            stage = wan.load_wan_transformer_stage(folder, layers, dtype=torch.bfloat16)
            own = {k for k in every if k.split(".")[0] != "blocks" or int(k.split(".")[1]) in layers}
            out[f"rank{rank}"] = {"layers": [layers.start, layers.stop], "tensors_read": len(read),
                                  "tensors_of_stage": len(own), "exact": sorted(read) == sorted(own),
                                  "shards": sorted(set(index["weight_map"][k] for k in read))}
            del stage
    finally:
        safetensors.safe_open = original
    out["ok"] = all(v["exact"] for v in out.values() if isinstance(v, dict))
    return out


def planned(folder: Path, args: list[str], ranks: int) -> list[dict]:
    from hpcvideo.config import load_config
    from hpcvideo.plan import make_plan

    preset, rest = args[0], args[1:]
    frames = int(rest[rest.index("--frames") + 1])
    sets = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"] + [COMMON[i + 1] for i, a in enumerate(COMMON) if a == "--set"]
    cfg = load_config(preset, sets + [f"model.path={folder}"], num_frames=frames, check_paths=False)
    return [{"rank": r.rank, "peak_mib": round(r.peak_bytes / 2**20, 1), "peak_phase": r.peak_phase,
             "terms_mib": {p: {k: round(v / 2**20, 1) for w in ("device", "host") for k, v in t[w].items()}
                           for p, t in r.phases().items()}}
            for r in make_plan(cfg, num_ranks=ranks).ranks]


def videoinfinity_exact(work: Path) -> dict:
    """Video-Infinity on 2 ranks against its reference on a 2-layer model of Wan2.1-1.3B's width, in float32
    (must be bit-identical) and in bf16 (oneDNN's row-count-dependent bf16 matmul: held to twice the bf16
    reference's own error, max |bf16 reference - float32 reference|). Builds the 2-layer folder in ``work``."""
    import numpy as np

    folder = work / "Wan2.1-T2V-1.3B-2-layers-random"
    if not (folder / "model_index.json").is_file():
        child("build", folder, "--layers", "2")
    latents = {}
    for dtype in ("float32", "bfloat16"):
        for name, (run_args, ranks) in {"ref": (VIDEOINFINITY + ["--set", "strategy.clip_latent_frames=8"], 1),
                                        "2": (VIDEOINFINITY, 2)}.items():
            output = work / f"vi2l_{dtype}_{name}.zarr"
            generate(folder, run_args, output, ranks, dtype)
            latents[dtype, name] = arrays(output)[0].astype(np.float64)
    f32_equal = bool(np.array_equal(latents["float32", "ref"], latents["float32", "2"]))
    bf16_diff = float(np.abs(latents["bfloat16", "ref"] - latents["bfloat16", "2"]).max())
    bf16_error = float(np.abs(latents["bfloat16", "ref"] - latents["float32", "ref"]).max())
    bf16_2_error = float(np.abs(latents["bfloat16", "2"] - latents["float32", "ref"]).max())
    # two bf16 runs each within e of the float32 result differ by at most 2e (triangle inequality)
    within = bf16_diff <= 2 * bf16_error and bf16_2_error <= 2 * bf16_error
    return {"float32_2_ranks_bit_identical": f32_equal,
            "bf16_2_vs_reference_max_abs_diff": bf16_diff,
            "bf16_reference_vs_float32_max_abs_diff": bf16_error,
            "bf16_2_vs_float32_reference_max_abs_diff": bf16_2_error,
            "max_abs_latents": float(np.abs(latents["float32", "ref"]).max()),
            "bf16_tolerance": "2 x max |bf16 reference - float32 reference|, for both the 2-rank vs reference "
                              "difference and the 2-rank run's own error",
            "bf16_within_tolerance": within,
            "ok": f32_equal and within}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="where the random 1.3B folder is (built there if missing)")
    parser.add_argument("--step", choices=("build", "reads"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # build: fewer transformer layers
    parser.add_argument("--only", choices=("videoinfinity_exact",), help="run only this part (in a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.step == "build":
        from hpcvideo.models.arch import ARCHS, build_random_folder

        arch = "wan2.1-t2v-1.3b"
        if args.layers:  # same width, fewer blocks: a config of this process only
            spec = dict(ARCHS[arch], transformer={**ARCHS[arch]["transformer"], "num_layers": args.layers})
            arch = f"{arch}-{args.layers}-layers"
            ARCHS[arch] = spec
        build_random_folder(args.folder, arch)
        print(json.dumps({"built": args.folder}))
        return 0
    if args.step == "reads":
        print(json.dumps(reads_only_its_tensors(Path(args.folder))))
        return 0

    report = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    work = Path(tempfile.mkdtemp(prefix="bench-real-arch-"))
    if args.only == "videoinfinity_exact":
        report["videoinfinity_exact"] = videoinfinity_exact(work)
        report["machine"]["load_after"] = os.getloadavg()
        print(json.dumps(report, indent=2))
        return 0
    folder = Path(args.folder) if args.folder else work / "Wan2.1-T2V-1.3B-random"
    start = time.perf_counter()
    if not (folder / "model_index.json").is_file():
        child("build", folder)
    shards = sorted(p.name for p in (folder / "transformer").glob("*.safetensors"))
    report["folder"] = {"path": str(folder), "transformer_shards": shards, "build_s": round(time.perf_counter() - start, 1)}
    report["reads_only_its_tensors"] = child("reads", folder)
    report["baseline_rss_mib"] = baseline = baseline_rss_mib()
    runs = {
        "dualparal_1": (DUALPARAL, 1), "dualparal_2": (DUALPARAL, 2),
        "videoinfinity_ref": (VIDEOINFINITY + ["--set", "strategy.clip_latent_frames=8"], 1),
        "videoinfinity_2": (VIDEOINFINITY, 2),
    }
    results = {name: generate(folder, run_args, work / f"{name}.zarr", ranks) for name, (run_args, ranks) in runs.items()}
    report["machine"]["parent_rss_mib_during_runs"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    import numpy as np

    from hpcvideo.store import RunStore

    for name, (run_args, ranks) in runs.items():
        results[name]["rank_stats"] = RunStore.open(work / f"{name}.zarr").attrs["rank_stats"]
        plan = planned(folder, run_args, ranks)
        results[name]["memory"] = [
            {"rank": s["rank"], "peak_rss_mib": s["peak_rss_mib"], "above_baseline_mib": round(s["peak_rss_mib"] - baseline, 1),
             "planned_mib": p["peak_mib"], "ratio": round((s["peak_rss_mib"] - baseline) / p["peak_mib"], 3),
             "planned_phase": p["peak_phase"], "planned_terms_mib": p["terms_mib"]}
            for s, p in zip(sorted(results[name]["rank_stats"], key=lambda s: s["rank"]), plan)]
        del results[name]["rank_stats"]
    a, b = arrays(work / "dualparal_1.zarr"), arrays(work / "dualparal_2.zarr")
    report["dualparal_1_vs_2_bit_identical"] = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
    a, b = arrays(work / "videoinfinity_ref.zarr"), arrays(work / "videoinfinity_2.zarr")
    report["videoinfinity_2_equals_reference"] = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
    report["videoinfinity_2_vs_reference_latents"] = {
        "max_abs_diff": float(np.abs(a[0] - b[0]).max()), "max_abs": float(np.abs(a[0]).max()),
        "note": "bf16: not bit-identical on CPU (oneDNN's bf16 matmul depends on the rows per call; see the "
                "module docstring); the exact check is videoinfinity_exact's float32 pair"}
    report["videoinfinity_exact"] = videoinfinity_exact(work)
    report["runs"] = results
    worst = [m["ratio"] for r in results.values() for m in r["memory"]]
    report["memory_within_10pct"] = all(0.9 <= x <= 1.1 for x in worst)
    report["machine"]["load_after"] = os.getloadavg()
    report["machine"]["bench_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
