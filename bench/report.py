"""Benchmark report: runs the bench/ suite on the CPU presets and writes JSON + a markdown table + a plot.

    python bench/report.py                       # every part, full size (an hour or more on 2 cores)
    python bench/report.py --parts scaling --lengths 25,53,109,221 --time-budget-s 120
    python bench/report.py --quick               # small version of everything (~30 min on 2 busy cores)

Writes ``OUT/report.json``, ``OUT/report.md`` and ``OUT/scaling.png`` (OUT = ``--out``, default
bench/results) and prints the markdown.

Parts:
  scaling   wall time and peak memory against video length: ``hpcvideo generate PRESET --frames F`` (one
            rank, streaming into a temporary run store) vs a plain diffusers ``WanPipeline`` on the same
            tiny model, resolution, steps, guidance, prompt and thread count (whole video in one piece,
            decoded to numpy). Each run is a fresh process: wall seconds of the whole process (imports,
            model load, text encoding, denoising, decoding, writing) and its peak RSS (``ru_maxrss`` from
            ``wait4``, exact even for a killed process). A run past ``--time-budget-s`` or
            ``--memory-budget-mib`` (RSS polled every 50 ms) is killed and recorded as over budget; that
            side then stops (longer videos would be over budget too). Lengths must be 4 * (k * n - 1) + 1
            for a block of n latent frames (tiny-cpu: n = 7, so 25, 53, 109, 221, 445, 893, ...).
  generate  ``bench/bench_generate.py`` (single-rank main job: s/tick, store overhead, memory, parity).
  pipeline  ``bench/bench_pipeline.py`` (multi-rank pipeline: speed-up, memory, bytes, bubbles).
  videoinfinity  ``bench/bench_videoinfinity.py`` (clip parallelism: bytes per step, sync overhead), if present.

Timings on a shared machine are noisy: the report records the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADLINE_RE = re.compile(r"(speedup|ratio|fraction|growth|equal|identical|seconds_per_tick|peak_rss|overhead|flat)")
SUITES = ("generate", "pipeline", "videoinfinity")  # bench/bench_<name>.py, each printing one JSON object


# ----------------------------------------------------------------------------- child: plain diffusers
def _child_diffusers(preset: str, num_frames: int, overrides: list[str], threads: int) -> dict:
    import torch
    from diffusers import WanPipeline

    from hpcvideo.config import load_config
    from hpcvideo.models.family import resolve_model_path

    torch.set_num_threads(threads)
    cfg = load_config(preset, overrides, num_frames=num_frames, check_paths=False)
    s = cfg.sampling
    start = time.perf_counter()
    pipe = WanPipeline.from_pretrained(resolve_model_path(cfg), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=s.prompts[0].prompt, negative_prompt=s.negative_prompt, height=cfg.video.height,
                  width=cfg.video.width, num_frames=num_frames, num_inference_steps=s.num_inference_steps,
                  guidance_scale=s.guidance_scale, max_sequence_length=s.max_sequence_length,
                  generator=torch.Generator().manual_seed(s.seed), output_type="np").frames
    return {"frames_shape": list(frames.shape), "run_s": round(time.perf_counter() - start, 3)}


# ----------------------------------------------------------------------------- measuring a process
def measure(command: list[str], *, time_budget_s: float, memory_budget_mib: float) -> dict:
    """Run ``command``; wall seconds, peak RSS (MiB) and whether it ran over a budget (then killed)."""
    import psutil

    loadavg = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        watched, over = psutil.Process(proc.pid), None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss_mib = watched.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                rss_mib = 0.0
            if over is None and time.perf_counter() - start > time_budget_s:
                over = "time"
            elif over is None and rss_mib > memory_budget_mib:
                over = "memory"
            if over is not None:
                proc.kill()
            time.sleep(0.05)
        wall_s = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-2000:]
    result = {"wall_s": round(wall_s, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "over_budget": over,
              "loadavg_1min_before": loadavg, "output_tail": tail}
    if over is None and code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{tail}")
    return result


def bench_scaling(args) -> dict:
    from hpcvideo.config import load_config
    from hpcvideo.store import RunStore

    warnings.simplefilter("ignore", UserWarning)  # "prompt used by no block" for the short lengths

    lengths = [int(x) for x in args.lengths.split(",")]
    sets = [item for o in args.overrides for item in ("--set", o)]
    for f in lengths:  # validate every length before spending any time
        load_config(args.preset, args.overrides, num_frames=f, check_paths=False)
    budget = dict(time_budget_s=args.time_budget_s, memory_budget_mib=args.memory_budget_mib)
    runs = {"hpcvideo": [], "diffusers": []}
    stopped = {"hpcvideo": False, "diffusers": False}
    for f in lengths:
        for side in ("hpcvideo", "diffusers"):
            if stopped[side]:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                if side == "hpcvideo":
                    command = [sys.executable, "-m", "hpcvideo.cli", "generate", args.preset, "--output", f"{tmp}/run.zarr",
                               "--frames", str(f), "--no-progress", *sets, "--set", f"runtime.num_threads={args.threads}"]
                else:
                    command = [sys.executable, __file__, "--child", args.preset, "--frames", str(f),
                               "--threads", str(args.threads), *sets]
                r = {"num_frames": f, **measure(command, **budget)}
                tail = r.pop("output_tail")
                if r["over_budget"] is None and side == "hpcvideo":  # model load .. last frame written
                    r["run_s"] = RunStore.open(f"{tmp}/run.zarr").attrs["timings"]["total_s"]
                elif r["over_budget"] is None:
                    r["run_s"] = json.loads(tail.strip().splitlines()[-1])["run_s"]
            runs[side].append(r)
            stopped[side] = r["over_budget"] is not None
            print(f"scaling {side:9s} {f:5d} frames: {r}", file=sys.stderr, flush=True)
    cfg = load_config(args.preset, args.overrides, num_frames=lengths[0], check_paths=False)
    return {"preset": args.preset, "overrides": args.overrides, "threads": args.threads,
            "video": {"height": cfg.video.height, "width": cfg.video.width, "fps": cfg.video.fps},
            "steps": cfg.sampling.num_inference_steps, "block_latent_frames": cfg.strategy.block_latent_frames,
            "budget": budget, **runs}


def relative_paths(value, *, repo: Path = REPO, prefix: str = sys.prefix):
    """``value`` (a report: dicts, lists, strings, numbers) with no machine path left in it: the repository's
    own path is cut from every string (``/home/x/hpcvideo/.venv/bin/mpiexec`` -> ``.venv/bin/mpiexec``), then
    the Python environment's path becomes ``<python env>`` (a venv outside the repository)."""
    if isinstance(value, dict):
        return {k: relative_paths(v, repo=repo, prefix=prefix) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, repo=repo, prefix=prefix) for v in value]
    if isinstance(value, str):
        value = value.replace(f"{repo}{os.sep}", "").replace(str(repo), ".")
        return value.replace(f"{prefix}{os.sep}", f"<python env>{os.sep}") if prefix not in ("", os.sep) else value
    return value


def run_suite(script: str, extra: list[str]) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *extra], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr[-1500:]}"}
    out = result.stdout
    for start in [i for i in range(len(out)) if out[i] == "{" and (i == 0 or out[i - 1] == "\n")]:
        try:  # the JSON object the script prints last (lines before it may be progress text)
            return json.loads(out[start:])
        except ValueError:
            continue
    return {"error": f"no JSON object in the output: {out[-500:]}"}


# ----------------------------------------------------------------------------- report
def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float, bool)) and not isinstance(d, str):
        yield prefix, d


def headline(suite: dict) -> list[tuple[str, object]]:
    """The figures a reader looks for (speed-ups, ratios, fractions, memory growth, equality checks)."""
    return [(k, v) for k, v in _flatten(suite) if HEADLINE_RE.search(k.rsplit(".", 1)[-1]) and "goal" not in k]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}, {m['date']}; "
             f"1-min load average {m['loadavg_before']} before, {m['loadavg_after']} after.", ""]
    sc = report.get("scaling")
    if sc:
        v = sc["video"]
        lines += [f"Time and peak memory against length: `{sc['preset']}` {' '.join(sc['overrides'])} "
                  f"({v['height']}x{v['width']}, {sc['steps']} steps, {sc['threads']} threads), "
                  f"budget {sc['budget']['time_budget_s']:.0f} s / {sc['budget']['memory_budget_mib']:.0f} MiB per run.", "",
                  "Wall s: the whole process (interpreter start, imports, model load, text encoding, denoising, "
                  "decoding, writing); run s: model load to last frame (in-process timers); peak: `ru_maxrss`; "
                  "load avg: 1-minute load average before the hpcvideo / diffusers run.", "",
                  "| frames | hpcvideo wall s | run s | peak MiB | diffusers wall s | run s | peak MiB | load avg |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by = {side: {r["num_frames"]: r for r in sc[side]} for side in ("hpcvideo", "diffusers")}
        for f in sorted(set(by["hpcvideo"]) | set(by["diffusers"])):
            cells = []
            for side in ("hpcvideo", "diffusers"):
                r = by[side].get(f)
                if r is None:
                    cells += ["-", "-", "-"]
                elif r["over_budget"]:
                    cells += [f"over {r['over_budget']} budget", "-", f"{r['peak_rss_mib']:.0f}"]
                else:
                    cells += [f"{r['wall_s']:.1f}", f"{r['run_s']:.1f}", f"{r['peak_rss_mib']:.0f}"]
            loads = [by[side][f]["loadavg_1min_before"] for side in by if f in by[side]]
            lines.append(f"| {f} | " + " | ".join(cells) + f" | {'/'.join(f'{x:.1f}' for x in loads)} |")
        lines.append("")
    for name in SUITES:
        suite = report.get(name)
        if suite is None:
            continue
        lines += [f"`bench/bench_{name}.py {' '.join(report['suite_args'][name])}`:", ""]
        if "error" in suite:
            lines += [f"failed: {suite['error'][-300:]}", ""]
            continue
        lines += ["| figure | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in headline(suite)]
        lines.append("")
    return "\n".join(lines)


def plot(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for side, style in (("hpcvideo", "o-"), ("diffusers", "s--")):
        ok = [r for r in scaling[side] if not r["over_budget"]]
        over = [r for r in scaling[side] if r["over_budget"]]
        for ax, key in zip(axes, ("run_s", "peak_rss_mib")):
            line, = ax.plot([r["num_frames"] for r in ok], [r[key] for r in ok], style, label=side)
            for r in over:  # killed: plotted at the time / memory it had reached
                ax.plot(r["num_frames"], r["wall_s" if key == "run_s" else key], "x", color=line.get_color(), ms=10,
                        label=f"{side}: over {r['over_budget']} budget")
    budget, runs = scaling["budget"], scaling["hpcvideo"] + scaling["diffusers"]
    for ax, key, limit in ((axes[0], "wall_s", budget["time_budget_s"]), (axes[1], "peak_rss_mib", budget["memory_budget_mib"])):
        if max(r[key] for r in runs) > limit / 3:  # the budget line, where it does not squash the data
            ax.axhline(limit, color="grey", lw=0.8, ls=":", label="budget")
    axes[0].set(xlabel="frames", ylabel="s (model load to last frame)", title="time")
    axes[1].set(xlabel="frames", ylabel="peak RSS MiB", title="memory")
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{scaling['preset']} {' '.join(scaling['overrides'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="scaling," + ",".join(SUITES))
    parser.add_argument("--quick", action="store_true",
                        help="short version: lengths 25..445 frames at 64x64 with 4 steps, 300 s budget, "
                             "bench_generate parity only, bench_pipeline --quick --parts speedup, "
                             "bench_videoinfinity overhead with 2 steps")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--lengths", default=None, help="pixel frames, comma-separated (default 25,53,109,221,445,893)")
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                        help="config overrides for both sides of the scaling part (default: none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--time-budget-s", type=float, default=None, help="per scaling run (default 600, quick 300)")
    parser.add_argument("--memory-budget-mib", type=float, default=8192.0, help="per scaling run (peak RSS)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.child:
        print(json.dumps(_child_diffusers(args.child, args.frames, args.overrides or [], args.threads)))
        return
    if args.lengths is None:
        args.lengths = "25,53,109,221,445" if args.quick else "25,53,109,221,445,893"
    if args.time_budget_s is None:
        args.time_budget_s = 300.0 if args.quick else 600.0
    if args.overrides is None:
        args.overrides = ["video.height=64", "video.width=64", "sampling.num_inference_steps=4"] if args.quick else []
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"scaling", *SUITES}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; allowed: scaling, {', '.join(SUITES)}")
    import torch

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "loadavg_before": round(os.getloadavg()[0], 2)},
              "suite_args": {"generate": ["--parts", "parity", "--repeats", "1"] if args.quick else [],
                             "pipeline": ["--quick", "--parts", "speedup"] if args.quick else [],
                             "videoinfinity": ["--parts", "overhead", "--steps", "2"] if args.quick else []}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> str:  # after every part, so an interrupted report keeps what it measured
        report["machine"]["loadavg_after"] = round(os.getloadavg()[0], 2)
        (out / "report.json").write_text(json.dumps(relative_paths(report), indent=2))  # no machine paths
        text = markdown(relative_paths(report))
        (out / "report.md").write_text(text + "\n")
        return text

    if "scaling" in parts:
        report["scaling"] = bench_scaling(args)
        plot(report["scaling"], out / "scaling.png")
        save()
    for name in SUITES:
        if name in parts and (REPO / "bench" / f"bench_{name}.py").exists():
            report[name] = run_suite(f"bench_{name}.py", report["suite_args"][name])
            save()
    print(save())


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
