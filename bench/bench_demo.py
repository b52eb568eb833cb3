"""What the trained demo model (hpcvideo/demo/weights) shows; prints one JSON object.

    python bench/bench_demo.py                              # all parts (~10-20 minutes on 2 cores)
    python bench/bench_demo.py --parts motion               # one part
    python bench/bench_demo.py --grid docs/demo_grid.png    # also write the README's frame grid

Parts (each run is ``hpcvideo generate`` in a fresh process, into DIR = --out, default a temp dir):

  vae           the shipped VAE on 24 unseen clips: reconstruction L1 (pixels in [0, 1]), the centroid travel
                inside each 4-frame chunk (truth vs reconstruction: a VAE that drops it shows a still shape
                that jumps every 4 frames), and the latent distance between squares of each pair of colours.
  conditioning  the shipped transformer's flow-matching loss on 128 unseen clips with their captions vs with
                the opposite direction word, at sigma 0.95 / 0.85 / 0.7 / 0.5 (same noise): how much it
                uses the direction word.
  motion        native-window videos (21 frames, WanPipeline on the shipped folder) for every colour x
                direction at seeds 1 and 2: per video, the dominant shape colour and the travel of the
                prompted colour's centroid along the prompted direction and across it (pixels;
                hpcvideo.demo.data.colour_centroids); per colour, how many had the prompted colour and
                moved the prompted way.
  dualparal     the README's main job (configs/demo-cpu.yaml: 1,005 frames, DualParal, a zigzag prompt
                schedule) with the settings of DUALPARAL_RUNS (the preset's blocks of 2 + context 2 + feature
                cache; blocks of 4 + context 2 with and without the cache; independent blocks: no context, no
                cache, independent noise), each at --seeds: the seam metric (hpcvideo.metrics.seam_metric:
                ``normalised`` = seams over the other latent-frame boundaries, 1 = a seam moves the picture like
                any latent step of the model's own decoder; prompt-switch seams apart), and how often the red
                centroid moves the way the prompt of its block says.
  videoinfinity the same prompt schedule as a Video-Infinity run on 4 ranks (4 clips of 6 latent frames =
                93 frames; local 2, global 2) with the settings of VI_RUNS (the switch at raw t >= 800 with the
                query frame's own tokens lowered, as before strategy.switch_fraction; each change alone; the
                defaults; independent clips: ``strategy.sync_clips=false``), each at --vi-seeds: the seam
                metric at the clip boundaries (normalised as above) and the prompt following.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

FRAMES: int | None = None  # --frames: video.num_frames of the dualparal runs (None: the preset's)
VI_SETTINGS = ["strategy.name=videoinfinity", "strategy.clip_latent_frames=6", "strategy.local_frames=2",
               "strategy.global_frames=2", "store.checkpoint_every_ticks=4", "runtime.num_threads=1"]


def generate(out: Path, *options: str, ranks: int = 1) -> float:
    """Run ``hpcvideo generate demo-cpu`` into ``out``; returns the wall seconds."""
    command = [sys.executable, "-m", "hpcvideo.cli", "generate", "demo-cpu", "--output", str(out), "--no-progress"]
    if ranks > 1:
        command += ["--ranks", str(ranks)]
    for option in options:
        command += ["--set", option]
    if FRAMES and "strategy.name=videoinfinity" not in options:
        command += ["--frames", str(FRAMES)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def prompt_motion(store_path: Path, colour: str = "red") -> dict:
    """Per prompt segment of the store's schedule, does the ``colour`` centroid move the prompted way?"""
    from hpcvideo.demo import data
    from hpcvideo.store import RunStore

    store = RunStore.open(store_path)
    frames = store.read_frames(0, store.num_frames_ready())  # (F, H, W, 3) uint8
    centroids = data.colour_centroids(frames, colour)
    prompts = store.config["sampling"]["prompts"]
    prompts = [p for p in prompts if p["from_frame"] < len(frames)]  # those that reach the video
    starts = [p["from_frame"] for p in prompts] + [len(frames)]
    segments, right_way = [], 0
    for p, (a, b) in zip(prompts, zip(starts, starts[1:])):
        direction = next(d for d in data.DIRECTIONS if f" moving {d} " in f" {p['prompt']} ")
        seen = centroids[a:b]
        seen = seen[~np.isnan(seen).any(axis=1)]
        if len(seen) < 2:
            segments.append({"from_frame": a, "direction": direction, "travel_px": None})
            continue
        dx, dy = data.DIRECTIONS[direction]
        travel = float((seen[-1] - seen[0]) @ np.array([dx, dy]))
        segments.append({"from_frame": a, "direction": direction, "travel_px": round(travel, 1)})
        right_way += travel > 0
    visible = float(np.mean(~np.isnan(centroids).any(axis=1)))
    return {"segments_moving_the_prompted_way": f"{right_way}/{len(segments)}",
            "frames_with_the_colour_visible": round(visible, 3), "segments": segments}


def seams(store_path: Path) -> dict:
    """The seam metric (hpcvideo.metrics.seam_metric): ``normalised`` = block seams where the prompt stays the
    same over the video's other latent-frame boundaries (1 = a seam moves the picture like any other latent
    step of the model's own decoder), the prompt-switch seams apart, and the old ``overall`` (seams over every
    frame step: about 2 on this VAE even without any seam)."""
    from hpcvideo.metrics import seam_metric

    m = seam_metric(store_path)
    keep = ("kind", "num_frames", "num_seams", "normalised", "normalised_prompt_switch", "normalised_all",
            "latent_mean", "seam_mean", "within_mean", "overall", "worst_ratio")
    out = {k: (round(m[k], 4) if isinstance(m[k], float) else m[k]) for k in keep}
    out["num_prompt_switches"] = len(m["prompt_switches"])
    ratios = [r for r in m["ratio"] if r is not None]
    out["median_ratio"] = round(float(np.median(ratios)), 4) if ratios else None
    return out


def part_motion(seeds=(1, 2), min_travel_px: float = 6.0) -> dict:
    import torch
    from diffusers import WanPipeline

    from hpcvideo.demo import WEIGHTS_DIR, data, model

    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cases = [(s, c, d) for s in seeds for c in data.SHAPE_COLOURS for d in data.DIRECTIONS]
    out = []
    for seed, colour, direction in cases:
        prompt = data.caption_for(colour, "square", direction, "blue")
        video = np.asarray(pipe(prompt=prompt, negative_prompt="", height=64, width=64, num_frames=model.NUM_FRAMES,
                                num_inference_steps=12, guidance_scale=4.0,
                                max_sequence_length=model.MAX_SEQUENCE_LENGTH,
                                generator=torch.Generator().manual_seed(seed), output_type="np").frames[0])
        pixels = {c: int(data.colour_mask(video, c).sum()) for c in data.SHAPE_COLOURS}
        c = data.colour_centroids(video, colour)
        ok = ~np.isnan(c).any(axis=1)
        row = {"seed": seed, "colour": colour, "direction": direction, "frames_with_colour": int(ok.sum()),
               "dominant_colour": max(pixels, key=pixels.get)}
        if ok.sum() >= 2:
            dx, dy = data.DIRECTIONS[direction]
            first, last = c[ok][0], c[ok][-1]
            row["travel_px"] = round(float((last - first) @ np.array([dx, dy])), 1)
            row["across_px"] = round(float(abs((last - first) @ np.array([dy, dx]))), 1)
            row["prompted_way"] = row["travel_px"] > max(min_travel_px, row["across_px"])
        out.append(row)
    summary = {}
    for colour in data.SHAPE_COLOURS:
        rows = [r for r in out if r["colour"] == colour]
        summary[colour] = {"prompted_colour_dominant": f"{sum(r['dominant_colour'] == colour for r in rows)}/{len(rows)}",
                           "moving_the_prompted_way": f"{sum(r.get('prompted_way', False) for r in rows)}/{len(rows)}"}
    return {"criterion": f"centroid travel along the prompted direction > {min_travel_px} px and > travel across it",
            "per_colour": summary, "videos": out}


def part_vae(num_clips: int = 24, seed: int = 7) -> dict:
    """The shipped VAE on clips it never saw: reconstruction L1, the motion kept inside each 4-frame chunk
    (centroid travel from frame 4k+1 to 4k+4 along the clip's direction, red/yellow/white/orange clips),
    and the distance between the latents of same-place squares of each pair of colours."""
    import torch
    from diffusers import AutoencoderKLWan

    from hpcvideo.demo import WEIGHTS_DIR, data

    torch.set_num_threads(2)
    vae = AutoencoderKLWan.from_pretrained(WEIGHTS_DIR / "vae").eval()
    video, captions = data.make_batch(seed, range(num_clips))
    with torch.no_grad():
        recon = vae.decode(vae.encode(torch.from_numpy(video).float()).latent_dist.mean).sample.clamp(-1, 1)
    l1 = float((recon.numpy() - video).__abs__().mean() / 2)  # in [0, 1] pixel units
    recon = ((recon + 1) / 2).permute(0, 2, 3, 4, 1).numpy()
    truth = ((video + 1) / 2).transpose(0, 2, 3, 4, 1)
    within = {"truth": [], "recon": []}
    for b, caption in enumerate(captions):
        colour, direction = caption.split()[1], next(w for w in caption.split() if w in data.DIRECTIONS)
        if colour in ("green", "blue"):
            continue
        along = np.array(data.DIRECTIONS[direction])
        for key, frames in (("truth", truth[b]), ("recon", recon[b])):
            pos = data.colour_centroids(frames, colour) @ along
            within[key] += [pos[4 * k + 4] - pos[4 * k + 1] for k in range((len(pos) - 1) // 4)]
    latents = {}
    for colour in data.SHAPE_COLOURS:
        spec = data.ClipSpec(shape="square", colour=colour, direction="right", background="gray",
                             background_kind="plain", turning=False, radius_px=10, speed_px=0.0, start_xy=(32, 32),
                             angle0_rad=0, spin_rad=0, texture_seed=0)
        frames = data.render_clip(spec, num_frames=5, height=64, width=64)
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(frames.transpose(3, 0, 1, 2)[None] * 2 - 1).float()).latent_dist.mean
        latents[colour] = z[0, :, 1, 3:5, 3:5].mean(dim=(1, 2))  # the square's 2 x 2 latent pixels, chunk 1
    names = list(latents)
    distances = {f"{a}-{b}": round(float((latents[a] - latents[b]).norm()), 2)
                 for i, a in enumerate(names) for b in names[i + 1:]}
    return {"recon_l1": round(l1, 4),
            "within_chunk_travel_px": {k: round(float(np.nanmean(v)), 2) for k, v in within.items()},
            "shape_latent_distance": distances}


def part_conditioning(num_clips: int = 128, seed: int = 9) -> dict:
    """How much the shipped transformer uses the direction word: its flow-matching loss on clips it never
    saw, with the caption as is vs with the opposite direction word, at a few noise levels (same noise)."""
    import torch
    from diffusers import WanPipeline

    from hpcvideo.demo import WEIGHTS_DIR, data, model
    from hpcvideo.demo.train import encode_captions

    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    video, captions = data.make_batch(seed, range(num_clips))
    with torch.no_grad():
        x0 = pipe.vae.encode(torch.from_numpy(video).float()).latent_dist.mean
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    x0 = (x0 - mean) / std
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    swapped = [" ".join(opposite.get(w, w) for w in c.split()) for c in captions]
    embeds = encode_captions(pipe.tokenizer, pipe.text_encoder, captions + swapped)
    g = torch.Generator().manual_seed(0)
    out = {}
    for sigma in (0.95, 0.85, 0.7, 0.5):
        noise = torch.randn(x0.shape, generator=g)
        noisy = (1 - sigma) * x0 + sigma * noise
        losses = {}
        for name, caps in (("caption", captions), ("opposite_direction", swapped)):
            text = torch.stack([embeds[c] for c in caps])
            with torch.no_grad():
                pred = torch.cat([pipe.transformer(noisy[i:i + 32], timestep=torch.full((len(noisy[i:i + 32]),), sigma * 1000),
                                                   encoder_hidden_states=text[i:i + 32], return_dict=False)[0]
                                  for i in range(0, num_clips, 32)])
            losses[name] = float(((pred - (noise - x0)) ** 2).mean())
        out[f"sigma_{sigma}"] = {k: round(v, 4) for k, v in losses.items()} | {
            "increase": f"{100 * (losses['opposite_direction'] / losses['caption'] - 1):.1f}%"}
    return {"max_sequence_length": model.MAX_SEQUENCE_LENGTH, "flow_matching_loss": out}


DUALPARAL_RUNS = {  # name -> options (on top of configs/demo-cpu.yaml)
    "n2_c2_cache": ("strategy.block_latent_frames=2", "strategy.context_latent_frames=2", "strategy.feature_cache=true"),
    "n4_c2": ("strategy.block_latent_frames=4", "strategy.context_latent_frames=2", "strategy.feature_cache=false"),
    "n4_c2_cache": ("strategy.block_latent_frames=4", "strategy.context_latent_frames=2", "strategy.feature_cache=true"),
    # the baseline: blocks denoised on their own, each from its own noise
    "independent_blocks": ("strategy.block_latent_frames=4", "strategy.context_latent_frames=0",
                           "strategy.feature_cache=false", "strategy.noise_init=independent"),
}


def part_dualparal(out_dir: Path, seeds=(0, 1), runs=None) -> dict:
    """Each setting of DUALPARAL_RUNS (or ``runs``) at each seed: the seams and the prompt following; per
    setting the mean over the seeds of the normalised seam ratio."""
    report = {}
    for name in runs or DUALPARAL_RUNS:
        options = DUALPARAL_RUNS[name]
        per_seed = {}
        for seed in seeds:
            store = out_dir / f"dualparal_{name}_seed{seed}.zarr"
            wall = generate(store, *options, f"sampling.seed={seed}")
            per_seed[seed] = {"wall_s": round(wall, 1), "seams": seams(store), "motion": prompt_motion(store)}
        values = [r["seams"]["normalised"] for r in per_seed.values() if r["seams"]["normalised"] is not None]
        switch = [r["seams"]["normalised_prompt_switch"] for r in per_seed.values()
                  if r["seams"]["normalised_prompt_switch"] is not None]
        report[name] = {"options": list(options),
                        "normalised_mean": round(float(np.mean(values)), 4) if values else None,
                        "normalised_prompt_switch_mean": round(float(np.mean(switch)), 4) if switch else None,
                        "seeds": per_seed}
    return report


VI_RUNS = {  # name -> options (on top of VI_SETTINGS); 12 UniPC steps of the demo preset
    # before strategy.switch_fraction: raw t >= 800 = the first 6 of 12 shifted flow-matching steps global, the
    # global bias lowering the query frame's own tokens too
    "t800": ("strategy.switch_fraction=null", "strategy.switch_timestep=800", "strategy.exempt_own_frame=false"),
    "t800_exempt": ("strategy.switch_fraction=null", "strategy.switch_timestep=800", "strategy.exempt_own_frame=true"),
    "fraction_0.2": ("strategy.switch_fraction=0.2", "strategy.exempt_own_frame=false"),  # the first 2 of 12 steps
    "fraction_0.2_exempt": ("strategy.switch_fraction=0.2", "strategy.exempt_own_frame=true"),  # the defaults
    "independent_clips": ("strategy.sync_clips=false",),
}


def part_videoinfinity(out_dir: Path, seeds=(0, 1, 2), runs=None) -> dict:
    """Each setting of VI_RUNS (or ``runs``) at each seed on 4 ranks: the clip seams and the prompt following;
    per setting the mean over the seeds of the normalised seam ratio."""
    report = {}
    for name in runs or VI_RUNS:
        options = VI_RUNS[name]
        per_seed = {}
        for seed in seeds:
            store = out_dir / f"vi_{name}_seed{seed}.zarr"
            wall = generate(store, "video.num_frames=93", *VI_SETTINGS, *options, f"sampling.seed={seed}", ranks=4)
            per_seed[seed] = {"wall_s": round(wall, 1), "seams": seams(store), "motion": prompt_motion(store)}
        values = [r["seams"]["normalised"] for r in per_seed.values() if r["seams"]["normalised"] is not None]
        right = [int(r["motion"]["segments_moving_the_prompted_way"].split("/")[0]) for r in per_seed.values()]
        travel = [g["travel_px"] for r in per_seed.values() for g in r["motion"]["segments"] if g["travel_px"] is not None]
        report[name] = {"options": list(options),
                        "normalised_mean": round(float(np.mean(values)), 4) if values else None,
                        "normalised": [round(v, 4) for v in values],
                        "segments_moving_the_prompted_way": right,
                        # mean travel of the red centroid along the prompted direction per prompt segment (px)
                        "travel_px_mean": round(float(np.mean(travel)), 2) if travel else None, "seeds": per_seed}
    return report


def write_grid(store_path: Path, png: Path, *, columns: int = 8, rows: int = 3, scale: int = 2) -> None:
    """A PNG of rows x columns frames spread evenly over the video (frame index under none: see caption)."""
    from PIL import Image

    from hpcvideo.store import RunStore

    store = RunStore.open(store_path)
    count = store.num_frames_ready()
    picks = np.linspace(0, count - 1, rows * columns).round().astype(int)
    tiles = [store.read_frames(int(i), int(i) + 1)[0] for i in picks]
    h, w = tiles[0].shape[:2]
    pad = 2
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="vae,conditioning,motion,dualparal,videoinfinity")
    parser.add_argument("--out", default=None, help="folder for the run stores (default: a temporary one)")
    parser.add_argument("--grid", default=None, help="write a PNG grid of the main job's frames here")
    parser.add_argument("--seeds", default="0,1", help="sampling.seed values of the dualparal part")
    parser.add_argument("--runs", default=None, help=f"dualparal settings, comma-separated (default all: {','.join(DUALPARAL_RUNS)})")
    parser.add_argument("--frames", type=int, default=None, help="video.num_frames of the dualparal runs (default the preset's)")
    parser.add_argument("--vi-seeds", default="0,1,2", help="sampling.seed values of the videoinfinity part")
    parser.add_argument("--vi-runs", default=None, help=f"videoinfinity settings, comma-separated (default all: {','.join(VI_RUNS)})")
    args = parser.parse_args()
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_demo_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    report = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}, "out": str(out_dir)}
    if "vae" in parts:
        report["vae"] = part_vae()
    if "conditioning" in parts:
        report["conditioning"] = part_conditioning()
    if "motion" in parts:
        report["motion"] = part_motion()
    if "dualparal" in parts:
        global FRAMES
        FRAMES = args.frames
        report["dualparal"] = part_dualparal(out_dir, seeds=[int(x) for x in args.seeds.split(",")],
                                             runs=args.runs.split(",") if args.runs else None)
        if args.grid:
            write_grid(out_dir / "dualparal_n2_c2_cache_seed0.zarr", Path(args.grid))  # the preset's settings
    if "videoinfinity" in parts:
        report["videoinfinity"] = part_videoinfinity(out_dir, seeds=[int(x) for x in args.vi_seeds.split(",")],
                                                     runs=args.vi_runs.split(",") if args.vi_runs else None)
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
