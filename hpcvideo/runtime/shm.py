"""Stale MPICH shared-memory segments of a requeued SLURM job (``hpcvideo clean-shm``).

MPICH names a node's shared-memory segment after its "world id", the 32-bit FNV-1a hash of the PMI
key-value-space name, which under ``srun --mpi=pmi2`` is ``<job id>.<step id>``::

    /dev/shm/mpich_shm_<fnv1a("JOBID.STEPID") as hex>_<node index>     (and mpich_vci_..._<node index>)

A job killed by a requeue (or a time limit, or a crash) leaves these files behind, and the requeued
job gets the same job id and step ids again: its ranks open the stale segment, find it "ready", and
MPI_Init fails with "Message from rank 1 and tag 7 truncated" (measured with the mpich wheel 5.0.2
and SLURM 22.05). Removing the segments named after *this* job id before its first MPI step is safe:
no other job's processes use those names, and none of this allocation's ranks has started yet.
The submitit job and the sbatch scripts run this first, on every node (one task per node).

Local runs (``--ranks N`` on one machine, no SLURM job id) are covered too: a segment no process maps
any more is left over by a killed job (a live rank keeps its segment mapped from MPI_Init to
MPI_Finalize, which removes it). The parent of a local job removes those that appeared during its job
when mpiexec ends (:mod:`hpcvideo.runtime.signals`); ``hpcvideo clean-shm`` outside a SLURM job removes
every such segment older than :data:`LOCAL_MIN_AGE_S` (younger ones may belong to a job in MPI_Init).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def mpich_world_id(kvs_name: str) -> int:
    """MPICH's ``MPIR_Process.world_id``: 32-bit FNV-1a of the PMI KVS name."""
    value = 2166136261
    for byte in kvs_name.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def stale_segments(job_id: str, *, num_steps: int = 64, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Segments MPICH made for steps 0..num_steps-1 of ``job_id`` that still exist on this node."""
    found = []
    for step in range(num_steps):
        world = f"{mpich_world_id(f'{job_id}.{step}'):x}"
        for prefix in ("mpich_shm_", "mpich_vci_"):
            found.extend(sorted(shm_dir.glob(f"{prefix}{world}_*")))
    return found


def remove_stale_segments(job_id: str, *, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink this job's leftover MPICH segments on this node; returns what was removed.
    Call it only before the job's first MPI step of an allocation (see the module docstring)."""
    removed = []
    for path in stale_segments(job_id, shm_dir=shm_dir):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


PREFIXES = ("mpich_shm_", "mpich_vci_")
LOCAL_MIN_AGE_S = 60.0


def list_segments(shm_dir: Path = SHM_DIR) -> set[Path]:
    """Every MPICH segment (``mpich_shm_*``, ``mpich_vci_*``) in ``shm_dir`` now."""
    try:
        return {path for path in shm_dir.iterdir() if path.name.startswith(PREFIXES)}
    except OSError:
        return set()


def mapped_segments(shm_dir: Path = SHM_DIR) -> set[str] | None:
    """Names of the files of ``shm_dir`` that some process maps or holds open (``/proc/*/maps`` and
    ``/proc/*/fd``); None where ``/proc`` cannot be read (then nothing is known to be unused)."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    prefix, names = f"{shm_dir}/", set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "maps").read_text().splitlines():
                where = line.find(prefix)
                if where >= 0:
                    names.add(line[where + len(prefix):].removesuffix(" (deleted)"))
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    names.add(target[len(prefix):])
        except OSError:
            continue  # gone meanwhile, or another user's process
    return names


def remove_unused_segments(candidates, *, min_age_s: float = 0.0, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink those of ``candidates`` (paths in ``shm_dir``) that no process maps or holds open and that are
    at least ``min_age_s`` seconds old; returns what was removed (nothing where /proc cannot tell)."""
    import time

    candidates = [Path(path) for path in candidates]
    if not candidates:
        return []
    used = mapped_segments(shm_dir)
    if used is None:
        return []
    removed, now = [], time.time()
    for path in sorted(candidates):
        try:
            if path.name in used or now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def main(job_id: str | None = None) -> int:
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:  # a local machine: every segment that no process uses any more
        removed = remove_unused_segments(list_segments(), min_age_s=LOCAL_MIN_AGE_S)
        print(f"hpcvideo clean-shm: removed {len(removed)} unused MPICH segment(s) on {os.uname().nodename}"
              + (f": {', '.join(p.name for p in removed)}" if removed else ""), file=sys.stderr)
        return 0
    removed = remove_stale_segments(job_id)
    if removed:
        print(f"hpcvideo clean-shm: removed {len(removed)} stale MPICH segment(s) of job {job_id} on "
              f"{os.uname().nodename}: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return 0
