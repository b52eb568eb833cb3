"""Fault injection for the resume and failure tests (never set in production).

``HPCVIDEO_FAULT="[raise:]point:index[@rank]"`` makes the process fail when it reaches that point:
"tick:N" at the start of tick N, "latents:J" / "frames:J" after block J's data is written and before
its done marker. Default: SIGKILL (nothing runs after it); with the "raise:" prefix a RuntimeError
is raised instead; with a signal's name as prefix ("SIGINT:tick:3", "SIGSTOP:tick:3@1") the process sends
itself that signal and goes on (as when Ctrl-C, ``kill`` or SLURM signals it right there). "@R" picks
rank R (default: rank 0).

The variable is read once, at the edge (``hpcvideo generate``, the submitit job, or the runner's start
when its caller passed nothing), into a :class:`FaultPlan` that is handed down to where faults fire::

    faults = FaultPlan.from_env()           # once per process
    faults.fire("tick", tick, rank=rank)    # at the point; a no-op unless it is the planned one
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping

FAULT_VAR = "HPCVIDEO_FAULT"


@dataclass(frozen=True)
class FaultPlan:
    """The one planned fault of a process (``point`` None: none). ``action``: "kill" (SIGKILL), "raise"
    (RuntimeError) or a signal's name ("SIGINT": sent to this process, which goes on)."""

    point: str | None = None
    index: int = 0
    rank: int = 0
    action: str = "kill"

    @classmethod
    def parse(cls, spec: str | None) -> FaultPlan:
        """The plan of a ``[raise:]point:index[@rank]`` string (None or "": no fault). Raises ValueError naming
        the variable, the value and the allowed form."""
        if not spec:
            return cls()
        text, action = spec, "kill"
        if text.startswith("raise:"):
            action, text = "raise", text[len("raise:"):]
        elif text.startswith("SIG"):
            action, _, text = text.partition(":")
            if action not in signal.Signals.__members__:
                raise ValueError(f"{FAULT_VAR}={spec!r}: {action!r} is not a signal name; use e.g. 'SIGINT:tick:3'")
        where, _, who = text.partition("@")
        point, _, index = where.partition(":")
        try:
            return cls(point=point, index=int(index), rank=int(who or 0), action=action)
        except ValueError:
            raise ValueError(f"{FAULT_VAR}={spec!r}: expected '[raise:]point:index[@rank]' with integer index and "
                             f"rank, e.g. 'tick:3' or 'raise:frames:1@0'") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan:
        """The plan in ``environ[HPCVIDEO_FAULT]`` (default: this process's environment)."""
        return cls.parse((os.environ if environ is None else environ).get(FAULT_VAR))

    def fire(self, point: str, index: int, *, rank: int = 0) -> None:
        """Fail here if this is the planned point, index and rank: SIGKILL this process, or raise RuntimeError."""
        if self.point is None or (point, index, rank) != (self.point, self.index, self.rank):
            return
        if self.action == "raise":
            raise RuntimeError(f"injected fault at {point} {index} on rank {rank} ({FAULT_VAR})")
        if self.action.startswith("SIG"):
            os.kill(os.getpid(), signal.Signals[self.action])
            return
        os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultPlan()  # immutable: nothing fires
