"""Chaos trials of stops and writers: random signals and kills of real ``hpcvideo generate`` runs, and second writers.

``python bench/chaos_stops.py [--trials N] [--seed S] [--frames F] [--ranks 1,2]`` runs N trials of the tiny-test
preset (F frames, default 61: 8 blocks, 11 ticks, a checkpoint every tick), each on 1 or 2 local ranks
(``--ranks 2``: the CLI's own mpiexec) with one of these events, at a random checkpoint tick:

* ``SIGINT`` / ``SIGTERM`` to the command (as Ctrl-C or ``kill``): exit 130 / 143 and the stop line, or 0 when
  the run had finished;
* ``SIGINT x2`` (Ctrl-C twice, 50 ms apart): exit 130 at once;
* ``SIGKILL`` of the command (the parent of a 2-rank job): its ranks must stop by themselves;
* ``kill rank`` (SIGKILL of rank 1 at a tick through ``HPCVIDEO_FAULT``, 2 ranks; rank 0 on 1 rank);
* ``second writer``: the same command again while the first runs (paused by a SIGSTOP it sends itself at the
  tick, through ``HPCVIDEO_FAULT``, and continued afterwards): refused at once (exit 2, naming the holder), the
  first one unharmed (exit 0).

After every event: no process of the trial is left (within 30 s), no MPICH segment that appeared during the trial
is left unused in /dev/shm, the store's lock is released or broken by the rerun, and the rerun (the same command)
ends bit-identical to an uninterrupted run. Prints one JSON object: machine facts, the counts per event, and
every failed check. Takes about 20-40 s per trial on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ("SIGINT", "SIGTERM", "SIGINT x2", "SIGKILL", "kill rank", "second writer")


def _environ() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "HPCVIDEO_R", "HPCVIDEO_FAULT"))}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return environ


def _command(store: Path, frames: int, ranks: int) -> list[str]:
    command = [sys.executable, "-m", "hpcvideo.cli", "generate", "tiny-test", "--output", str(store),
               "--frames", str(frames), "--no-progress"]
    return command + (["--ranks", str(ranks)] if ranks > 1 else [])


def _checkpoint_tick(store: Path) -> int | None:
    from hpcvideo.store import RunStore

    try:
        if RunStore.exists(store):
            return RunStore.open(store).status_dict()["last_checkpoint_tick"]
    except Exception:  # noqa: BLE001 - a store being written: try again
        return None
    return None


def _trial_processes(store: Path) -> list[int]:
    """Processes whose command line names the trial's store (the command, mpiexec, the ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(store) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stopped(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are stopped (SIGSTOP)."""
    found = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2:].split()[0] == "T":
            found.append(pid)
    return found


def _segments_of(pids: list[int]) -> set[str]:
    """The MPICH segments (/dev/shm names) that the processes ``pids`` map now."""
    names = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                where = line.find("/dev/shm/mpich_")
                if where >= 0:
                    names.add(line[where + len("/dev/shm/"):].removesuffix(" (deleted)"))
        except OSError:
            continue
    return names


def _arrays(store: Path):
    from hpcvideo.store import RunStore

    s = RunStore.open(store)
    return s.status_dict()["complete"], s.read_latents(0, s.num_latent_frames), s.read_frames(0, s.num_frames)


def trial(rng: random.Random, work: Path, index: int, frames: int, ranks: int, event: str, reference) -> dict:
    from hpcvideo.runtime.shm import list_segments
    from hpcvideo.store.lock import lock_path

    store = work / f"trial{index}.zarr"
    command = _command(store, frames, ranks)
    environ = _environ()
    at_tick = rng.randint(1, 7)
    if event == "kill rank":
        environ["HPCVIDEO_FAULT"] = f"tick:{at_tick}@{1 if ranks > 1 else 0}"
    if event == "second writer":  # rank 0 pauses itself at the tick (holding the lock) until the second one ran
        environ["HPCVIDEO_FAULT"] = f"SIGSTOP:tick:{at_tick}@0"
    before = list_segments()
    out = {"trial": index, "ranks": ranks, "event": event, "at_tick": at_tick, "problems": []}
    started = time.monotonic()
    first = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    ours: set[str] = set()  # the segments the trial's ranks mapped: only those are checked afterwards
    while first.poll() is None and (_checkpoint_tick(store) or 0) < at_tick:
        ours |= _segments_of(_trial_processes(store))
        time.sleep(0.05)
    while event == "second writer" and first.poll() is None and not _stopped(_trial_processes(store)):
        time.sleep(0.05)
    second = None
    if first.poll() is None:
        if event in ("SIGINT", "SIGTERM"):
            first.send_signal(getattr(signal, event))
        elif event == "SIGINT x2":
            first.send_signal(signal.SIGINT)
            time.sleep(0.05)
            first.send_signal(signal.SIGINT)
        elif event == "SIGKILL":
            first.kill()
        elif event == "second writer":
            second = subprocess.run(command, env=_environ(), capture_output=True, text=True, timeout=300)
            for pid in _stopped(_trial_processes(store)):
                os.kill(pid, signal.SIGCONT)
    try:
        stdout, stderr = first.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        first.kill()
        stdout, stderr = first.communicate()
        out["problems"].append("the command hung (killed after 300 s)")
    code = first.returncode
    out.update(exit=code, stopped_after_s=round(time.monotonic() - started, 2))
    expected = {"SIGINT": (130, 0), "SIGTERM": (143, 0), "SIGINT x2": (130, 0), "SIGKILL": (-9, 0),
                "second writer": (0,)}.get(event)
    if event == "kill rank" and code == 0:
        out["problems"].append("exit 0 although a rank was killed")
    elif expected is not None and code not in expected:
        out["problems"].append(f"exit {code}, expected one of {expected}: {stderr[-600:]}")
    if event in ("SIGINT", "SIGTERM") and code != 0 and f"after {event}: checkpoint written" not in stderr:
        out["problems"].append(f"no stop line: {stderr[-400:]}")
    if "Traceback" in stderr and event not in ("kill rank",):
        out["problems"].append(f"a traceback: {stderr[-600:]}")
    if "BAD TERMINATION" in stdout + stderr and event in ("SIGINT", "SIGTERM", "SIGKILL", "second writer"):
        out["problems"].append("mpiexec's BAD TERMINATION banner")
    if second is not None:
        out["second_exit"] = second.returncode
        if second.returncode != 2 or "is being written by another run" not in second.stderr:
            out["problems"].append(f"second writer not refused: exit {second.returncode}: {second.stderr[-400:]}")
    deadline = time.monotonic() + 30
    while _trial_processes(store) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _trial_processes(store)
    if left:
        out["problems"].append(f"processes left running: {left}")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    unused = {p.name for p in list_segments() - before} & ours
    if unused:
        out["problems"].append(f"shared-memory segments left: {sorted(unused)}")
    out["lock_left"] = lock_path(store).exists()
    rerun = subprocess.run(command, env=_environ(), capture_output=True, text=True, timeout=600)
    if rerun.returncode != 0:
        out["problems"].append(f"rerun exit {rerun.returncode}: {rerun.stderr[-600:]}")
    else:
        complete, latents, frames_ = _arrays(store)
        out["bit_identical"] = bool(complete and np.array_equal(latents, reference[0])
                                    and np.array_equal(frames_, reference[1]))
        if not out["bit_identical"]:
            out["problems"].append("the resumed store differs from the uninterrupted run")
    if lock_path(store).exists():
        out["problems"].append("the lock is still there after the rerun")
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(f"{store}.logs", ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--ranks", default="1,2", help="rank counts to draw from (comma-separated)")
    parser.add_argument("--events", default=",".join(EVENTS), help="events to draw from (comma-separated)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rank_choices = [int(r) for r in args.ranks.split(",")]
    events = [e.strip() for e in args.events.split(",")]
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()},
              "frames": args.frames, "trials": [], "counts": {}}
    with tempfile.TemporaryDirectory(prefix="hpcvideo-chaos-") as tmp:
        work = Path(tmp)
        reference = work / "reference.zarr"
        subprocess.run(_command(reference, args.frames, 1), env=_environ(), check=True, capture_output=True)
        _, *arrays = _arrays(reference)
        for index in range(args.trials):
            event = events[index % len(events)] if args.trials >= len(events) else rng.choice(events)
            ranks = rng.choice(rank_choices)
            result = trial(rng, work, index, args.frames, ranks, event, arrays)
            report["trials"].append(result)
            counts = report["counts"].setdefault(f"{event} on {ranks} rank(s)", {"trials": 0, "clean": 0})
            counts["trials"] += 1
            counts["clean"] += not result["problems"]
            print(json.dumps(result), file=sys.stderr, flush=True)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["clean"] = sum(not t["problems"] for t in report["trials"])
    print(json.dumps(report, indent=2))
    return 0 if report["clean"] == len(report["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
