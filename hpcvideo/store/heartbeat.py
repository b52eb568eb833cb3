"""Heartbeats and the per-tick log in the run store: where they live and how they are written and read.

::

    RUN.zarr/heartbeat/             zarr group (attrs empty)
      rank<R>/zarr.json             an empty zarr group whose attrs are {"heartbeat": record}
      ticks                         (num_ticks, 2) float64: per tick [wall s, end time (unix s)], NaN
                                    where not run yet (RunStore.record_ticks, one writer: rank 0)

A heartbeat record is plain JSON in zarr's own group-metadata format, written to a temp file and renamed
(atomic on POSIX file systems), so :func:`write_heartbeat` needs only the store's path, no zarr handle:
every rank writes its own record, and ranks other than 0 hold no RunStore. The store stays a valid
zarr hierarchy (``xarray.open_zarr`` and zarr listings see the records as empty groups). What a record
holds and when it is written is :mod:`hpcvideo.progress`'s business; this module only stores it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import zarr

HEARTBEAT_DIR = "heartbeat"
_GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # same temp name pattern as zarr's LocalStore, so RunStore.sweep_orphans removes leftovers
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def heartbeat_path(store_path, rank: int) -> Path:
    """The file holding rank ``rank``'s heartbeat record in the run store at ``store_path``."""
    return Path(store_path) / HEARTBEAT_DIR / f"rank{int(rank)}" / "zarr.json"


def ensure_heartbeat_group(store_path) -> None:
    """Create the (empty) ``heartbeat`` group of the run store at ``store_path`` if it is not there yet.

    Any rank may call it; concurrent calls write the same file atomically. OSError if the store's
    directory cannot be written."""
    group = Path(store_path) / HEARTBEAT_DIR / "zarr.json"
    if not group.exists():
        _write_json_atomic(group, _GROUP_META)


def write_heartbeat(store_path, rank: int, record: dict) -> None:
    """Replace rank ``rank``'s heartbeat record (a JSON-serialisable dict) atomically.

    One writer per rank; no zarr handle is opened. OSError if the store's directory cannot be
    written (e.g. it was moved or removed)."""
    _write_json_atomic(heartbeat_path(store_path, rank), {**_GROUP_META, "attributes": {"heartbeat": record}})


def read_heartbeats(store_path) -> list[dict]:
    """The heartbeat records of every rank that has reported, sorted by rank (unreadable ones skipped).

    Records of every attempt are returned; :func:`hpcvideo.progress.split_attempts` separates them."""
    root = Path(store_path) / HEARTBEAT_DIR
    records = []
    for meta in sorted(root.glob("rank*/zarr.json")):
        try:
            records.append(json.loads(meta.read_text())["attributes"]["heartbeat"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-copied store, or a file from elsewhere: not a heartbeat
    return sorted(records, key=lambda r: r.get("rank", 0))


class TicksMixin:
    """The per-tick log ``heartbeat/ticks`` of :class:`hpcvideo.store.RunStore` (written through the handle)."""

    TICKS_PATH, TICKS_CHUNK = f"{HEARTBEAT_DIR}/ticks", 4096

    def record_ticks(self, ticks: np.ndarray, values: np.ndarray) -> None:
        """Write per-tick figures: ``values`` (k, 2) float64 = [wall s, end time unix s] of tick indices
        ``ticks`` (k,) into ``heartbeat/ticks`` (grown as needed). One writer (rank 0)."""
        self._require_writable()
        ticks, values = np.asarray(ticks, dtype=np.int64), np.asarray(values, dtype=np.float64)
        if ticks.ndim != 1 or values.shape != (len(ticks), 2) or (ticks < 0).any():
            raise ValueError(f"record_ticks needs ticks (k,) >= 0 and values (k, 2), got {ticks.shape}, {values.shape}")
        if not len(ticks):
            return
        try:
            arr = zarr.open_array(self._zstore, path=self.TICKS_PATH, mode="r+", zarr_format=3)
        except FileNotFoundError:
            arr = self._root.create_array(self.TICKS_PATH, shape=(0, 2), chunks=(self.TICKS_CHUNK, 2),
                                          dtype="float64", fill_value=np.nan, dimension_names=("tick", "field"))
        if arr.shape[0] <= ticks.max():
            arr.resize((int(ticks.max()) + 1, 2))
        lo, hi = int(ticks.min()), int(ticks.max()) + 1
        block = arr[lo:hi]
        block[ticks - lo] = values
        arr[lo:hi] = block

    def tick_times(self) -> np.ndarray:
        """(num_ticks_recorded, 2) float64 [wall s, end time unix s] per tick; NaN rows not run (yet)."""
        try:
            return zarr.open_array(self._zstore, path=self.TICKS_PATH, mode="r", zarr_format=3)[:]
        except FileNotFoundError:
            return np.empty((0, 2))
