"""Benchmark of Video-Infinity clip parallelism; prints one JSON object.

    python bench/bench_videoinfinity.py                  # both parts (a few minutes on 2 cores)
    python bench/bench_videoinfinity.py --parts bytes    # one part

Parts (each configuration is a fresh ``mpiexec -n N`` job of this script in ``--worker`` mode, which
times denoising steps of the patched model on random latents: one step = one forward of the CFG pair,
batched [uncond, cond] for UNet3D, two forwards for Wan, as the run loop does):

  bytes     payload bytes received per rank per step (max over ranks; the counters of ClipComm), for
            2/4/8 ranks at a fixed clip length and for clips of 4/8/16 frames at 4 ranks. Goal: flat in
            the number of ranks and in the video's length (only halos of ``local_frames`` and 4 frames,
            the global set and per-frame GroupNorm sums move).
  overhead  seconds per step, 2 ranks x 1 thread, clips of 16 frames, for UNet3D with 32x32 latents
            (256x256 px), the tiny Wan (hidden 24: messages dominate) and "wan-wide" (a random 4-layer
            Wan of hidden 512, 8x8 tokens per frame), in three modes:
              on        the real run;
              stand-in  ``ClipComm(sync="stand-in")``: no message is sent, every halo / global set /
                        sum is replaced by a local tensor of the same shape, so the compute is the
                        same as "on" -> ``sync_overhead`` = on / stand-in - 1 is the cost of the
                        synchronisation itself (transfers + waiting for the peer). Goal: <= 10% (the
                        paper measured +25-29% on GPUs);
              off       ``ClipComm(sync=False)``: every rank denoises its clip as a video of its own
                        (no halo or global frames at all) -> ``overhead_vs_independent_clips`` =
                        on / off - 1 also counts the algorithm's extra compute on halo and global
                        frames (longer temporal convolutions, attention over more keys).

The tiny random-weight models are used (CPU, gloo over loopback); the figures are about the
communication pattern, not about GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import torch

    from hpcvideo.check import cache_folder
    from hpcvideo.models import ensure_tiny_wan, load_wan
    from hpcvideo.models.unet3d import ensure_tiny_unet3d, load_unet3d
    from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env
    from hpcvideo.runtime.control import gather_object
    from hpcvideo.strategies.videoinfinity.clips import ClipComm, ClipLayout, DualScope
    from hpcvideo.strategies.videoinfinity.reference import patched

    env = init_rank_env(device="cpu", timeout_s=300)
    with abort_on_failure(env), torch.no_grad():
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        if args.family == "unet3d":
            model = load_unet3d(ensure_tiny_unet3d(cache_folder()), parts=("unet",)).unet
            latents = torch.randn(2, 4, args.clip, args.latent, args.latent, generator=g)
            text = torch.randn(2, 77, 32, generator=g)
            forwards = [(latents, text)]
        else:
            if args.family == "wan-wide":  # transformer-dominated: hidden 512 (Wan2.1-1.3B: 1536), random weights
                from diffusers import WanTransformer3DModel

                torch.manual_seed(0)
                model = WanTransformer3DModel(
                    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=32, ffn_dim=2048, num_layers=4, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024).eval()
            else:
                model = load_wan(ensure_tiny_wan(cache_folder()), parts=("transformer",)).transformer
            latents = torch.randn(1, 4, args.clip, args.latent, args.latent, generator=g)
            forwards = [(latents, torch.randn(1, 16, 32, generator=g)), (latents, torch.randn(1, 16, 32, generator=g))]
        layout = ClipLayout(rank=env.rank, world_size=env.world_size, clip_frames=args.clip)
        comm = ClipComm(layout, sync={"on": True, "off": False, "stand-in": "stand-in"}[args.sync])
        scope = DualScope(local_frames=args.local, global_frames=args.globals_, switch_timestep=500.0)
        times = []
        with patched(model, "wan" if args.family == "wan-wide" else args.family, comm=comm, scope=scope):
            for step in range(args.warmup + args.steps):
                t = torch.tensor([900.0 if step % 2 else 100.0])
                if env.world_size > 1:
                    torch.distributed.barrier()  # steps start together: the time is the slowest rank's
                start = time.perf_counter()
                for sample, text in forwards:
                    model(sample, t, text, return_dict=False)
                if step == args.warmup - 1:
                    comm.bytes_received = comm.bytes_sent = 0
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
        stats = gather_object(env, {"received": comm.bytes_received / args.steps, "step_s": sorted(times)[len(times) // 2]})
        if env.is_main:
            print("RESULT " + json.dumps({
                "bytes_received_per_step": max(s["received"] for s in stats),
                "step_s": max(s["step_s"] for s in stats),
            }), flush=True)
    shutdown_rank_env(env)


def launch(num_ranks: int, *options: str) -> dict:
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    command = [mpiexec, "-n", str(num_ranks), sys.executable, __file__, "--worker", *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def part_bytes() -> dict:
    out = {}
    for family, latent in (("unet3d", 8), ("wan", 4)):
        common = ("--family", family, "--latent", str(latent), "--steps", "2", "--warmup", "1")
        by_ranks = {n: launch(n, *common, "--clip", "8")["bytes_received_per_step"] for n in (2, 4, 8)}
        by_clip = {c: launch(4, *common, "--clip", str(c))["bytes_received_per_step"] for c in (4, 8, 16)}
        out[family] = {"by_ranks_clip8": by_ranks, "by_clip_frames_4ranks": by_clip}
    return out


def part_overhead(steps: int, families) -> dict:
    out = {}
    for family, latent in (("unet3d", 32), ("wan", 16), ("wan-wide", 16)):
        if family not in families:
            continue
        common = ("--family", family, "--latent", str(latent), "--clip", "16", "--steps", str(steps), "--warmup", "2")
        on = launch(2, *common)
        stand_in = launch(2, *common, "--sync", "stand-in")
        off = launch(2, *common, "--sync", "off")
        out[family] = {"sync_step_s": round(on["step_s"], 5), "stand_in_step_s": round(stand_in["step_s"], 5),
                       "no_sync_step_s": round(off["step_s"], 5),
                       "sync_overhead": round(on["step_s"] / stand_in["step_s"] - 1, 4),
                       "overhead_vs_independent_clips": round(on["step_s"] / off["step_s"] - 1, 4),
                       "bytes_received_per_step": on["bytes_received_per_step"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="bytes,overhead")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (overhead)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="unet3d", choices=("unet3d", "wan", "wan-wide"))
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--clip", type=int, default=8)
    parser.add_argument("--local", type=int, default=8)
    parser.add_argument("--globals", dest="globals_", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sync", default="on", choices=("on", "stand-in", "off"))
    parser.add_argument("--families", default="unet3d,wan,wan-wide", help="overhead: which models")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    report = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
              "settings": {"local_frames": args.local, "global_frames": args.globals_}}
    parts = args.parts.split(",")
    if "bytes" in parts:
        report["bytes"] = part_bytes()
    if "overhead" in parts:
        report["overhead"] = part_overhead(args.steps, args.families.split(","))
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
