"""Verified data: the cost of the checksums, status on a long store, and a chaos run of kills and damage.

    python bench/bench_integrity.py [--parts overhead,status,chaos] [--frames 61] [--repeats 2]
                                    [--blocks 100000] [--trials 12] [--seed 0]

Prints one JSON object. Parts:

* ``overhead``: ``hpcvideo generate demo-cpu --frames F`` in this process, timing what the integrity code
  adds (the crc32 of every block written, the done summary's updates, the read-back of done blocks on
  resume) against the run's wall time -> ``ratio``; and ``--repeats`` A/B runs alternating with the
  checksums and summary switched off (``ab_ratio`` = median on / median off; noisy under load).
* ``status``: a store of ``--blocks`` blocks (1 latent frame, 1x1 latents, 2x2 frames) whose every
  marker is written, built without a model; ``hpcvideo status --json`` wall seconds (goal < 1 s), next to
  a count of every marker chunk (what status did before the summary).
* ``chaos``: ``--trials`` tiny-test runs, each killed (SIGKILL at a random tick, or between a block's data
  and its marker) or finished, then damaged at random (bytes flipped in a latents or frames chunk, a
  chunk copied over another, a chunk deleted, a done marker flipped, a checkpoint pointer emptied, a
  checkpoint slot flipped), then ``verify``, then rerun with the same command. Counts: damage that
  verify found, reruns that exited 0, stores bit-identical to an uninterrupted run and intact after.

Every run is a forked child of this process (killable for real); this process never computes itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load() -> float:
    return os.getloadavg()[0]


def in_child(fn, *, fault: str | None = None, out: Path | None = None) -> int:
    """Run ``fn()`` (returns an exit code) in a forked child; its stdout/stderr to ``out``; returns the exit
    status (negative: the signal that killed it)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if out is not None:
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
            if fault:
                os.environ["HPCVIDEO_FAULT"] = fault
            else:
                os.environ.pop("HPCVIDEO_FAULT", None)
            code = fn()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def cli(*argv, fault=None, out=None) -> int:
    from hpcvideo.cli import main

    return in_child(lambda: main([str(a) for a in argv]), fault=fault, out=out)


# ---------------------------------------------------------------------------------------------- overhead

def part_overhead(frames: int, repeats: int, folder: Path) -> dict:
    from hpcvideo.store import integrity, run_store

    timers = {"crc_s": 0.0, "summary_s": 0.0, "verify_s": 0.0}
    results = folder / "overhead.json"

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
        return wrapper

    def one(on: bool, path: Path) -> int:
        from hpcvideo.cli import main

        if on:
            integrity.marker_value = timed(integrity.marker_value, "crc_s")
            integrity.IntegrityMixin._update_summary = timed(integrity.IntegrityMixin._update_summary, "summary_s")
            integrity.IntegrityMixin.verify_blocks = timed(integrity.IntegrityMixin.verify_blocks, "verify_s")
        else:  # markers without checksum (as stores made before them), no summary kept
            integrity.IntegrityMixin.has_checksums = lambda self, kind="latents": False
            integrity.IntegrityMixin._update_summary = lambda self, *a: None
        t = time.perf_counter()
        code = main(["generate", "demo-cpu", "--frames", str(frames), "--no-progress", "--output", str(path)])
        wall = time.perf_counter() - t
        if on:  # the resume's read-back of every done block, as a rerun of the finished store does
            store = run_store.RunStore.open(path)
            t = time.perf_counter()
            store.verify_blocks()
            timers["verify_s"] += time.perf_counter() - t
        results.write_text(json.dumps({"wall_s": wall, **timers}))
        return code

    runs = {"on": [], "off": []}
    detail = None
    for i in range(repeats):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            path = folder / f"demo-{mode}-{i}.zarr"
            code = in_child(lambda: one(mode == "on", path), out=folder / f"demo-{mode}-{i}.log")
            if code != 0:
                raise RuntimeError(f"demo run failed ({code}): {(folder / f'demo-{mode}-{i}.log').read_text()[-2000:]}")
            record = json.loads(results.read_text())
            runs[mode].append(record["wall_s"])
            if mode == "on" and detail is None:
                detail = record
            shutil.rmtree(path)
    added = detail["crc_s"] + detail["summary_s"] + detail["verify_s"]
    return {"preset": "demo-cpu", "frames": frames, "repeats": repeats, "wall_s_on": runs["on"], "wall_s_off": runs["off"],
            "ab_ratio": round(statistics.median(runs["on"]) / statistics.median(runs["off"]), 4),
            "first_on_run": {k: round(v, 4) for k, v in detail.items()},
            "ratio": round(added / detail["wall_s"], 5),
            "note": "ratio = (crc32 + summary updates + the read-back a resume does) / wall of one run, timed inside it"}


# ---------------------------------------------------------------------------------------------- status

def part_status(num_blocks: int, folder: Path, scan: bool) -> dict:
    path = folder / "long.zarr"
    report = folder / "status.json"

    def build() -> int:
        import numpy as np
        import zarr

        from hpcvideo.store import RunStore

        t = time.perf_counter()
        store = RunStore.create(path, config={"seed": 0}, num_latent_frames=num_blocks, block_latent_frames=1,
                                latent_channels=1, latent_height=1, latent_width=1, height=2, width=2, fps=16.0,
                                model_id="bench")
        # every block done: the markers written in bulk (checksums of the zero data), then the summary a run keeps
        zero_l = store._read_block("latents", 1)
        from hpcvideo.store.integrity import marker_value

        for kind in ("latents", "frames"):
            values = np.full(num_blocks, marker_value(zero_l if kind == "latents" else store._read_block("frames", 1)),
                             np.uint64)
            values[0] = marker_value(store._read_block(kind, 0))
            zarr.open_array(path / "done" / kind, mode="r+")[:] = values
        store._summary_group("r+").update_attributes({"summary": {  # what the run's marker writes left
            "num_blocks": num_blocks, "latents": {"count": num_blocks, "leading": num_blocks},
            "frames": {"count": num_blocks, "leading": num_blocks, "written": store.num_frames}}})
        report.write_text(json.dumps({"build_s": time.perf_counter() - t}))
        return 0

    assert in_child(build) == 0
    out = {"num_blocks": num_blocks, **json.loads(report.read_text())}
    t = time.perf_counter()
    code = cli("status", path, "--json", out=folder / "status.out")
    out["status_s"] = round(time.perf_counter() - t, 3)  # includes the fork, not an interpreter start
    status = json.loads((folder / "status.out").read_text())
    out.update(status_exit=code, complete=status["complete"], blocks_frames_done=status["blocks_frames_done"])
    if scan:
        def count() -> int:
            from hpcvideo.store import RunStore

            t = time.perf_counter()
            RunStore.open(path)._scan_summary()
            report.write_text(json.dumps({"scan_s": time.perf_counter() - t}))
            return 0

        in_child(count)
        out["scan_every_marker_s"] = round(json.loads(report.read_text())["scan_s"], 3)
    shutil.rmtree(path)
    return out


# ---------------------------------------------------------------------------------------------- chaos

def _flip(path: Path, rng: random.Random, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    start = rng.randrange(max(1, len(data) - count))
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunks(store: Path, name: str) -> list[Path]:
    folder = store / name / "c"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _done(store: Path, kind: str, block: int) -> bool:
    marker = store / "done" / kind / "c" / str(block)
    return marker.exists() and any(marker.read_bytes())


def _relied_on(store: Path, target: Path) -> bool:
    """True when a done block or the newest checkpoint relies on ``target`` (so verify must find its damage).
    Block j's frames lie in chunks j-1 (their first 3 frames, j > 0) and j (tiny-test: 8 frames a chunk)."""
    rel = target.relative_to(store).parts
    if rel[0] == "latents":
        return _done(store, "latents", int(rel[2]))
    if rel[0] == "frames":
        k = int(rel[2])
        return _done(store, "frames", k) or _done(store, "frames", k + 1)
    if rel[0] == "done":
        return True  # a flipped marker no longer matches (or marks a block done with a wrong checksum)
    if rel[0] == "state" and rel[-1] == "zarr.json":
        return True  # an unreadable pointer
    kind, slot = rel[1][:-2], int(rel[1][-1])
    try:
        return json.loads((store / "state" / kind / "zarr.json").read_text())["attributes"]["slot"] == slot
    except (OSError, ValueError, KeyError):
        return True


def damage(store: Path, rng: random.Random) -> tuple[str, str, bool] | None:
    """Apply one random damage to existing files of ``store``; (kind, what, relied on) or None if nothing fits."""
    options = []
    latents, frames = _chunks(store, "latents"), _chunks(store, "frames")
    markers = _chunks(store, "done/latents") + _chunks(store, "done/frames")
    if latents:
        options.append("flip_latents_chunk")
    if frames:
        options.append("flip_frames_chunk")
    if len(latents) >= 2:
        options.append("copy_chunk_over_another")
    if latents or frames:
        options.append("delete_chunk")
    if markers:
        options.append("flip_done_marker")
    pointers = [p for p in (store / "state").glob("*/zarr.json") if p.parent.name in ("resume", "extend")]
    if pointers:
        options.append("empty_pointer")
    slots = [p for p in (store / "state").glob("*_[01]/c/0")]
    if slots:
        options.append("flip_checkpoint_slot")
    if not options:
        return None
    kind = rng.choice(options)
    before = {}
    if kind == "flip_latents_chunk":
        target = rng.choice(latents)
        _flip(target, rng)
    elif kind == "flip_frames_chunk":
        target = rng.choice(frames)
        _flip(target, rng)
    elif kind == "copy_chunk_over_another":
        source, target = rng.sample(latents, 2)
        before["relied"] = _relied_on(store, target)
        shutil.copy(source, target)
    elif kind == "delete_chunk":
        target = rng.choice(latents + frames)
        before["relied"] = _relied_on(store, target)
        target.unlink()
    elif kind == "flip_done_marker":
        target = rng.choice(markers)
        _flip(target, rng, count=1)
    elif kind == "empty_pointer":
        target = rng.choice(pointers)
        target.write_text("")
    else:
        target = rng.choice(slots)
        _flip(target, rng)
    relied = before["relied"] if "relied" in before else _relied_on(store, target)
    return kind, str(target.relative_to(store)), relied


def arrays_digest(path: Path, out: Path) -> int:
    def digest() -> int:
        from hpcvideo.store import RunStore

        store = RunStore.open(path)
        out.write_text(json.dumps({
            "latents": hashlib.sha256(store.read_latents(0, store.num_latent_frames).tobytes()).hexdigest(),
            "frames": hashlib.sha256(store.read_frames(0, store.num_frames).tobytes()).hexdigest(),
            "complete": store.status_dict()["complete"]}))
        return 0

    return in_child(digest)


def part_chaos(trials: int, seed: int, folder: Path) -> dict:
    rng = random.Random(seed)
    preset = ["generate", "tiny-test", "--no-progress", "--set", "store.checkpoint_every_ticks=2"]
    reference = folder / "reference.zarr"
    assert cli(*preset, "--output", reference, out=folder / "reference.log") == 0
    assert arrays_digest(reference, folder / "reference.json") == 0
    expected = json.loads((folder / "reference.json").read_text())
    counts = {"trials": trials, "killed": 0, "damaged": 0, "damage_kinds": {}, "relied_on": 0, "verify_found": 0,
              "verify_missed": [], "not_relied_on_found": 0, "rerun_exit_0": 0, "bit_identical": 0,
              "verify_ok_after": 0, "failures": []}
    faults = [f"tick:{t}" for t in range(1, 7)] + [f"{p}:{j}" for p in ("latents", "frames") for j in range(4)]
    for trial in range(trials):
        path = folder / f"trial{trial}.zarr"
        fault = rng.choice(faults + [None, None])  # a third of the runs finish before they are damaged
        code = cli(*preset, "--output", path, fault=fault, out=folder / f"trial{trial}-a.log")
        if fault:
            counts["killed"] += code == -signal.SIGKILL
        applied = damage(path, rng) if path.exists() else None
        record = {"trial": trial, "fault": fault, "first_exit": code, "damage": applied}
        if applied:
            counts["damaged"] += 1
            counts["damage_kinds"][applied[0]] = counts["damage_kinds"].get(applied[0], 0) + 1
            verify = cli("verify", path, out=folder / f"trial{trial}-verify.log")
            record["verify_exit"] = verify
            # a damage of something no done block or newest checkpoint relies on need not be found (an older
            # checkpoint slot, a chunk of a block not done yet): counted apart
            if applied[2]:
                counts["relied_on"] += 1
                if verify == 1:
                    counts["verify_found"] += 1
                else:
                    counts["verify_missed"].append(record.copy())
            else:
                counts["not_relied_on_found"] += verify == 1
        rerun = cli(*preset, "--output", path, out=folder / f"trial{trial}-b.log")
        record["rerun_exit"] = rerun
        counts["rerun_exit_0"] += rerun == 0
        if rerun == 0 and arrays_digest(path, folder / "digest.json") == 0:
            got = json.loads((folder / "digest.json").read_text())
            same = got == expected
            counts["bit_identical"] += same
            if not same:
                counts["failures"].append({**record, "why": "not bit-identical"})
        elif rerun != 0:
            counts["failures"].append({**record, "why": (folder / f"trial{trial}-b.log").read_text()[-800:]})
        after = cli("verify", path, out=folder / f"trial{trial}-verify2.log")
        counts["verify_ok_after"] += after == 0
        if after != 0:
            counts["failures"].append({**record, "why": (folder / f"trial{trial}-verify2.log").read_text()[-800:]})
        shutil.rmtree(path, ignore_errors=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,status,chaos")
    parser.add_argument("--frames", type=int, default=61, help="overhead: demo-cpu frames")
    parser.add_argument("--repeats", type=int, default=2, help="overhead: A/B runs per side")
    parser.add_argument("--blocks", type=int, default=100_000, help="status: blocks of the long store")
    parser.add_argument("--scan", action="store_true", help="status: also time a count of every marker chunk")
    parser.add_argument("--trials", type=int, default=12, help="chaos: runs")
    parser.add_argument("--seed", type=int, default=0, help="chaos: random seed")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import importlib

    for module in ("torch", "hpcvideo.cli", "hpcvideo.generate", "hpcvideo.runner", "hpcvideo.export",
                   "hpcvideo.progress", "hpcvideo.writer", "hpcvideo.strategies.dualparal.spec",
                   "hpcvideo.store.recovery"):
        importlib.import_module(module)  # once, before any fork: every child runs the same code

    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_before": load()}}
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        folder = Path(tmp)
        for part in args.parts.split(","):
            start = time.perf_counter()
            if part == "overhead":
                out[part] = part_overhead(args.frames, args.repeats, folder)
            elif part == "status":
                out[part] = part_status(args.blocks, folder, args.scan)
            elif part == "chaos":
                out[part] = part_chaos(args.trials, args.seed, folder)
            else:
                raise SystemExit(f"--parts: unknown part {part!r}; allowed: overhead, status, chaos")
            out[part]["part_s"] = round(time.perf_counter() - start, 1)
            out[part]["load_after"] = load()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
