"""Benchmark of the multi-rank DualParal pipeline (one layer-split stage per MPI rank); prints one JSON object.

    python bench/bench_pipeline.py                         # all parts (about 8-11 minutes on 2 cores; speedup alone ~5)
    python bench/bench_pipeline.py --quick                 # small version of every part (1-2 minutes)
    python bench/bench_pipeline.py --parts speedup,bytes   # some parts

Every run is a real CLI run, ``mpiexec -n N python -m hpcvideo.cli generate tiny-test --output TMP/run.zarr
--set runtime.num_threads=1 --set ...`` (N = 1: no mpiexec), into a temporary store that is removed
afterwards; the numbers come from the store's attrs ``timings`` (rank 0's phase wall times) and
``rank_stats`` (per rank: layers, bytes_sent/received, wait_s = seconds blocked on messages, tick_s =
seconds inside run_tick, ticks, peak_rss_mib).

Parts:
  speedup  the same video on 1 and 2 ranks: speed-up of the denoising loop (timings.denoise_s) and of
           the whole run (total_s and the CLI's wall time), best of --repeats; the latents of both stores
           must be exactly equal; per-rank wait fraction wait_s / tick_s. Goal: >= 1.8x.
           Two workloads: speedup_tiny (the built-in tiny model: hidden 24, so per-item work every stage
           repeats and rank 0's VAE-decode thread weigh as much as the layers) and speedup_wide (the tiny
           model folder with a wider transformer, hidden 512 / ffn 2048, built into a temporary folder and
           passed as --set model.path=...: transformer-dominated, as Wan2.1-1.3B with 30 blocks of hidden
           1536 is). Each is reported next to the schedule's ceiling (overlap_model: equal stages, no other cost)
           and the earlier per-tick-barrier ceiling N * sum(k) / sum(k + N - 1), k = items at a tick.
  memory   peak RSS per rank on 2 ranks at 1x, 4x, 16x the video length; growth 16x/1x - 1 (goal <= 5%).
  bytes    bytes sent per rank vs the message formula of strategies/dualparal/pipeline.py, replayed
           over every tick of queue.tick_plan (must be equal); checked on every multi-rank run of this
           invocation, plus a run without CFG; steady-state bytes per tick per rank.
  bubbles  wait_s / tick_s per rank for N = 2, 3, 4 on one workload, next to DualParal's bubble ratio
           (N^2 - N - 1) / (N^2 - N - 1 + T * B) and a per-tick fill/drain model of this pipeline.

CPU caveat: N ranks x 1 thread + rank 0's background VAE-decode thread share the machine's cores;
with more threads than cores, "waiting for a message" includes waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = "tiny-test"

# The wide transformer of speedup_wide: the tiny model's layout (patch (1, 2, 2), 4 layers, in/out channels 4,
# text_dim 32 = the tiny text encoder's d_model, freq_dim 32) with hidden 8 x 64 = 512 and ffn 2048, so that
# the layers dominate (>= ~90% of 1-rank CPU time) as in real Wan models.
WIDE_TRANSFORMER = {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048}


def build_wide_model(root: Path, *, num_attention_heads: int, attention_head_dim: int, ffn_dim: int) -> Path:
    """A copy of the tiny model folder (VAE, text encoder, tokenizer, scheduler, model_index.json) under
    ``root`` whose ``transformer/`` is a wider random-weight WanTransformer3DModel (seed 0)."""
    import torch
    from diffusers import WanTransformer3DModel

    from hpcvideo.check import cache_folder
    from hpcvideo.models import ensure_tiny_wan

    folder = root / "wide-wan"
    shutil.copytree(ensure_tiny_wan(cache_folder()), folder)
    shutil.rmtree(folder / "transformer")
    tiny = json.loads((Path(ensure_tiny_wan(cache_folder())) / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=tuple(tiny["patch_size"]), num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim, in_channels=tiny["in_channels"], out_channels=tiny["out_channels"],
        text_dim=tiny["text_dim"], freq_dim=tiny["freq_dim"], ffn_dim=ffn_dim, num_layers=tiny["num_layers"],
        cross_attn_norm=tiny["cross_attn_norm"], qk_norm=tiny["qk_norm"], rope_max_seq_len=tiny["rope_max_seq_len"])
    transformer.save_pretrained(folder / "transformer")
    return folder


def model_folder(w: dict) -> Path:
    """The model folder a workload runs (its model.path override, else the built-in tiny model)."""
    from hpcvideo.check import cache_folder
    from hpcvideo.models import ensure_tiny_wan

    path = w.get("model.path", "tiny")
    return Path(ensure_tiny_wan(cache_folder())) if path == "tiny" else Path(path)


def transformer_config(w: dict) -> dict:
    return json.loads((model_folder(w) / "transformer" / "config.json").read_text())


# ----------------------------------------------------------------------------- workloads
def workload(*, size: int, block: int, blocks: int, steps: int, context: int = 1, guidance: float | None = None,
             checkpoint_every_ticks: int = 1000, model_path: Path | None = None) -> dict:
    """Overrides of the tiny-test preset for a video of ``blocks`` blocks of ``block`` latent frames."""
    latent_frames = blocks * block
    num_frames = 4 * (latent_frames - 1) + 1
    w = {"video.height": size, "video.width": size, "strategy.block_latent_frames": block,
         "strategy.context_latent_frames": context, "video.num_frames": num_frames,
         "sampling.num_inference_steps": steps, "store.checkpoint_every_ticks": checkpoint_every_ticks}
    if guidance is not None:
        w["sampling.guidance_scale"] = guidance
    if model_path is not None:
        w["model.path"] = str(model_path)
    return w


def describe(w: dict) -> dict:
    size, n = w["video.height"], w["strategy.block_latent_frames"]
    latent_frames = (w["video.num_frames"] - 1) // 4 + 1
    t = transformer_config(w)
    model = {"path": "tiny" if w.get("model.path", "tiny") == "tiny" else "<temporary folder: tiny + wide transformer>",
             "layers": t["num_layers"], "hidden_dim": t["num_attention_heads"] * t["attention_head_dim"],
             "heads": t["num_attention_heads"], "ffn_dim": t["ffn_dim"]}
    overrides = [f"{k}={v}" if k != "model.path" else f"{k}=<wide model folder>" for k, v in w.items()]
    return {"preset": PRESET, "model": model, "overrides": overrides, "pixels": f"{size}x{size}",
            "num_frames": w["video.num_frames"], "blocks": latent_frames // n, "block_latent_frames": n,
            "steps": w["sampling.num_inference_steps"],
            "tokens_per_window": (w["strategy.context_latent_frames"] + n) * (size // 16) ** 2}


# ----------------------------------------------------------------------------- running
def find_mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else (shutil.which("mpiexec") or "mpiexec")


def run_cli(ranks: int, w: dict, *, keep: Path | None = None) -> dict:
    """One CLI run on ``ranks`` ranks into a temporary store. Returns the store's attrs digest (and,
    with ``keep``, leaves the store at ``keep``)."""
    from hpcvideo.store import RunStore

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        out = keep if keep is not None else tmp / "run.zarr"
        command = [sys.executable, "-m", "hpcvideo.cli", "generate", PRESET, "--output", str(out), "--no-progress",
                   "--set", "runtime.num_threads=1"]
        for key, value in w.items():
            command += ["--set", f"{key}={value}"]
        if ranks > 1:
            command = [find_mpiexec(), "-n", str(ranks), *command]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
        wall_s = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        attrs = RunStore.open(out).attrs
        return {"ranks": ranks, "cli_wall_s": round(wall_s, 3), "loadavg_1min_before": round(load_before, 2),
                "timings": attrs["timings"], "rank_stats": attrs.get("rank_stats", []), "store": str(out)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_fractions(run: dict) -> list[float]:
    return [round(r["wait_s"] / r["tick_s"], 4) if r["tick_s"] else 0.0 for r in run["rank_stats"]]


def slim(run: dict) -> dict:
    """What a run contributes to the report."""
    t = run["timings"]
    return {"ranks": run["ranks"], "denoise_s": t["denoise_s"], "total_s": t["total_s"], "cli_wall_s": run["cli_wall_s"],
            "decode_s": t["decode_s"], "store_wait_s": t["store_s"], "encode_s": t["encode_s"], "ticks": t["ticks"],
            "seconds_per_tick": t["seconds_per_tick"], "loadavg_1min_before": run["loadavg_1min_before"],
            "wait_fraction_per_rank": wait_fractions(run),
            "ranks_stats": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                            for r in run["rank_stats"]]}


# ----------------------------------------------------------------------------- message formula
def predicted_bytes(w: dict, ranks: int, *, hidden_dim: int, latent_channels: int, bytes_per_element: int = 4) -> dict:
    """Bytes each rank sends over the whole run, and per tick, from the pipeline docstring's formula,
    replaying queue.tick_plan for every tick."""
    from hpcvideo.strategies.dualparal.queue import num_ticks, tick_plan

    n, c = w["strategy.block_latent_frames"], w["strategy.context_latent_frames"]
    h = w["video.height"] // 8
    wd = w["video.width"] // 8
    tokens_per_frame = (h // 2) * (wd // 2)
    latent_frames = (w["video.num_frames"] - 1) // 4 + 1
    B, T = latent_frames // n, w["sampling.num_inference_steps"]
    guidance = w.get("sampling.guidance_scale", 5.0)  # tiny-test: 5.0
    branches = 2 if guidance > 1.0 else 1
    per_tick = []  # [tick][rank]
    for tick in range(num_ticks(B, T)):
        plan = tick_plan(tick, num_blocks=B, num_inference_steps=T, context_latent_frames=c, feature_cache=True)
        hidden = sum(branches * ((c if work.context_from is not None else 0) + n) * tokens_per_frame
                     * hidden_dim * bytes_per_element for work in plan)
        feedback = len(plan) * latent_channels * n * h * wd * bytes_per_element
        row = [0] * ranks
        if ranks > 1:
            for r in range(ranks - 1):
                row[r] = hidden
            row[ranks - 1] = feedback
        per_tick.append(row)
    totals = [sum(row[r] for row in per_tick) for r in range(ranks)]
    # steady state: the most blocks in flight (min(B, T)) and none of them is block 0 (so all have context)
    full = [row for tick, row in enumerate(per_tick)
            if len(tick_plan(tick, num_blocks=B, num_inference_steps=T, context_latent_frames=c, feature_cache=True))
            == min(B, T) and tick >= T]
    return {"totals": totals, "steady_per_tick": full[0] if full else per_tick[len(per_tick) // 2],
            "steady_state_ticks": len(full), "ticks": len(per_tick), "branches": branches,
            "window_tokens": {"with_context": (c + n) * tokens_per_frame, "first_block": n * tokens_per_frame}}


def model_dims(w: dict) -> tuple[int, int]:
    config = transformer_config(w)
    return config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"]


def check_bytes(w: dict, run: dict) -> dict:
    hidden_dim, channels = model_dims(w)
    ranks = run["ranks"]
    p = predicted_bytes(w, ranks, hidden_dim=hidden_dim, latent_channels=channels)
    measured = [r["bytes_sent"] for r in sorted(run["rank_stats"], key=lambda r: r["rank"])]
    ticks = run["timings"]["ticks"]
    return {"ranks": ranks, "workload": describe(w), "cfg_branches": p["branches"],
            "window_tokens": p["window_tokens"], "predicted_bytes_sent": p["totals"], "measured_bytes_sent": measured,
            "equal": measured == p["totals"],
            "measured_mean_bytes_per_tick": [round(m / ticks, 1) for m in measured],
            "formula_steady_state_bytes_per_tick": p["steady_per_tick"],
            "steady_state_ticks": p["steady_state_ticks"], "ticks": p["ticks"]}


# ----------------------------------------------------------------------------- parts
def item_costs_ms(w: dict, repeats: int = 30) -> dict:
    """In-process, 1 thread: milliseconds per (block, branch) item of the workload's window: the part
    every stage repeats (block_inputs: condition embedding + rotary tables) vs all transformer layers."""
    import torch

    from hpcvideo.models import load_wan_transformer_stage
    from hpcvideo.strategies.dualparal import forward as wan_forward

    torch.set_num_threads(1)
    layers = range(0, transformer_config(w)["num_layers"])
    transformer = load_wan_transformer_stage(model_folder(w), layers)
    n, c, size = w["strategy.block_latent_frames"], w["strategy.context_latent_frames"], w["video.height"]
    shape = (1, transformer.config.in_channels, c + n, size // 8, size // 8)
    timestep, prompt = torch.tensor([500.0]), torch.randn(1, 512, transformer.config.text_dim)

    def best_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(min(times) * 1000, 3)

    with torch.no_grad():
        inputs = wan_forward.block_inputs(transformer, shape, timestep, prompt, extra_key_frames=c)
        hidden = wan_forward.patchify(transformer, torch.randn(shape))
        out = {"block_inputs_every_stage": best_ms(lambda: wan_forward.block_inputs(
                   transformer, shape, timestep, prompt, extra_key_frames=c)),
               "all_layers": best_ms(lambda: wan_forward.run_blocks(transformer, hidden, inputs, layers)),
               "patchify_first_stage": best_ms(lambda: wan_forward.patchify(transformer, torch.randn(shape))),
               "head_last_stage": best_ms(lambda: wan_forward.head(transformer, hidden, inputs))}
    return out


def overlap_model(B: int, T: int, branches: int, N: int, *, checkpoint_every_ticks: int | None = None) -> dict:
    """Schedule of this pipeline with equal stages (one item-stage = 1 time unit), replayed over
    queue.tick_plan: items (block, CFG branch) in plan order flow through N stages; stage 0 may start
    block j's item at tick t once the noise predictions of blocks j and j-1 at tick t-1 are back from
    stage N-1 (rank 0 applies a step when first needed, no per-tick barrier); a checkpoint tick
    waits for everything issued before it. Returns the makespan, the speed-up bound N * items / makespan
    and the idle fraction of each stage (1 - items / makespan)."""
    from hpcvideo.strategies.dualparal.queue import num_ticks, tick_plan

    finish = [0.0] * N  # finish time of the last item on each stage
    back = {}  # (tick, block) -> time its noise_pred is back on rank 0
    items = 0
    for t in range(num_ticks(B, T)):
        barrier = 0.0
        if checkpoint_every_ticks and t % checkpoint_every_ticks == 0:
            barrier = max(back.values(), default=0.0)
        for work in tick_plan(t, num_blocks=B, num_inference_steps=T, context_latent_frames=1, feature_cache=True):
            ready = max([barrier] + [back.get((t - 1, j), 0.0) for j in (work.block_index, work.block_index - 1)])
            for _ in range(branches):
                items += 1
                start = max(finish[0], ready)
                finish[0] = start + 1
                for r in range(1, N):
                    finish[r] = max(finish[r], finish[r - 1]) + 1
            back[(t, work.block_index)] = finish[N - 1]
    makespan = finish[N - 1]
    return {"items": items, "makespan": makespan, "ceiling": round(N * items / makespan, 4),
            "idle_fraction": round(1 - items / makespan, 4)}


def pipeline_ceiling(w: dict, ranks: int, costs_ms: dict | None = None) -> dict:
    """Upper bounds of the N-rank speed-up with equal stages and no other cost. ``overlapped``: this
    pipeline (overlap_model; stage 0 runs ahead into the next tick, a drain only at checkpoints);
    ``per_tick_sync``: the earlier schedule that waited for every noise_pred at the end of each tick
    (a tick of k items took k + N - 1 item-stage times instead of k * N: N * sum(k) / sum(k + N - 1)).
    With ``costs_ms`` (item_costs_ms), also the bound when every stage repeats block_inputs (E) and the
    layers (L) split evenly: ceiling * (E + P + L + H) / (N * (E + L / N + max(P, H))) (P patchify, H head)."""
    from hpcvideo.strategies.dualparal.queue import in_flight, num_ticks

    n = w["strategy.block_latent_frames"]
    B = ((w["video.num_frames"] - 1) // 4 + 1) // n
    T = w["sampling.num_inference_steps"]
    branches = 2 if w.get("sampling.guidance_scale", 5.0) > 1.0 else 1
    ks = [branches * len(in_flight(t, num_blocks=B, num_inference_steps=T)) for t in range(num_ticks(B, T))]
    N = ranks
    model = overlap_model(B, T, branches, N, checkpoint_every_ticks=w.get("store.checkpoint_every_ticks"))
    out = {"ranks": N, "ticks": len(ks), "cfg_branches": branches, "max_items_per_tick": max(ks),
           "ceiling": model["ceiling"], "overlapped_idle_fraction": model["idle_fraction"],
           "per_tick_sync_ceiling": round(N * sum(ks) / sum(k + N - 1 for k in ks), 4)}
    if costs_ms is not None:
        E, L = costs_ms["block_inputs_every_stage"], costs_ms["all_layers"]
        P, H = costs_ms["patchify_first_stage"], costs_ms["head_last_stage"]
        out["ceiling_with_repeated_block_inputs"] = round(
            model["ceiling"] * (E + P + L + H) / (N * (E + L / N + max(P, H))), 4)
    return out


def bench_speedup(w: dict, repeats: int, checks: list) -> dict:
    import numpy as np

    from hpcvideo.store import RunStore

    best = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_speedup_"))
    try:
        for i in range(repeats):
            for ranks in (1, 2):  # interleaved, so a burst of load elsewhere hits both
                keep = tmp / f"r{ranks}_{i}.zarr"
                run = run_cli(ranks, w, keep=keep)
                if ranks not in best or run["timings"]["denoise_s"] < best[ranks]["timings"]["denoise_s"]:
                    best[ranks] = run
        a, b = RunStore.open(best[1]["store"]), RunStore.open(best[2]["store"])
        L = a.num_latent_frames
        identical = bool(b.num_latent_frames == L and np.array_equal(a.read_latents(0, L), b.read_latents(0, L)))
        frames_identical = bool(np.array_equal(a.read_frames(0, a.num_frames), b.read_frames(0, b.num_frames)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checks.append((w, best[2]))
    t1, t2 = best[1]["timings"], best[2]["timings"]
    costs = item_costs_ms(w)
    per_item_ms = sum(costs.values())
    return {
        "workload": describe(w), "repeats": repeats, "best_of": "denoise_s",
        "denoise_speedup": round(t1["denoise_s"] / t2["denoise_s"], 3),
        "pipeline_ceiling_2ranks": pipeline_ceiling(w, 2, costs),
        "total_speedup": round(t1["total_s"] / t2["total_s"], 3),
        "cli_wall_speedup": round(best[1]["cli_wall_s"] / best[2]["cli_wall_s"], 3),
        "goal_denoise_speedup": 1.8, "identical": identical, "frames_identical": frames_identical,
        "transformer_share_1rank": round(t1["denoise_s"] / (t1["denoise_s"] + t1["decode_s"]), 3),
        # of one item's forward (1 thread): the share of the layers, which the stages split
        "layers_share_of_item_forward": round(costs["all_layers"] / per_item_ms, 3),
        "wait_fraction_per_rank_2ranks": wait_fractions(best[2]),
        # compute per rank (tick_s - wait_s) over the 1-rank compute: 0.5 would be a perfect halving
        "busy_fraction_of_1rank_per_rank_2ranks": [round((r["tick_s"] - r["wait_s"]) / best[1]["rank_stats"][0]["tick_s"], 4)
                                                   for r in sorted(best[2]["rank_stats"], key=lambda r: r["rank"])],
        "item_costs_ms_1thread": costs,
        "runs": {"1": slim(best[1]), "2": slim(best[2])},
        "note": ("1 rank: the denoise thread and the decode thread have a core each; 2 ranks: two denoise threads + "
                 "rank 0's decode thread share 2 cores, so denoise_speedup <= 2 * D / (D + V) with D, V the CPU seconds "
                 "of denoising and decoding (see transformer_share_1rank); the rest is pipeline fill/drain per tick "
                 "and per-item work every stage repeats (block_inputs in item_costs_ms_1thread); "
                 "busy_fraction_of_1rank_per_rank_2ranks well above 0.5 means each rank computed slower than on a free "
                 "core (contention), not that it waited; pipeline_ceiling_2ranks.ceiling is the bound from per-tick "
                 "fill/drain alone (equal stages, no other cost)"),
    }


def bench_memory(w_base: dict, factors: list[int], checks: list) -> dict:
    n = w_base["strategy.block_latent_frames"]
    base_blocks = ((w_base["video.num_frames"] - 1) // 4 + 1) // n
    out = {"workload_1x": describe(w_base), "ranks": 2}
    rss = {}
    for f in factors:
        w = dict(w_base, **{"video.num_frames": 4 * (f * base_blocks * n - 1) + 1})
        run = run_cli(2, w)
        checks.append((w, run))
        stats = sorted(run["rank_stats"], key=lambda r: r["rank"])
        rss[f] = [r["peak_rss_mib"] for r in stats]
        out[f"{f}x"] = {"blocks": f * base_blocks, "num_frames": w["video.num_frames"], "peak_rss_mib_per_rank": rss[f],
                        "total_s": run["timings"]["total_s"]}
    lo, hi = min(factors), max(factors)
    out[f"growth_{hi}x_over_{lo}x_per_rank"] = [round(b / a - 1, 4) for a, b in zip(rss[lo], rss[hi])]
    out["goal_growth"] = 0.05
    return out


def bench_bytes(w: dict, checks: list, *, quick: bool = False) -> dict:
    # --quick: the CFG case is covered by the runs of the other parts (see also_checked_runs_of_other_parts)
    runs = {} if quick and checks else {"cfg_3ranks": check_bytes(w, run_cli(3, w))}
    w_nocfg = dict(w, **{"sampling.guidance_scale": 1.0})
    runs["no_cfg_2ranks"] = check_bytes(w_nocfg, run_cli(2, w_nocfg))
    others = [check_bytes(cw, run) for cw, run in checks]
    return {"runs": runs, "also_checked_runs_of_other_parts": [
                {"ranks": o["ranks"], "blocks": o["workload"]["blocks"], "equal": o["equal"]} for o in others],
            "all_equal": all(r["equal"] for r in [*runs.values(), *others]),
            "formula": ("rank r -> r+1 per tick: sum over (block, CFG branch) items of window_tokens * D * 4 B, "
                        "window_tokens = ((c if the block has context else 0) + n) * (h/2)(w/2); "
                        "rank N-1 -> 0: blocks_in_flight * C * n * h * w * 4 B (h, w latent = pixels/8)")}


def bench_bubbles(w: dict, rank_counts: list[int], checks: list) -> dict:
    from hpcvideo.strategies.dualparal.queue import num_ticks, tick_plan

    n = w["strategy.block_latent_frames"]
    B = ((w["video.num_frames"] - 1) // 4 + 1) // n
    T = w["sampling.num_inference_steps"]
    branches = 2 if w.get("sampling.guidance_scale", 5.0) > 1.0 else 1
    items = [branches * len(tick_plan(t, num_blocks=B, num_inference_steps=T, context_latent_frames=n,
                                      feature_cache=True)) for t in range(num_ticks(B, T))]
    out = {"workload": describe(w), "cpus": os.cpu_count()}
    for N in rank_counts:
        run = run_cli(N, w)
        checks.append((w, run))
        fractions = wait_fractions(run)
        ratio = (N * N - N - 1) / (N * N - N - 1 + T * B)
        # the earlier schedule (rank 0 stepped the schedulers after all forwards of a tick): k items
        # over N equal stages took k + N - 1 item-times, of which each stage idled N - 1
        tick_model = sum(N - 1 for _ in items) / sum(k + N - 1 for k in items)
        model = overlap_model(B, T, branches, N, checkpoint_every_ticks=w.get("store.checkpoint_every_ticks"))
        out[str(N)] = {"wait_fraction_per_rank": fractions, "mean_wait_fraction": round(sum(fractions) / N, 4),
                       "dualparal_bubble_ratio": round(ratio, 5), "overlapped_model_idle_fraction": model["idle_fraction"],
                       "per_tick_sync_model": round(tick_model, 4),
                       "denoise_s": run["timings"]["denoise_s"], "seconds_per_tick": run["timings"]["seconds_per_tick"],
                       "oversubscribed": N + 1 > (os.cpu_count() or 1),
                       "loadavg_1min_before": run["loadavg_1min_before"]}
    out["note"] = (f"{os.cpu_count()} CPU cores: N ranks (1 thread each) + rank 0's decode thread; with N + 1 > cores "
                   "the waits include CPU contention (a rank waiting for a core, or for a peer that waits for one), "
                   "not only pipeline bubbles. DualParal's ratio counts one forward per block-step over the whole "
                   "run; overlapped_model_idle_fraction replays this pipeline's schedule (stage 0 runs ahead into the next "
                   "tick as soon as the two noise predictions a block reads are back; a drain at each checkpoint); "
                   "per_tick_sync_model is the earlier schedule with a barrier at every tick.")
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="speedup,memory,bytes,bubbles")
    parser.add_argument("--quick", action="store_true", help="small workloads (1-2 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="speedup: best of this many (default 2, quick 1)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"speedup", "memory", "bytes", "bubbles"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; allowed: speedup, memory, bytes, bubbles")
    wide_root = Path(tempfile.mkdtemp(prefix="bench_pipeline_wide_model_")) if "speedup" in parts else None
    wide = build_wide_model(wide_root, **WIDE_TRANSFORMER) if wide_root is not None else None
    if args.quick:
        w_speed = workload(size=64, block=4, blocks=4, steps=8)
        w_wide = workload(size=64, block=4, blocks=4, steps=8, model_path=wide)
        w_mem, factors = workload(size=64, block=2, blocks=2, steps=4, checkpoint_every_ticks=8), [1, 4]
        w_bytes = workload(size=64, block=2, blocks=4, steps=3)
        w_bub, rank_counts = workload(size=64, block=2, blocks=4, steps=4), [2, 3]
    else:
        w_speed = workload(size=64, block=4, blocks=12, steps=16)
        w_wide = workload(size=64, block=4, blocks=12, steps=16, model_path=wide)
        w_mem, factors = workload(size=64, block=2, blocks=8, steps=4, checkpoint_every_ticks=8), [1, 4, 16]
        w_bytes = workload(size=64, block=2, blocks=6, steps=4)
        w_bub, rank_counts = workload(size=64, block=2, blocks=12, steps=8), [2, 3, 4]
    repeats = args.repeats or (1 if args.quick else 2)

    started = time.perf_counter()
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads_per_rank": 1, "mpiexec": find_mpiexec(),
                          "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
              "quick": args.quick, "parts": parts}
    checks: list = []
    try:
        if "speedup" in parts:
            report["speedup"] = {"speedup_tiny": bench_speedup(w_speed, repeats, checks),
                                 "speedup_wide": bench_speedup(w_wide, repeats, checks)}
        if "memory" in parts:
            report["memory"] = bench_memory(w_mem, factors, checks)
        if "bubbles" in parts:
            report["bubbles"] = bench_bubbles(w_bub, rank_counts, checks)
        if "bytes" in parts:
            report["bytes"] = bench_bytes(w_bytes, checks, quick=args.quick)  # also checks the wide runs' bytes
    finally:
        if wide_root is not None:
            shutil.rmtree(wide_root, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
