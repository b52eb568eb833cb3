"""Which checkpoint a resume continues from, given what the store's blocks verify (no torch here).

A run resumed from a checkpoint recomputes the blocks from the checkpoint's ``stale_from`` on and relies on
every block before it being on disk. :func:`plan_resume` reads every done block back
(:meth:`~hpcvideo.store.RunStore.unverified_blocks`), finds the first block that is not done and intact,
and picks the newest intact checkpoint that recomputes it (``stale_from`` at or before it): the current or
previous record of ``"resume"``, of the ``"extend"`` snapshot, or none (from scratch, tick 0). A block below a
checkpoint's ``frames_from_latents`` whose only fault is frames not done yet (decoded on another rank when the
checkpoint was taken; a resume decodes them again from the block's intact latents) does not count against
that checkpoint. The
checkpoints that a run of ``num_units`` blocks can continue from:

* ``"resume"``: one of the same run (``num_blocks == num_units``), or of a shorter run taken before its
  end effects (``tick <= num_blocks``: also a state of the longer run);
* ``"extend"``: the snapshot of a run of ``num_blocks <= num_units`` blocks at ``tick <= num_blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import StoreError
from .checkpoints import TAIL_KIND
from .integrity import Damage

KINDS = ("resume", "extend")


@dataclass
class ResumePlan:
    """What :func:`plan_resume` chose. ``blob``/``meta``/``kind``: the checkpoint (None: from scratch);
    ``first_bad``: the first block not done and intact (num_blocks: none); ``damage``: done blocks that do
    not verify; ``skipped``: one line per intact checkpoint passed over because it would not recompute
    ``first_bad``; ``unverified``: done blocks whose markers keep no checksum (stores made before them)."""

    blob: bytes | None = None
    meta: dict | None = None
    kind: str | None = None
    first_bad: int = 0
    damage: list[Damage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unverified: int = 0
    repairs: list[str] = field(default_factory=list)

    @property
    def recompute_from(self) -> int:
        """The first block the run writes again: the checkpoint's ``stale_from`` (0 from scratch)."""
        return 0 if self.meta is None else int(self.meta.get("stale_from", 0))

    def describe(self, store) -> str | None:
        """One paragraph for the log when damage or a missing marker forces recomputing blocks a newer
        checkpoint covers; None when nothing is recomputed beyond an ordinary resume."""
        if not self.damage and not self.skipped:
            return None
        lines = []
        if self.damage:
            shown = "; ".join(str(d) for d in self.damage[:8]) + (" ..." if len(self.damage) > 8 else "")
            lines.append(f"{len(self.damage)} done block part(s) do not verify: {shown}")
        where = ("from scratch (tick 0): no intact checkpoint precedes it" if self.blob is None else
                 f"from checkpoint '{self.kind}' at tick {self.meta['tick']}, which recomputes blocks "
                 f"{self.meta.get('stale_from', 0)} onwards")
        lines.append(f"block {self.first_bad} is the first not done and intact; resuming {where}")
        if self.skipped:
            lines.append("passed over: " + "; ".join(self.skipped))
        return f"run store {store.path}: " + ". ".join(lines)


def usable(kind: str, meta: dict, num_units: int) -> bool:
    """True when checkpoint ``meta`` of ``kind`` is a state of a run of ``num_units`` blocks (module doc)."""
    if kind == "resume":
        return meta["num_blocks"] == num_units or meta["tick"] <= meta["num_blocks"]
    return meta["num_blocks"] <= num_units and meta["tick"] <= meta["num_blocks"]


def _tail_block(store) -> int | None:
    if store.latest_checkpoint(TAIL_KIND) is None:
        return None
    tail = store.read_frames_tail()
    return None if tail is None else tail[0]


def plan_resume(store, num_units: int, *, verify: bool = True, repair: bool = False) -> ResumePlan:
    """Choose the checkpoint a run of ``num_units`` blocks continues from (module doc).

    ``verify``: read every done block back first (False: take the newest usable checkpoint, as before
    checksums). ``repair`` (a writable store, the rank that resumes): first make every checkpoint pointer
    name intact slots (:meth:`~hpcvideo.store.RunStore.repair_checkpoints`), and afterwards delete the
    undecodable chunks of the blocks the run writes again (``plan.repairs``: one line each). Raises
    StoreError when the newest ``"resume"`` checkpoint belongs to a shorter run past its end effects and
    no extension snapshot is found (and no damage forces a restart from scratch)."""
    plan = ResumePlan(first_bad=store.num_blocks)
    if repair:
        plan.repairs = store.repair_checkpoints()
    bad: set[int] = set()  # blocks not done and intact
    frames_only: set[int] = set()  # of those, the blocks whose only fault is frames not done
    if verify:
        tail_block = _tail_block(store)
        plan.first_bad, plan.damage = store.unverified_blocks(tail_block=tail_block)
        plan.unverified = sum(1 for kind in ("latents", "frames") if not store.has_checksums(kind))
        damaged = {d.block for d in plan.damage}
        latents_done, frames_done = store.done("latents"), store.done("frames")
        frames_missing = {j for j in range(store.num_blocks) if not frames_done[j] and j != tail_block}
        bad = damaged | frames_missing | {j for j in range(store.num_blocks) if not latents_done[j]}
        frames_only = {j for j in frames_missing if latents_done[j] and j not in damaged}
    candidates = []
    unusable_resume = None
    for order, kind in enumerate(KINDS):
        for age, meta in enumerate(store.checkpoint_records(kind)):
            if usable(kind, meta, num_units):
                candidates.append((meta["tick"], -order, -age, kind, meta))
            elif kind == "resume" and unusable_resume is None:
                unusable_resume = meta
    candidates.sort(key=lambda c: c[:3], reverse=True)  # newest tick first; "resume" before "extend"
    loaded_errors = []
    for _, _, _, kind, meta in candidates:
        stale_from = meta.get("stale_from")
        first_bad = plan.first_bad
        if meta.get("frames_from_latents") is not None:
            excused = {j for j in frames_only if j < meta["frames_from_latents"]}
            first_bad = min(bad - excused, default=store.num_blocks)
        if verify and (stale_from is None and plan.damage or stale_from is not None and stale_from > first_bad):
            plan.skipped.append(f"'{kind}' at tick {meta['tick']} (recomputes from block "
                                f"{'?' if stale_from is None else stale_from})")
            continue
        try:
            blob = store._read_slot(kind, meta)
        except Exception as error:  # noqa: BLE001 - a damaged slot: the next candidate
            loaded_errors.append(f"'{kind}' slot {meta['slot']} at tick {meta['tick']}: {error}")
            continue
        plan.blob, plan.meta, plan.kind = blob, meta, kind
        break
    if loaded_errors:
        plan.skipped.extend(f"{e} (does not verify)" for e in loaded_errors)
    if plan.blob is None and unusable_resume is not None and not plan.damage and not candidates:
        raise StoreError(
            f"{store.path}: the last checkpoint (tick {unusable_resume['tick']}, {unusable_resume['num_blocks']} blocks) "
            f"cannot be extended to {num_units} blocks and no extension snapshot was found")
    if repair:
        rewritten = [(kind, j) for j in range(plan.recompute_from, store.num_blocks) for kind in ("latents", "frames")]
        rewritten += [("frames", j) for j in sorted(frames_only) if j < plan.recompute_from]  # decoded again (above)
        for path in store.drop_unreadable_chunks([*plan.damage, *rewritten]):
            plan.repairs.append(f"removed the undecodable chunk {path} (its blocks are written again)")
    return plan
