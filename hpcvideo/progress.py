"""Live progress of a run: per-rank heartbeats written into the run store, and the status built from them.

Every rank of a job writes its own small heartbeat record, readable from any node that sees the file
system (``hpcvideo status RUN.zarr`` on a login node while the job runs). Where records live and how
they are written (atomically, by path: ranks other than 0 hold no RunStore) is the store's business
(:mod:`hpcvideo.store.heartbeat`: ``RUN.zarr/heartbeat/rank<R>`` and the per-tick log
``RUN.zarr/heartbeat/ticks`` that rank 0 writes through its RunStore); this module decides what a
record says and when it is written, and turns the records into a status.

``record``: rank, world_size and attempt (an id shared by the ranks of one start of the job: a resume
or requeue is a new attempt), host, pid, pid_ns and proc_start (which process on which host, to tell
from that host whether it still lives), tick (ticks finished), num_ticks, tick_time (unix s when
``tick`` was reached), time (unix s of the write: the process was alive then), started_at and
start_tick (this process's first beat: rates and ETA are over this process's ticks, so a resumed run
does not count the checkpoint it skipped), interval_s, ticks_per_s (between the last two written tick
changes), state ("running" | "finished" | "stopped").

When records are written: at the first ``beat``, at every forced beat (checkpoints, the end), and
otherwise at most once per ``interval_s``; a background thread rewrites the record every
``interval_s`` while the process lives, also while a tick takes longer than that. So a record older
than ``STALE_AFTER_INTERVALS * interval_s + STALE_GRACE_S`` means the process stopped without
saying so (killed, node lost) or hangs badly enough to starve the thread; a record whose process is on
this host and no longer exists means it stopped, at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .layout import latent_frames_for
from .store import RunStore, ensure_heartbeat_group, heartbeat_path, read_heartbeats, write_heartbeat
from .store.lock import describe_holder, lock_status

STALE_AFTER_INTERVALS = 2  # a heartbeat older than 2 intervals + STALE_GRACE_S: the rank stopped reporting
STALE_GRACE_S = 5.0  # file-system latency and clock differences between nodes
KEEPALIVE_MIN_S = 0.05  # the keep-alive thread writes at most this often, whatever interval_s is


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]": pids are comparable only within one
    except OSError:
        return None


def _proc_start(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of process ``pid`` from /proc, else None."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[19]), fields[0]


def process_gone(record: dict) -> bool:
    """True if ``record``'s process ran on this host (same host name and pid namespace) and is gone:
    no such pid, a zombie, or another process that reuses the pid (a different start time).

    False when it cannot be told from here (another host or container) or the process lives."""
    if record.get("host") != socket.gethostname() or not record.get("pid"):
        return False
    if record.get("pid_ns") is not None and record.get("pid_ns") != _pid_namespace():
        return False
    pid = int(record["pid"])
    info = _proc_start(pid)
    if info is not None:
        start, state = info
        return state in ("Z", "X") or (record.get("proc_start") is not None and start != record["proc_start"])
    if Path("/proc/self/stat").exists():
        return True  # /proc works here and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def new_attempt(env) -> str:
    """An id for this start of the job, the same on every rank (collective: every rank calls it).

    ``env``: the RankEnv (rank 0 draws the id and sends it to the others)."""
    from .runtime.control import bcast_object

    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}" if env.rank == 0 else None
    return bcast_object(env, attempt) if env.world_size > 1 else attempt


class Heartbeat:
    """Writes rank ``rank``'s heartbeat into the run store at ``store_path`` (no zarr handle needed).

    ``beat(tick)`` after every tick: writes at once if ``force`` or at the first beat, else at most
    once per ``interval_s`` seconds (the keep-alive thread writes the latest tick within one more
    interval). ``world_size`` and ``attempt`` (see :func:`new_attempt`) let ``hpcvideo status`` tell
    the ranks of this start of the job from those of an earlier one. ``store`` (rank 0's RunStore,
    optional): the per-tick wall seconds passed to ``beat`` are buffered and written to the store's
    ``heartbeat/ticks`` array with each write from ``beat`` (never from the thread).
    ``keepalive``: run the thread (default); it stops at a beat whose state is not "running", or at
    :meth:`close`.
    """

    def __init__(self, store_path, *, rank: int, num_ticks: int, interval_s: float = 5.0, store=None,
                 world_size: int | None = None, attempt: str | None = None, keepalive: bool = True) -> None:
        self._store_path = Path(store_path)
        self.path = heartbeat_path(store_path, rank)  # the record's file (written by the store layer)
        self.rank, self.num_ticks, self.interval_s, self.store = int(rank), int(num_ticks), float(interval_s), store
        self.world_size, self.attempt = (None if world_size is None else int(world_size)), attempt
        self._host, self._pid, self._pid_ns = socket.gethostname(), os.getpid(), _pid_namespace()
        info = _proc_start(self._pid)
        self._proc_start = None if info is None else info[0]
        self._started_at = self._start_tick = None
        self._tick = self._tick_time = None
        self._state = "running"
        self._rate: float | None = None
        self._ref: tuple[int, float] | None = None  # (tick, tick_time) of the last written tick change
        self._last_write: float | None = None
        self._pending: list[tuple[int, float, float]] = []  # (tick index, wall s, end time) not yet stored
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keepalive = keepalive
        ensure_heartbeat_group(self._store_path)

    def beat(self, tick: int, *, tick_s: float | None = None, force: bool = False, state: str | None = None) -> bool:
        """Report that ``tick`` ticks are finished (``tick_s``: wall seconds of the tick just run).

        ``state``: "running" | "finished" | "stopped", None to keep the last one ("running" at first);
        a state other than "running" is written at once and stops the keep-alive thread. Call with
        ``force=True`` right after a checkpoint, so that the record is never behind it.
        Returns True if a record was written now."""
        now = time.time()
        with self._lock:
            if tick_s is not None and self.store is not None:
                self._pending.append((int(tick) - 1, float(tick_s), now))
            if self._tick != int(tick):
                self._tick, self._tick_time = int(tick), now
            if state is not None and state != self._state:
                self._state, force = state, True
            if self._started_at is None:
                self._started_at, self._start_tick = now, int(tick)
                force = True
            if not force and now - self._last_write < self.interval_s:
                return False
            self._write(now)
            pending, self._pending = self._pending, []
        if pending:
            ticks = np.array([p[0] for p in pending])
            values = np.array([p[1:] for p in pending], dtype=np.float64)
            self.store.record_ticks(ticks, values)
        if self._state != "running":
            self.close()
        elif self._keepalive and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._keep_alive, name=f"heartbeat-rank{self.rank}", daemon=True)
            self._thread.start()
        return True

    def close(self) -> None:
        """Stop the keep-alive thread (the record stays as last written)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 2 * self.interval_s))

    def _keep_alive(self) -> None:
        period = max(self.interval_s, KEEPALIVE_MIN_S)
        while not self._stop.wait(period / 2):
            with self._lock:
                now = time.time()
                if self._stop.is_set() or self._state != "running" or now - self._last_write < period:
                    continue
                try:
                    self._write(now)
                except OSError:  # the store was moved or removed under us: nothing left to report into
                    return

    def _write(self, now: float) -> None:
        """Write the record (caller holds the lock)."""
        if self._ref is None or self._tick < self._ref[0]:
            self._ref = (self._tick, self._tick_time)
        elif self._tick > self._ref[0]:
            if self._tick_time > self._ref[1]:
                self._rate = (self._tick - self._ref[0]) / (self._tick_time - self._ref[1])
            self._ref = (self._tick, self._tick_time)
        record = {
            "rank": self.rank, "world_size": self.world_size, "attempt": self.attempt,
            "host": self._host, "pid": self._pid, "pid_ns": self._pid_ns, "proc_start": self._proc_start,
            "tick": self._tick, "num_ticks": self.num_ticks, "tick_time": self._tick_time, "time": now,
            "started_at": self._started_at, "start_tick": self._start_tick,
            "interval_s": self.interval_s, "ticks_per_s": self._rate, "state": self._state,
        }
        write_heartbeat(self._store_path, self.rank, record)
        self._last_write = now


def split_attempts(beats: list[dict]) -> tuple[list[dict], list[dict]]:
    """(records of the latest attempt, records of earlier attempts), each sorted by rank.

    The latest attempt is the one of the most recently started record. Records without an attempt id
    (written by an older version) count as one attempt; a record of rank >= the latest attempt's
    world_size is from an earlier attempt whatever its id."""
    if not beats:
        return [], []
    latest = max(beats, key=lambda b: b.get("started_at") or 0.0)
    attempt, world_size = latest.get("attempt"), latest.get("world_size")
    current, earlier = [], []
    for b in beats:
        same = b.get("attempt") == attempt and (world_size is None or b["rank"] < world_size)
        (current if same else earlier).append(b)
    return current, earlier


def _blocks_in_flight(config: dict, tick: int) -> list[int] | None:
    """[first, last] block in the DualParal queue after ``tick`` finished ticks, else None.

    Block j enters at tick j and leaves after tick j + T - 1 (strategies/dualparal/queue.py)."""
    strategy, sampling = config.get("strategy", {}), config.get("sampling", {})
    if strategy.get("name") != "dualparal" or tick <= 0:
        return None
    n, steps = strategy["block_latent_frames"], sampling["num_inference_steps"]
    latent_frames = latent_frames_for(config["video"]["num_frames"], config.get("model", {}).get("family", "wan"))
    num_blocks = -(-latent_frames // n)  # whole blocks: the last one may reach past video.num_frames
    first, last = max(0, tick - steps + 1), min(tick - 1, num_blocks - 1)
    return [first, last] if first <= last else None


def _rank_view(b: dict, now: float) -> dict[str, Any]:
    age = now - b["time"]
    running = b.get("state") == "running"
    gone = running and process_gone(b)
    overdue = running and age > STALE_AFTER_INTERVALS * b["interval_s"] + STALE_GRACE_S
    return {"rank": b["rank"], "host": b["host"], "pid": b["pid"], "tick": b["tick"], "age_s": round(age, 1),
            "state": b.get("state"), "stale": gone or overdue, "gone": gone,
            "attempt": b.get("attempt"), "world_size": b.get("world_size")}


def progress(store, *, now: float | None = None, status: dict | None = None) -> dict[str, Any]:
    """Live progress of ``store`` (a RunStore) from its heartbeats; JSON-serialisable.

    Only the ranks of the latest attempt (see :func:`split_attempts`) count. Keys:

    * state: "running" | "stale" (a heartbeat is overdue: killed, node lost, or hung) | "stopped"
      (a rank said it stopped, or its process on this host is gone) | "finished" | None (no heartbeat
      yet); reason: one line saying why, for stale and stopped;
    * tick, num_ticks (rank 0's, else the most advanced rank's; tick is at least the last checkpoint's
      tick when that checkpoint was written by this attempt); ticks_per_s (between rank 0's last two
      written tick changes), mean_ticks_per_s (since this attempt started), eta_s (remaining ticks /
      mean rate; 0 when finished; None when unknown or not running), blocks_in_flight ([first, last]
      blocks in the DualParal queue), last_heartbeat_age_s (rank 0's), stale (True if a rank stopped
      reporting without saying so: overdue, or gone);
    * attempt, world_size: of the latest attempt (None from records of older versions);
    * ranks: [{rank, host, pid, tick, age_s, state, stale, gone, attempt, world_size}] of the latest
      attempt; missing_ranks: ranks below its world_size with no record of it yet;
      earlier_ranks: records of earlier attempts (same keys), e.g. ranks beyond a smaller resume.

    ``now``: unix s (default: the clock); ``status``: ``store.status_dict()`` if already read.
    """
    now = time.time() if now is None else now
    status = store.status_dict() if status is None else status
    current, earlier = split_attempts(read_heartbeats(store.path))
    out: dict[str, Any] = {"state": None, "reason": None, "tick": None, "num_ticks": None, "ticks_per_s": None,
                           "mean_ticks_per_s": None, "eta_s": None, "blocks_in_flight": None,
                           "last_heartbeat_age_s": None, "stale": None, "attempt": None, "world_size": None,
                           "ranks": [_rank_view(b, now) for b in current], "missing_ranks": [],
                           "earlier_ranks": [_rank_view(b, now) for b in earlier]}
    for view in out["earlier_ranks"]:
        view["stale"] = view["gone"] = False  # not part of the run any more: nothing to report about them
    if not current:
        return out
    main = next((b for b in current if b["rank"] == 0), max(current, key=lambda b: b["tick"]))
    views = out["ranks"]
    world_size = main.get("world_size")
    if world_size:
        seen = {b["rank"] for b in current}
        out["missing_ranks"] = [r for r in range(world_size) if r not in seen]
    tick, total = main["tick"], main["num_ticks"]
    checkpoint_tick, checkpoint_time = status.get("last_checkpoint_tick"), status.get("last_checkpoint_time")
    if checkpoint_tick is not None and checkpoint_time is not None and checkpoint_time >= main["started_at"]:
        tick = max(tick, int(checkpoint_tick))  # a checkpoint of this attempt: the ticks before it are done
    tick_time = main.get("tick_time") or main["time"]
    mean_rate = None
    if tick_time > main["started_at"] and main["tick"] > main["start_tick"]:
        mean_rate = (main["tick"] - main["start_tick"]) / (tick_time - main["started_at"])
    finished = tick >= total or main.get("state") == "finished" or status.get("status") == "complete"
    stopped = [v for v in views if v["state"] == "stopped"]
    gone = [v for v in views if v["gone"]]
    overdue = [v for v in views if v["stale"] and not v["gone"]]
    if finished:
        state, reason = "finished", None
    elif gone:
        v = gone[0]
        state, reason = "stopped", (f"rank {v['rank']} (pid {v['pid']} on {v['host']}) is gone without saying so: "
                                    f"killed?; last heartbeat {_ago(v['age_s'])}")
    elif stopped:
        state, reason = "stopped", f"rank {stopped[0]['rank']} stopped at tick {stopped[0]['tick']} (preempted or failed)"
    elif overdue:
        v = max(overdue, key=lambda v: v["age_s"])
        state, reason = "stale", (f"no heartbeat from rank {v['rank']} on {v['host']} for {_duration(v['age_s'])} "
                                  f"(expected every {_duration(main['interval_s'])}): killed, node lost, or hung?")
    else:
        state, reason = "running", None
    out.update(
        state=state, reason=reason, attempt=main.get("attempt"), world_size=world_size,
        tick=tick, num_ticks=total, ticks_per_s=main.get("ticks_per_s"),
        mean_ticks_per_s=None if mean_rate is None else round(mean_rate, 6),
        eta_s=0.0 if finished else (round((total - tick) / mean_rate, 1) if mean_rate and state == "running" else None),
        blocks_in_flight=None if finished else (main.get("blocks_in_flight") or _blocks_in_flight(store.config, tick)),
        last_heartbeat_age_s=round(now - main["time"], 1), stale=bool(gone or overdue) and not finished,
    )
    return out


def run_status(store, *, seams: bool = False) -> dict[str, Any]:
    """``store.status_dict()`` + ``progress`` (+ the seam metric of the frames done, if ``seams``).

    ``store``: a RunStore or a path (opened read-only). ``status`` is what the store says (it stays
    "running" after a kill); ``state`` is what the heartbeats say (see :func:`progress`)."""
    if not isinstance(store, RunStore):
        store = RunStore.open(store, mode="r")
    status = store.status_dict()
    status["progress"] = progress(store, status=status)
    status["state"] = status["progress"]["state"] or status["status"]
    status["timings"] = store.attrs.get("timings")
    status["writer"] = lock_status(status["path"])  # the holder of the one-writer lock (None: no run writes it)
    if seams:
        from .metrics import seam_metric

        seam = seam_metric(store)
        status["seams"] = {k: seam[k] for k in ("kind", "overall", "num_seams", "num_frames", "worst_boundary",
                                                "worst_ratio", "normalised", "normalised_prompt_switch")}
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
    state = status["status"]
    if p["state"] in ("stopped", "stale"):
        state = f"{p['state']} ({p['reason']}; the store says {status['status']})"
    elif p["state"] == "finished" and status["status"] != "complete":
        state = f"{status['status']} (every rank finished denoising)"
    lines = [
        f"{status['path']}: {state}",
        f"frames     {status['num_frames_written']}/{status['num_frames']} written, {status['num_frames_ready']} "
        f"ready to export; blocks {status['blocks_frames_done']}/{status['num_blocks']} decoded, "
        f"{status['blocks_latents_done']} denoised",
    ]
    if p["tick"] is not None:
        rate = p["ticks_per_s"] or p["mean_ticks_per_s"]
        eta = "?" if p["eta_s"] is None else _duration(p["eta_s"])
        if p["state"] in ("stopped", "stale"):
            lines.append(f"ticks      {p['tick']}/{p['num_ticks']} when it stopped, "
                         f"{'?' if rate is None else f'{rate:.3g}'} ticks/s before")
        else:
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
        flag = " GONE" if r["gone"] else (" STALE" if r["stale"] else "")
        lines.append(f"rank {r['rank']:<5} {r['host']} pid {r['pid']}: tick {r['tick']}, {r['state']}, "
                     f"{_ago(r['age_s'])}{flag}")
    if p["missing_ranks"]:
        lines.append(f"ranks      {_ranks(p['missing_ranks'])} of {p['world_size']}: no heartbeat yet in this attempt")
    if not p["ranks"]:
        lines.append("ranks      no heartbeat yet")
    if p["earlier_ranks"]:
        last = min(r["age_s"] for r in p["earlier_ranks"])
        lines.append(f"earlier    {_ranks([r['rank'] for r in p['earlier_ranks']])} of an earlier attempt, "
                     f"last heard {_ago(last)} (not part of this run now)")
    writer = status.get("writer")
    if writer is not None:
        held = describe_holder(writer) if writer.get("host") else "unreadable lock file"
        stale = "; stale: its holder may be gone" if writer["stale"] else ""
        lines.append(f"writer     {held}, lock refreshed {_ago(writer['refreshed_s_ago'])}{stale}")
    elif status["status"] != "complete":
        lines.append("writer     none (no run holds the store's lock)")
    seams = status.get("seams")
    if seams:
        overall = "n/a" if seams["overall"] is None else f"{seams['overall']:.3g}"
        worst = "" if seams["worst_ratio"] is None else f", worst {seams['worst_ratio']:.3g} at frame {seams['worst_boundary']}"
        lines.append(f"seams      {seams['kind']} boundaries: {seams['num_seams']} over {seams['num_frames']} frames, "
                     f"across/within {overall}{worst}" + (
                         "" if seams.get("normalised") is None else
                         f"; over the other latent-frame steps {seams['normalised']:.3g}"))
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)
