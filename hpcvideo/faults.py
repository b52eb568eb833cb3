"""Fault injection for the resume tests (never set in production).

``HPCVIDEO_FAULT="point:index"`` SIGKILLs the process when it reaches that point: "tick:N" at the
start of tick N, "latents:J" / "frames:J" after block J's data is written and before its done
marker.
"""

from __future__ import annotations

import os
import signal


def fault(point: str, index: int) -> None:
    if os.environ.get("HPCVIDEO_FAULT") == f"{point}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
