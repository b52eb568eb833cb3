"""Patch-parallel Wan VAE decode (hpcvideo.parallel_vae) on 1, 2 and 4 ranks: per-rank peak memory and time.

A Wan2.1 VAE with the real dims (z_dim 16, base_dim 96, dim_mult [1, 2, 4, 4], num_res_blocks 2, attn_scales [],
temperal_downsample [False, True, True]: hpcvideo.models.arch's wan2.1-t2v-1.3b config), random weights (the same
seed on every rank), decodes ``--latent-frames`` latent frames of a ``--height`` x ``--width`` video block by block
(one latent frame per block: the streamed decode with its feature cache) on each number of ranks: processes
started with torch.multiprocessing, one CPU thread each, torch.distributed over gloo (halo rows by isend/irecv).

Memory is the resident set's high-water mark (Linux ``VmHWM`` in /proc/self/status; tracemalloc does not see
torch's allocations): reset (``/proc/self/clear_refs`` 5) after the VAE and the latents are built, then read
after each block; ``decode_peak_mib`` per rank is that high-water mark minus the resident set before the decode
(the weights and the interpreter excluded), ``peak_rss_mib`` the whole process's. ``per_block_peak_mib``: the
high-water mark's growth up to each block (flat after the second block = memory independent of the length).
Rank 0 gathers the frames; ``max_abs_diff`` (float frames in [-1, 1]) and ``uint8_max_diff`` /
``uint8_values_differing`` compare them with the 1-rank decode.

    python bench/bench_vae_decode.py [--height 480 --width 832 --latent-frames 2 --ranks 1,2,4]

Prints one JSON object. With more ranks than CPU cores the times measure the machine, not the scheme.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status(field: str) -> float:
    """/proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rank_main(rank: int, world_size: int, args, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKLWan

    from hpcvideo.models.arch import ARCHS
    from hpcvideo.parallel_vae import PatchParallelDecoder, TorchComm

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous-{world_size}", rank=rank,
                                world_size=world_size)
    config = {k: v for k, v in ARCHS["wan2.1-t2v-1.3b"]["vae"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_config(config).eval()
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, 16, args.latent_frames, h, w, generator=torch.Generator().manual_seed(1))
    decoder = PatchParallelDecoder(vae, TorchComm(rank, world_size), latent_height=h)
    if world_size > 1:
        dist.barrier()
    reset = _reset_peak()
    rss_before = _status("VmRSS")
    per_block, times = [], []
    start = time.perf_counter()
    for i in range(args.latent_frames):
        t = time.perf_counter()
        band = decoder.decode_block(latents[:, :, i : i + 1])
        if world_size > 1:
            sizes = [(r1 - r0) * 8 for r0, r1 in decoder.bounds]
            whole = decoder.comm.gather_rows(band, sizes, dim=-2)
        else:
            whole = band
        times.append(round(time.perf_counter() - t, 3))
        per_block.append(round(_status("VmHWM") - rss_before, 1))
        if rank == 0:  # to disk: the gathered frames do not pile up in memory
            torch.save(whole, Path(out_dir, f"frames-{world_size}-{i}.pt"))
        del band, whole
    total = time.perf_counter() - start
    report = {"rank": rank, "band_rows": list(decoder.bounds[rank]), "decode_s": round(total, 3),
              "block_s": times, "decode_peak_mib": per_block[-1], "per_block_peak_mib": per_block,
              "peak_rss_mib": round(_status("VmHWM"), 1), "rss_before_decode_mib": round(rss_before, 1),
              "peak_reset": reset}
    Path(out_dir, f"report-{world_size}-{rank}.json").write_text(json.dumps(report))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--ranks", default="1,2,4")
    args = parser.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    if ranks[0] != 1:
        parser.error(f"--ranks {args.ranks}: must start with 1 (the reference decode)")
    if args.height % 8 or args.width % 8:
        parser.error(f"--height {args.height} / --width {args.width}: must be multiples of 8")
    import torch
    import torch.multiprocessing as mp

    from hpcvideo.decode import to_uint8

    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()},
              "vae": "wan2.1 (z_dim 16, base_dim 96, dim_mult [1,2,4,4], num_res_blocks 2), random weights",
              "height": args.height, "width": args.width, "latent_frames": args.latent_frames,
              "memory": "VmHWM (resident high-water mark) per process, reset after the model loads", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as out_dir:
        reference = None
        for n in ranks:
            start = time.perf_counter()
            mp.start_processes(_rank_main, args=(n, args, out_dir), nprocs=n, join=True, start_method="spawn")
            wall = time.perf_counter() - start
            per_rank = [json.loads(Path(out_dir, f"report-{n}-{r}.json").read_text()) for r in range(n)]
            frames = torch.cat([torch.load(Path(out_dir, f"frames-{n}-{i}.pt")) for i in range(args.latent_frames)], dim=2)
            run = {"wall_s_with_startup": round(wall, 2),
                   "decode_s_max_rank": max(r["decode_s"] for r in per_rank),
                   "decode_peak_mib_max_rank": max(r["decode_peak_mib"] for r in per_rank),
                   "frames_shape": list(frames.shape), "per_rank": per_rank}
            if reference is None:
                reference = frames
            else:
                a, b = to_uint8(frames).astype("int16"), to_uint8(reference).astype("int16")
                run["max_abs_diff_vs_1_rank"] = float((frames - reference).abs().max())
                run["uint8_max_diff_vs_1_rank"] = int(abs(a - b).max())
                run["uint8_values_differing"] = int((a != b).sum())
                run["uint8_values"] = int(a.size)
            result["runs"][str(n)] = run
    result["machine"]["load_avg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
