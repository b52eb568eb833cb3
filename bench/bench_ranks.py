"""Whole-process wall time of a DualParal job on 1, 2, 4 ... ranks, alternating, and where each rank's time goes.

    python bench/bench_ranks.py                                  # the README's main job (demo-cpu), ranks 1,2 x 2 rounds
    python bench/bench_ranks.py --ranks 1,2,4 --rounds 1 --frames 301 --set strategy.feature_cache=true

Each round runs ``hpcvideo generate PRESET --ranks N`` once per N (the order alternates between rounds, so a
change of the machine's load hits every N alike), as a user would (a fresh process, mpiexec for N > 1),
into a fresh store. Prints one JSON object: per run the whole-process wall seconds, the 1-minute load
average before and after, the CPU seconds (user, system) of the command and all its processes, and from
the store's attrs the phase timings of rank 0 and every rank's
``rank_stats`` (tick_s: its pipeline stage; wait_s: blocked on pipeline messages; decode_s/decode_blocks:
its share of the VAE decode; send_s; cpu_s: the rank's process CPU seconds; write_s: rank 0's store writes; sink_wait_s: blocked on the sink);
then per N the median wall and the speed-up over 1 rank (median 1-rank wall / median N-rank wall).
``OMP_NUM_THREADS`` is passed through as set (unset: each rank takes its share of the node's cores).

Measure on an idle machine: with Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``
= 1, recorded in the JSON) the ranks of one job share one session's CPU share, so while other sessions keep
the cores busy N ranks get no more CPU than 1 rank (measured on a 2-core machine at load 5-9: every rank's
phases ran about 2x slower than the 1-rank run's, and 2 ranks were slower than 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_once(preset: str, ranks: int, frames: int | None, overrides: list[str], tmp: str, index: int) -> dict:
    from hpcvideo.store import RunStore

    output = os.path.join(tmp, f"run{index}-{ranks}.zarr")
    command = [sys.executable, "-m", "hpcvideo.cli", "generate", preset, "--no-progress", "--output", output]
    if frames is not None:
        command += ["--frames", str(frames)]
    for item in overrides:
        command += ["--set", item]
    if ranks > 1:
        command += ["--ranks", str(ranks)]
    load_before = _load()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command, mpiexec and every rank (all waited for)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    attrs = RunStore.open(output).attrs
    return {"ranks": ranks, "wall_s": round(wall_s, 3), "load_before": load_before, "load_after": _load(),
            "cpu_user_s": round(after.ru_utime - usage.ru_utime, 2), "cpu_sys_s": round(after.ru_stime - usage.ru_stime, 2),
            "timings": attrs.get("timings"), "rank_stats": attrs.get("rank_stats")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo-cpu")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None, help="video.num_frames (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.ranks.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = counts if round_index % 2 == 0 else counts[::-1]
            for ranks in order:
                runs.append(run_once(args.preset, ranks, args.frames, args.overrides, tmp, round_index))
                print(json.dumps({"ranks": ranks, "wall_s": runs[-1]["wall_s"]}), file=sys.stderr, flush=True)
    medians = {n: statistics.median(r["wall_s"] for r in runs if r["ranks"] == n) for n in counts}
    summary = {str(n): {"median_wall_s": round(medians[n], 3),
                        "speedup_vs_1": round(medians[1] / medians[n], 3) if 1 in medians else None} for n in counts}
    try:
        autogroup = open("/proc/sys/kernel/sched_autogroup_enabled").read().strip()
    except OSError:
        autogroup = None
    print(json.dumps({"preset": args.preset, "sched_autogroup_enabled": autogroup, "frames": args.frames, "overrides": args.overrides,
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                      "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
