"""Fault injection for the resume tests (never set in production).

``HPCVIDEO_FAULT="point:index"`` SIGKILLs the process when it reaches that point: "tick:N" at the
start of tick N, "latents:J" / "frames:J" after block J's data is written and before its done
marker. A suffix "@R" picks rank R (default: rank 0).
"""

from __future__ import annotations

import os
import signal


def fault(point: str, index: int, *, rank: int = 0) -> None:
    """SIGKILL this process if HPCVIDEO_FAULT names this point ("tick:3"; "tick:3@1" for rank 1 only,
    without "@" rank 0 only)."""
    spec = os.environ.get("HPCVIDEO_FAULT")
    if not spec:
        return
    where, _, who = spec.partition("@")
    if where == f"{point}:{index}" and int(who or 0) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
