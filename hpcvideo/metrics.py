"""Seam metric: do block or clip boundaries show in the frames of a run store?

A video made block by block (DualParal) or clip by clip (Video-Infinity) can jump where one unit
ends and the next begins. With ``d[t] = mean |frame[t] - frame[t-1]|`` (over H, W, RGB; uint8 units)
and a boundary at pixel frame ``b`` (the first frame of a new unit), the difference *across* the seam
is ``d[b]`` and the differences *within* units are every other ``d[t]``:

* per boundary k: ``ratio[k] = d[b_k] / mean(within differences of the two units that meet at b_k)``;
* overall: ``mean(d at all seams) / mean(all within differences)``.

A ratio near 1 means the seam moves the picture no more than the video's average frame step; a ratio
of 5 means a visible jump. That average is not what a seamless video scores, though: a Wan VAE decodes
each latent frame to 4 pixel frames, and the steps between two latent frames (pixel frames 4k + 1) move
more than the steps inside one (the demo model decodes each latent frame on its own: its own latent-frame
steps move about 2.75x the steps inside one, so a video with no seam at all scores about 2 on ``overall``).
So the metric also compares the seams with the video's *other latent-frame boundaries*:

* ``latent_mean``: the mean difference at the pixel frames where a latent frame starts (every
  ``vae_temporal_stride``-th frame from 1; every frame for a per-frame VAE) that are no unit boundary;
* ``normalised`` = mean seam difference / ``latent_mean`` over the seams where the prompt stays the same:
  about 1 = a seam moves the picture like any other latent step of the model's own decoder, the honest
  "seam invisible"; ``normalised_prompt_switch`` the same over the seams where the prompt schedule
  switches (the prompt changes the content there by design), ``normalised_all`` over every seam;
  ``prompt_switches``: those boundaries (a boundary b whose unit starts a new prompt: a ``from_frame`` of
  ``sampling.prompts`` in (previous boundary, b]). Frames are read ``batch_frames`` at a time (only the leading run of blocks
whose frames are done, so a live store works): memory is one batch of frames plus a few numbers per
unit, whatever the length.

Boundaries, by default from the store (:func:`unit_boundaries`): the store attribute
``seam_boundaries`` when a strategy wrote one (``{"kind": "clip", "frames": [...]}``), else the first
pixel frame of every store unit j >= 1 (``RunStore.frame_range(j)[0]``). The store's chunks are
aligned to the strategy's unit (docs/DESIGN.md, section 5), so for DualParal this is block j's first frame,
``RunConfig.block_first_frame(j)``, and for a clip-parallel strategy (``strategy.name`` naming
Video-Infinity or containing "clip") the clip boundaries; ``kind`` says which.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .store import RunStore

CLIP_STRATEGIES = ("videoinfinity", "video_infinity", "video-infinity")


def _open(store_or_path) -> RunStore:
    return store_or_path if isinstance(store_or_path, RunStore) else RunStore.open(store_or_path, mode="r")


def unit_boundaries(store_or_path) -> tuple[str, list[int]]:
    """(kind, pixel frames where a new block/clip starts, ascending, excluding 0) of a run store.

    kind: "block" | "clip" (from ``strategy.name`` in the stored config) or the ``kind`` of a
    ``seam_boundaries`` attribute. See the module docstring for the rule."""
    store = _open(store_or_path)
    custom = store.attrs.get("seam_boundaries")
    if custom is not None:
        if isinstance(custom, dict):
            return str(custom.get("kind", "custom")), sorted(int(b) for b in custom["frames"] if int(b) > 0)
        return "custom", sorted(int(b) for b in custom if int(b) > 0)
    strategy = store.config.get("strategy", {})
    name = str(strategy.get("name", "")).lower() if isinstance(strategy, dict) else ""
    kind = "clip" if name in CLIP_STRATEGIES or "clip" in name else "block"
    return kind, [store.frame_range(j)[0] for j in range(1, store.num_blocks)]


def frame_differences(store_or_path, *, batch_frames: int = 32, stop: int | None = None):
    """Yield (t0, d) with d (k,) float64: d[i] = mean |frame[t0+i] - frame[t0+i-1]| (uint8 units),
    for t = 1 .. num_frames_ready - 1 (or ``stop`` - 1), streaming ``batch_frames`` frames at a time."""
    store = _open(store_or_path)
    previous = None
    for start, frames in store.iter_frames(batch_frames):  # (b, H, W, 3) uint8
        if stop is not None and start >= stop:
            return
        if stop is not None:
            frames = frames[: stop - start]
        x = frames.astype(np.int16)
        if previous is not None:
            x = np.concatenate([previous, x])
        if len(x) > 1:
            d = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3), dtype=np.float64)  # (len(x) - 1,)
            yield (start if previous is not None else 1), d
        previous = x[-1:]


def _ratio(a: float, b: float) -> float | None:
    return None if not np.isfinite(a) or not np.isfinite(b) or b == 0 else float(a / b)


def seam_metric(store_or_path, *, boundaries: Sequence[int] | None = None, batch_frames: int = 32,
                return_frame_diff: bool = False) -> dict[str, Any]:
    """Seam metric of a run store (finished or still being written; only ready frames are read).

    ``boundaries``: pixel frames where a new block/clip starts (default :func:`unit_boundaries`).
    Boundaries at or beyond the last ready frame are not evaluated. Returns (JSON-serialisable)::

        kind            "block" | "clip" | "custom"
        num_frames      frames read;  num_seams  boundaries evaluated
        boundaries      [b_k] evaluated;  seam_diff [d[b_k]];  within_diff [local within mean];
        ratio           [seam_diff / within_diff] per boundary (None where the denominator is 0)
        seam_mean, within_mean, overall (= seam_mean / within_mean; None if undefined)
        worst_boundary, worst_ratio     the boundary with the largest ratio (None if none)
        latent_step, latent_mean, prompt_switches, normalised, normalised_prompt_switch, normalised_all
                        the seams against the other latent-frame boundaries (module docstring)
        frame_diff      [d[1], ..., d[F-1]] only if return_frame_diff (F floats)

    Raises ValueError for boundaries that are not positive integers.
    """
    store = _open(store_or_path)
    if boundaries is None:
        kind, bounds = unit_boundaries(store)
    else:
        kind, bounds = "custom", sorted({int(b) for b in boundaries})
        if any(b <= 0 for b in bounds):
            raise ValueError(f"boundaries must be pixel frame indices > 0, got {list(boundaries)}")
    num_frames = store.num_frames_ready()
    bounds = np.array([b for b in bounds if b < num_frames], dtype=np.int64)
    # unit u = frames [edges[u], edges[u+1]); within sums/counts per unit, seam difference per boundary
    within_sum = np.zeros(len(bounds) + 1)
    within_count = np.zeros(len(bounds) + 1)
    seam = np.full(len(bounds), np.nan)
    stride = max(int(getattr(store, "vae_temporal_stride", 1) or 1), 1)
    latent_sum = latent_count = 0.0  # latent-frame boundaries that are no seam
    curve = [] if return_frame_diff else None
    for t0, d in frame_differences(store, batch_frames=batch_frames, stop=num_frames):
        t = np.arange(t0, t0 + len(d))
        unit = np.searchsorted(bounds, t, side="right")  # unit holding frame t
        is_seam = np.isin(t, bounds)
        seam[np.searchsorted(bounds, t[is_seam])] = d[is_seam]
        np.add.at(within_sum, unit[~is_seam], d[~is_seam])
        np.add.at(within_count, unit[~is_seam], 1)
        is_latent = ((t - 1) % stride == 0) & ~is_seam
        latent_sum += float(d[is_latent].sum())
        latent_count += int(is_latent.sum())
        if curve is not None:
            curve.extend(d.tolist())
    local = [(within_sum[k] + within_sum[k + 1]) / max(within_count[k] + within_count[k + 1], 1)
             if within_count[k] + within_count[k + 1] else np.nan for k in range(len(bounds))]
    ratios = [_ratio(s, w) for s, w in zip(seam, local)]
    seam_mean = float(np.mean(seam)) if len(seam) else None
    within_mean = float(within_sum.sum() / within_count.sum()) if within_count.sum() else None
    valid = [(r, int(b)) for r, b in zip(ratios, bounds) if r is not None]
    worst = max(valid) if valid else (None, None)
    out = {
        "kind": kind, "num_frames": int(num_frames), "num_seams": int(len(bounds)),
        "boundaries": [int(b) for b in bounds], "seam_diff": [float(s) for s in seam],
        "within_diff": [None if not np.isfinite(w) else float(w) for w in local], "ratio": ratios,
        "seam_mean": seam_mean, "within_mean": within_mean,
        "overall": None if seam_mean is None or within_mean is None else _ratio(seam_mean, within_mean),
        "worst_boundary": worst[1], "worst_ratio": worst[0],
    }
    switches = prompt_switches(store, bounds)
    latent_mean = latent_sum / latent_count if latent_count else None
    switch = np.isin(bounds, switches)

    def normalised(mask) -> float | None:
        if latent_mean is None or not mask.any():
            return None
        return _ratio(float(np.mean(seam[mask])), latent_mean)

    out.update({"latent_step": stride, "latent_mean": latent_mean, "prompt_switches": [int(b) for b in switches],
                "normalised": normalised(~switch), "normalised_prompt_switch": normalised(switch),
                "normalised_all": normalised(np.ones(len(bounds), dtype=bool))})
    if curve is not None:
        out["frame_diff"] = curve
    return out


def prompt_switches(store_or_path, boundaries: Sequence[int]) -> list[int]:
    """The ``boundaries`` (ascending pixel frames where a unit starts) at which the stored config's prompt
    schedule switches: some ``sampling.prompts[i].from_frame`` lies in (previous boundary, boundary]."""
    store = _open(store_or_path)
    sampling = store.config.get("sampling", {}) if isinstance(store.config, dict) else {}
    starts = sorted(int(p["from_frame"]) for p in (sampling.get("prompts") or []) if isinstance(p, dict))
    out, previous = [], 0
    for b in sorted(int(x) for x in boundaries):
        if any(previous < f <= b for f in starts):
            out.append(b)
        previous = b
    return out
