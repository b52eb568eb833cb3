"""Live progress of a run: per-rank heartbeats written into the run store, and the status built from them.

Every rank of a job writes its own small heartbeat record, readable from any node that sees the file
system (``hpcvideo status RUN.zarr`` on a login node while the job runs)::

    RUN.zarr/heartbeat/                 zarr group (attrs empty)
      rank<R>/zarr.json                 an empty zarr group whose attrs are {"heartbeat": record}
      ticks                             (num_ticks, 2) float64: per tick [wall s, end time (unix s)],
                                        NaN where not run yet; written by rank 0 through RunStore

``record``: rank, host, pid, tick (ticks finished), num_ticks, time (unix s of the beat), started_at
and start_tick (this process's first beat: rates and ETA are over this process's ticks, so a resumed
run does not count the checkpoint it skipped), interval_s (the throttle), ticks_per_s (since the
previous beat), state ("running" | "finished" | "stopped").

A heartbeat is plain JSON in zarr's own group-metadata format, written to a temp file and renamed
(atomic on POSIX file systems), so writing it needs no zarr metadata handle: ranks other than 0 hold
no RunStore. The store stays a valid zarr hierarchy (``xarray.open_zarr`` and zarr listings see the
heartbeats as empty groups). Beats are throttled to one per ``interval_s`` per rank, plus one at the
start and one at the end.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

HEARTBEAT_DIR = "heartbeat"
_GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}
STALE_AFTER_INTERVALS = 3  # a heartbeat older than 3 intervals + STALE_GRACE_S means the rank stopped reporting
STALE_GRACE_S = 30.0


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # same temp name pattern as zarr's LocalStore, so RunStore.sweep_orphans removes leftovers
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class Heartbeat:
    """Writes rank ``rank``'s heartbeat into the run store at ``store_path`` (no zarr handle needed).

    ``beat(tick)`` after every tick: writes at most once per ``interval_s`` seconds (unless
    ``force``). ``store`` (rank 0's RunStore, optional): the per-tick wall seconds passed to ``beat``
    are buffered and written to the store's ``heartbeat/ticks`` array with each write.
    """

    def __init__(self, store_path, *, rank: int, num_ticks: int, interval_s: float = 5.0, store=None) -> None:
        self.path = Path(store_path) / HEARTBEAT_DIR / f"rank{int(rank)}" / "zarr.json"
        self.rank, self.num_ticks, self.interval_s, self.store = int(rank), int(num_ticks), float(interval_s), store
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._started_at = self._start_tick = None
        self._last_time = self._last_tick = None
        self._pending: list[tuple[int, float, float]] = []  # (tick index, wall s, end time) not yet stored
        group = self.path.parent.parent / "zarr.json"
        if not group.exists():
            _write_json_atomic(group, _GROUP_META)

    def beat(self, tick: int, *, tick_s: float | None = None, force: bool = False, state: str = "running") -> bool:
        """Report that ``tick`` ticks are finished (``tick_s``: wall seconds of the tick just run).

        Returns True if a record was written."""
        now = time.time()
        if tick_s is not None and self.store is not None:
            self._pending.append((int(tick) - 1, float(tick_s), now))
        if self._started_at is None:
            self._started_at, self._start_tick = now, int(tick)
            force = True
        if not force and now - self._last_time < self.interval_s:
            return False
        rate = None
        if self._last_time is not None and now > self._last_time and tick > self._last_tick:
            rate = (tick - self._last_tick) / (now - self._last_time)
        record = {
            "rank": self.rank, "host": self._host, "pid": self._pid, "tick": int(tick), "num_ticks": self.num_ticks,
            "time": now, "started_at": self._started_at, "start_tick": self._start_tick,
            "interval_s": self.interval_s, "ticks_per_s": rate, "state": state,
        }
        _write_json_atomic(self.path, {**_GROUP_META, "attributes": {"heartbeat": record}})
        self._last_time, self._last_tick = now, int(tick)
        if self._pending:
            ticks = np.array([p[0] for p in self._pending])
            values = np.array([p[1:] for p in self._pending], dtype=np.float64)
            self.store.record_ticks(ticks, values)
            self._pending.clear()
        return True


def read_heartbeats(store_path) -> list[dict]:
    """The heartbeat records of every rank that has reported, sorted by rank (unreadable ones skipped)."""
    root = Path(store_path) / HEARTBEAT_DIR
    records = []
    for meta in sorted(root.glob("rank*/zarr.json")):
        try:
            records.append(json.loads(meta.read_text())["attributes"]["heartbeat"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-copied store, or a file from elsewhere: not a heartbeat
    return sorted(records, key=lambda r: r.get("rank", 0))


def _blocks_in_flight(config: dict, tick: int) -> list[int] | None:
    """[first, last] block in the DualParal queue after ``tick`` finished ticks, else None.

    Block j enters at tick j and leaves after tick j + T - 1 (strategies/dualparal/queue.py)."""
    strategy, sampling = config.get("strategy", {}), config.get("sampling", {})
    if strategy.get("name") != "dualparal" or tick <= 0:
        return None
    n, steps = strategy["block_latent_frames"], sampling["num_inference_steps"]
    num_blocks = ((config["video"]["num_frames"] - 1) // 4 + 1) // n
    first, last = max(0, tick - steps + 1), min(tick - 1, num_blocks - 1)
    return [first, last] if first <= last else None


def progress(store, *, now: float | None = None) -> dict[str, Any]:
    """Live progress of ``store`` (a RunStore) from its heartbeats; JSON-serialisable.

    Keys: tick, num_ticks (rank 0's, else the most advanced rank's), ticks_per_s (since the previous
    beat), mean_ticks_per_s (since this process started), eta_s (remaining ticks / mean rate; 0 when
    finished; None when unknown), blocks_in_flight ([first, last] blocks in the DualParal queue),
    last_heartbeat_age_s, stale (True if the main heartbeat stopped while the store says running),
    ranks: [{rank, host, pid, tick, age_s, state, stale}] (which ranks last reported, and when).
    """
    now = time.time() if now is None else now
    beats = read_heartbeats(store.path)
    out: dict[str, Any] = {"tick": None, "num_ticks": None, "ticks_per_s": None, "mean_ticks_per_s": None,
                           "eta_s": None, "blocks_in_flight": None, "last_heartbeat_age_s": None, "stale": None,
                           "ranks": []}
    for b in beats:
        age = now - b["time"]
        stale = b.get("state") == "running" and age > STALE_AFTER_INTERVALS * b["interval_s"] + STALE_GRACE_S
        out["ranks"].append({"rank": b["rank"], "host": b["host"], "pid": b["pid"], "tick": b["tick"],
                             "age_s": round(age, 1), "state": b.get("state"), "stale": stale})
    if not beats:
        return out
    main = next((b for b in beats if b["rank"] == 0), max(beats, key=lambda b: b["tick"]))
    tick, total = main["tick"], main["num_ticks"]
    mean_rate = None
    if main["time"] > main["started_at"] and tick > main["start_tick"]:
        mean_rate = (tick - main["start_tick"]) / (main["time"] - main["started_at"])
    finished = tick >= total or main.get("state") == "finished"
    age = now - main["time"]
    out.update(
        tick=tick, num_ticks=total, ticks_per_s=main.get("ticks_per_s"),
        mean_ticks_per_s=None if mean_rate is None else round(mean_rate, 6),
        eta_s=0.0 if finished else (None if not mean_rate else round((total - tick) / mean_rate, 1)),
        blocks_in_flight=None if finished else (main.get("blocks_in_flight") or _blocks_in_flight(store.config, tick)),
        last_heartbeat_age_s=round(age, 1), stale=out["ranks"][beats.index(main)]["stale"],
    )
    return out


def run_status(store, *, seams: bool = False) -> dict[str, Any]:
    """``store.status_dict()`` + ``progress`` (+ the seam metric of the frames done, if ``seams``).

    ``store``: a RunStore or a path (opened read-only)."""
    from .store import RunStore

    if not isinstance(store, RunStore):
        store = RunStore.open(store, mode="r")
    status = store.status_dict()
    status["progress"] = progress(store)
    status["timings"] = store.attrs.get("timings")
    if seams:
        from .metrics import seam_metric

        seam = seam_metric(store)
        status["seams"] = {k: seam[k] for k in ("kind", "overall", "num_seams", "num_frames", "worst_boundary",
                                                "worst_ratio")}
    return status


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else f"{_duration(seconds)} ago"


def format_status(status: dict) -> str:
    """``run_status`` as the lines ``hpcvideo status`` prints."""
    p = status["progress"]
    state = status["status"] + (" (no heartbeat for a while: stopped or preempted?)" if p["stale"] else "")
    lines = [
        f"{status['path']}: {state}",
        f"frames     {status['num_frames_written']}/{status['num_frames']} written, {status['num_frames_ready']} "
        f"ready to export; blocks {status['blocks_frames_done']}/{status['num_blocks']} decoded, "
        f"{status['blocks_latents_done']} denoised",
    ]
    if p["tick"] is not None:
        rate = p["ticks_per_s"] or p["mean_ticks_per_s"]
        eta = "?" if p["eta_s"] is None else _duration(p["eta_s"])
        lines.append(f"ticks      {p['tick']}/{p['num_ticks']}, "
                     f"{'?' if rate is None else f'{rate:.3g}'} ticks/s, ETA {eta}")
        if p["blocks_in_flight"]:
            first, last = p["blocks_in_flight"]
            lines.append(f"in flight  block {first}" if first == last else f"in flight  blocks {first}..{last}")
    if status["last_checkpoint_tick"] is not None:
        age = time.time() - status["last_checkpoint_time"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["last_checkpoint_time"]))
        lines.append(f"checkpoint tick {status['last_checkpoint_tick']} at {when} ({_ago(age)})")
    for r in p["ranks"]:
        lines.append(f"rank {r['rank']:<5} {r['host']} pid {r['pid']}: tick {r['tick']}, {r['state']}, "
                     f"{_ago(r['age_s'])}{' STALE' if r['stale'] else ''}")
    if not p["ranks"]:
        lines.append("ranks      no heartbeat yet")
    seams = status.get("seams")
    if seams:
        overall = "n/a" if seams["overall"] is None else f"{seams['overall']:.3g}"
        worst = "" if seams["worst_ratio"] is None else f", worst {seams['worst_ratio']:.3g} at frame {seams['worst_boundary']}"
        lines.append(f"seams      {seams['kind']} boundaries: {seams['num_seams']} over {seams['num_frames']} frames, "
                     f"across/within {overall}{worst}")
    return "\n".join(lines)
