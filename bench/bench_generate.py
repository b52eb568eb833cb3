"""Benchmark of the single-rank main job; prints one JSON object.

    python bench/bench_generate.py                 # all parts, tiny-cpu preset (several minutes on 2 cores)
    python bench/bench_generate.py --parts memory  # one part

Parts:
  main    the tiny-cpu preset end to end: seconds per tick, fraction of wall time in the store
          (latents/frames writes + checkpoints; goal <= 2%), phase timings.
  memory  peak RSS of whole runs at 1x, 4x and 16x the frames (goal: flat), each in a fresh process.
  parity  a one-block run: hpcvideo's queue vs diffusers' WanPipeline on the same tiny model, same
          noise, denoising loop only (goal: time ratio <= 1.05), best of --repeats.
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


def _child_run(preset: str, output: str, overrides: list[str]) -> dict:
    from hpcvideo.config import load_config
    from hpcvideo.generate import generate
    from hpcvideo.store import RunStore

    cfg = load_config(preset, overrides, output=output)
    started = time.perf_counter()
    generate(cfg, progress=False)
    wall_s = time.perf_counter() - started
    store = RunStore.open(output)
    timings = store.attrs["timings"]
    return {
        "num_frames": cfg.video.num_frames,
        "num_blocks": cfg.num_blocks,
        "wall_s": round(wall_s, 3),
        "timings": timings,
        "store_fraction": round((timings["store_s"] + timings["checkpoint_s"]) / timings["total_s"], 5),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_in_child(preset: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--child", preset, "--output", f"{tmp}/run.zarr"]
        for item in overrides:
            command += ["--set", item]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"child failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def bench_main(preset: str) -> dict:
    return run_in_child(preset, [])


def bench_memory(preset: str, base_blocks: int, overrides: list[str]) -> dict:
    from hpcvideo.config import load_config

    cfg = load_config(preset, overrides, check_paths=False)
    n = cfg.strategy.block_latent_frames
    out = {}
    for factor in (1, 4, 16):
        num_frames = 4 * (factor * base_blocks * n - 1) + 1
        out[f"{factor}x"] = run_in_child(preset, [*overrides, f"video.num_frames={num_frames}"])
    rss = [out[k]["peak_rss_mib"] for k in ("1x", "4x", "16x")]
    out["rss_growth_16x_over_1x"] = round(rss[2] / rss[0] - 1, 4)
    return out


def bench_parity(repeats: int) -> dict:
    import torch
    from diffusers import WanPipeline

    from hpcvideo.config import load_config
    from hpcvideo.check import cache_folder
    from hpcvideo.models import encode_prompts, ensure_tiny_wan, load_wan
    from hpcvideo.noise import block_noise
    from hpcvideo.schedulers import make_scheduler
    from hpcvideo.strategies.dualparal.reference import DualParalReference

    n = 7
    cfg = load_config("tiny-cpu", [f"strategy.block_latent_frames={n}"], num_frames=4 * (n - 1) + 1, check_paths=False)
    path = ensure_tiny_wan(cache_folder())
    components = load_wan(path, device="cpu", dtype=torch.float32)
    s = cfg.sampling
    embeds, negative = encode_prompts(
        components, [s.prompts[0].prompt], negative_prompt=s.negative_prompt,
        max_sequence_length=s.max_sequence_length, device="cpu", dtype=torch.float32,
    )
    shape = dict(latent_channels=components.transformer.config.in_channels, latent_height=cfg.video.height // 8,
                 latent_width=cfg.video.width // 8)
    noise = block_noise(seed=0, block_index=0, block_latent_frames=n, context_latent_frames=2, **shape)

    def ours():
        template = make_scheduler(s.scheduler, scheduler_config=components.scheduler_config, flow_shift=s.flow_shift,
                                  num_inference_steps=s.num_inference_steps)
        executor = DualParalReference(
            transformer=components.transformer, scheduler_template=template, prompt_embeds=embeds,
            negative_prompt_embeds=negative, prompt_index_for_block=lambda j: 0, guidance_scale=s.guidance_scale,
            num_blocks=1, block_latent_frames=n, context_latent_frames=2, feature_cache=True,
            noise_fn=lambda j: noise.clone(),
        )
        while not executor.done:
            result = executor.run_tick()
        executor.close()
        return result[0][1]

    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def theirs():
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=negative, height=cfg.video.height,
                    width=cfg.video.width, num_frames=cfg.video.num_frames, num_inference_steps=s.num_inference_steps,
                    guidance_scale=s.guidance_scale, latents=noise.clone(), output_type="latent").frames

    times = {"hpcvideo_s": [], "diffusers_s": []}
    for _ in range(repeats):
        for key, fn in (("hpcvideo_s", ours), ("diffusers_s", theirs)):
            start = time.perf_counter()
            latents = fn()
            times[key].append(time.perf_counter() - start)
    same = bool(torch.equal(ours(), theirs()))
    best = {k: min(v) for k, v in times.items()}
    return {"num_frames": cfg.video.num_frames, "steps": s.num_inference_steps, "bit_identical": same,
            **{k: round(v, 4) for k, v in best.items()}, "ratio": round(best["hpcvideo_s"] / best["diffusers_s"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="main,memory,parity")
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--memory-preset", default="tiny-test")
    parser.add_argument("--memory-base-blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(_child_run(args.child, args.output, args.overrides)))
        return
    import platform

    import torch

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    parts = set(args.parts.split(","))
    if "main" in parts:
        report["main"] = bench_main(args.preset)
    if "memory" in parts:
        report["memory"] = bench_memory(args.memory_preset, args.memory_base_blocks, ["video.height=64", "video.width=64"])
    if "parity" in parts:
        report["parity"] = bench_parity(args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
