"""Fault injection for the resume and failure tests (never set in production).

``HPCVIDEO_FAULT="[raise:]point:index[@rank]"`` makes the process fail when it reaches that point:
"tick:N" at the start of tick N, "latents:J" / "frames:J" after block J's data is written and before
its done marker. Default: SIGKILL (nothing runs after it); with the "raise:" prefix a RuntimeError
is raised instead. "@R" picks rank R (default: rank 0).
"""

from __future__ import annotations

import os
import signal


def fault(point: str, index: int, *, rank: int = 0) -> None:
    spec = os.environ.get("HPCVIDEO_FAULT")
    if not spec:
        return
    action = "kill"
    if spec.startswith("raise:"):
        action, spec = "raise", spec[len("raise:"):]
    where, _, who = spec.partition("@")
    if where != f"{point}:{index}" or int(who or 0) != rank:
        return
    if action == "raise":
        raise RuntimeError(f"injected fault at {point} {index} on rank {rank} (HPCVIDEO_FAULT)")
    os.kill(os.getpid(), signal.SIGKILL)
