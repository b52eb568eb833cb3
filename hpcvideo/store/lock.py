"""One writer per run store: the lock a run holds on its store while it writes.

The lock is a small JSON file beside the store, ``RUN.zarr.lock`` (beside, not inside: it exists before
the store is created, a copy of the store never carries it, and readers of the store never see it)::

    {"host", "pid", "pid_ns", "proc_start",     which process holds it (as in a heartbeat record)
     "job_id",                                   $SLURM_JOB_ID of the holder, or null for a local run
     "started_at", "token"}                      unix s when taken; a random id of this holding

Who takes it: rank 0 of a job, for the whole job (:func:`hpcvideo.runner.run`, before the store is
created, opened or grown; released when the run ends, however it ends short of a kill), and job
submission while it creates or grows the store. Readers (``status``, notebooks, ``export``) never need
it. Taking it is one atomic ``link(2)`` of a finished temp file onto ``RUN.zarr.lock`` (atomic on local
and network file systems alike): of two writers exactly one succeeds, the other reads the holder and:

* **refuses at once** (:class:`StoreLocked`, a :class:`StoreError`: exit 2 from the CLI) naming the
  holder's host, pid, job id and start time, while the holder is alive;
* **breaks a stale lock** with a warning: the holder ran on this host (same host name and pid
  namespace) and that process is gone, or its keep-alive is overdue by more than ``stale_after_s``
  (the holder touches the file every ``refresh_s`` seconds from a background thread; a file not
  touched for :data:`STALE_AFTER_S` means a holder on another node died without releasing it);
* **takes over** a lock of its own SLURM job id held on another host or by a process that is gone: a
  requeued job (same job id) whose previous start was killed by SLURM (time limit, preemption, node
  failure) continues at once, without waiting for the keep-alive to go stale.

A lock whose holder this host cannot judge and whose keep-alive is fresh is never broken: remove
``RUN.zarr.lock`` by hand only when no run is writing the store.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .base import StoreError

log = logging.getLogger("hpcvideo")

LOCK_SUFFIX = ".lock"
REFRESH_S = 30.0  # the holder touches its lock file this often
STALE_AFTER_S = 600.0  # a lock not touched for this long is stale (its holder died on another node)


class StoreLocked(StoreError):
    """Another live process holds the store's lock. ``holder``: its record (see the module doc)."""

    def __init__(self, store_path, holder: dict, age_s: float | None):
        self.holder = holder
        self.store_path = Path(store_path)
        super().__init__(
            f"{store_path} is being written by another run ({describe_holder(holder)}); one writer at a time: "
            f"wait for it to end, stop it, or use another --output. Reading it (hpcvideo status, export) needs no lock. "
            f"If that run is gone, its lock {lock_path(store_path)} is broken automatically once not refreshed for "
            f"{_duration(STALE_AFTER_S)}" + ("" if age_s is None else f" (last refreshed {_duration(age_s)} ago)")
            + " or by a requeue of the same SLURM job; remove it by hand only if no run writes the store"
        )


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def describe_holder(holder: dict) -> str:
    """``host <h> pid <p> [SLURM job <j>] since <UTC time>`` of a lock record."""
    started = holder.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    job = f" SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job} since {when}"


def lock_path(store_path) -> Path:
    """``RUN.zarr.lock`` beside the store at ``store_path`` (the store's real path: a symlink and its
    target share one lock)."""
    path = Path(store_path).resolve()
    return path.with_name(path.name + LOCK_SUFFIX)


def _own_record(job_id: str | None) -> dict:
    from ..progress import _pid_namespace, _proc_start  # the heartbeat's process identity

    info = _proc_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_namespace(),
            "proc_start": None if info is None else info[0], "job_id": job_id, "started_at": time.time(),
            "token": uuid.uuid4().hex}


def _read(path: Path) -> tuple[dict | None, float | None]:
    """(record or None when unreadable, seconds since last touched or None when the file is gone)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(path.read_text())
        return (record if isinstance(record, dict) else None), age
    except (OSError, ValueError):
        return None, age


def read_lock(store_path) -> dict | None:
    """The record of the lock on the store at ``store_path`` (None: not locked or unreadable)."""
    return _read(lock_path(store_path))[0]


def lock_status(store_path) -> dict | None:
    """Who holds the store's lock, for ``hpcvideo status``: the lock record (see the module doc; ``{}`` when the
    file cannot be read) plus ``refreshed_s_ago`` (seconds since the holder last touched it) and ``stale``
    (not touched for :data:`STALE_AFTER_S`: its holder on another node may be gone). None: no run holds it."""
    record, age_s = _read(lock_path(store_path))
    if age_s is None:
        return None
    return {**(record or {}), "refreshed_s_ago": age_s, "stale": age_s > STALE_AFTER_S}


@dataclass
class StoreLock:
    """A held lock (from :meth:`acquire`); :meth:`release` (or the context manager's exit) gives it back."""

    path: Path
    record: dict
    refresh_s: float = REFRESH_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, store_path, *, job_id: str | None = None, stale_after_s: float = STALE_AFTER_S,
                refresh_s: float = REFRESH_S) -> "StoreLock":
        """Take the lock of the store at ``store_path`` (which need not exist yet) for this process.

        ``job_id``: this run's SLURM job id (default: ``$SLURM_JOB_ID``, None outside SLURM). Breaks a stale
        lock, or takes over one of the same job, with a warning (see the module doc). Raises
        :class:`StoreLocked` naming the holder when a live writer holds it; OSError when the store's
        folder cannot be written."""
        job_id = job_id if job_id is not None else (os.environ.get("SLURM_JOB_ID") or None)
        path = lock_path(store_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = _own_record(job_id)
        tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)  # atomic: fails if a lock is there
                except FileExistsError:
                    pass
                else:
                    lock = cls(path=path, record=record, refresh_s=refresh_s)
                    lock._start_refresh()
                    return lock
                holder, age = _read(path)
                if age is None:
                    continue  # released meanwhile: try again
                reason = _stale_reason(holder, age, job_id, stale_after_s)
                if reason is None:
                    raise StoreLocked(store_path, holder or {}, age)
                if _break(path, holder):
                    log.warning("%s: breaking the lock of %s: %s", store_path,
                                describe_holder(holder or {}), reason)
            raise StoreError(f"{store_path}: could not take the lock {path}: it keeps changing hands; another run "
                             "is starting on the same store")
        finally:
            tmp.unlink(missing_ok=True)

    def _start_refresh(self) -> None:
        self._thread = threading.Thread(target=self._refresh, name="store-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                os.utime(self.path)
            except OSError:
                return  # the lock was broken or the folder went away: nothing to keep alive

    def held(self) -> bool:
        """True if the lock file still holds this lock's record (nobody broke it)."""
        holder, _ = _read(self.path)
        return bool(holder) and holder.get("token") == self.record["token"]

    def release(self) -> None:
        """Give the lock back (idempotent); a lock file that is no longer this one's is left alone."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stale_reason(holder: dict | None, age_s: float, job_id: str | None, stale_after_s: float) -> str | None:
    """Why the lock of ``holder`` (touched ``age_s`` ago) may be taken by this process, or None."""
    from ..progress import process_gone

    if holder is None:
        return (f"its file is unreadable and was not touched for {_duration(age_s)}" if age_s > stale_after_s
                else None)
    from ..progress import _pid_namespace

    if process_gone(holder):
        return f"process {holder.get('pid')} is no longer running on this host"
    seen_alive = (holder.get("host") == socket.gethostname()  # this host can see the process, and it lives
                  and holder.get("pid_ns") in (None, _pid_namespace()))
    if job_id and holder.get("job_id") == job_id and not seen_alive:
        return f"it belongs to an earlier start of the same SLURM job {job_id} (a requeue)"
    if age_s > stale_after_s:
        return f"its holder has not refreshed it for {_duration(age_s)} (more than {_duration(stale_after_s)})"
    return None


def _break(path: Path, holder: dict | None) -> bool:
    """Move the stale lock file aside and delete it, if it still is ``holder``'s; True when it was removed.
    Two processes breaking the same lock: one moves it, the other finds it gone; a lock that changed hands
    meanwhile is put back."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved, _ = _read(aside)
    if (moved or {}).get("token") != (holder or {}).get("token"):
        try:
            os.link(aside, path)  # someone took the lock in between: give it back
        except OSError as error:
            if error.errno != errno.EEXIST:
                raise
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
