"""Synthetic motion clips with captions, made procedurally (numpy only, no download).

Each clip is one coloured shape (circle, square or triangle) moving in a straight line at a constant
speed over a plain, gradient or textured background; a square or triangle may also turn (spin) as it
moves. The caption says what is seen, with words from :data:`VOCABULARY` only::

    "a red circle moving left on a blue background"
    "a yellow square turning and moving up on a green gradient background"
    "a white triangle moving right on a textured purple background"

Everything is a pure function of ``(seed, index)``: ``make_clip(seed, index)`` returns the same
pixels and caption on every machine. Frames are float32 RGB in [0, 1], shape (num_frames, H, W, 3).

Motion of a "moving <direction>" clip: the shape's centre moves ``speed_px`` pixels per frame in the
named direction (image x grows to the right, y grows downwards, so "up" is -y) and never leaves the
frame within the clip (the start is drawn so that the whole path fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shape colours (bright) and background colours (dark), RGB in [0, 1]. Every shape colour differs
# from every background colour by far more than the renderer's anti-aliasing, so a colour can be
# found in a generated frame by distance to these references (see :func:`colour_mask`).
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.45, 1.00),
    "yellow": (0.98, 0.90, 0.10),
    "white": (0.97, 0.97, 0.97),
    "orange": (1.00, 0.55, 0.05),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "blue": (0.08, 0.12, 0.38),
    "green": (0.06, 0.28, 0.12),
    "purple": (0.26, 0.08, 0.32),
    "gray": (0.30, 0.30, 0.32),
    "black": (0.04, 0.04, 0.05),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND_KINDS = ("plain", "gradient", "textured")

VOCABULARY = sorted(
    {"a", "an", "moving", "on", "background", "and", "turning", "gradient", "textured"}
    | set(SHAPE_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES) | set(DIRECTIONS)
)


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """What one clip shows (all the random choices of :func:`sample_spec`)."""

    shape: str
    colour: str
    direction: str
    background: str  # colour name of the background
    background_kind: str  # plain | gradient | textured
    turning: bool  # square/triangle spins as it moves
    radius_px: float  # half the shape's size, pixels
    speed_px: float  # pixels per frame along `direction`
    start_xy: tuple[float, float]  # centre at frame 0, pixels (x right, y down)
    angle0_rad: float
    spin_rad: float  # radians per frame (0 unless turning)
    texture_seed: int

    @property
    def caption(self) -> str:
        """The clip's caption, e.g. "a red circle moving left on a blue gradient background"."""
        motion = f"turning and moving {self.direction}" if self.turning else f"moving {self.direction}"
        back = {"plain": f"a {self.background}", "gradient": f"a {self.background} gradient",
                "textured": f"a textured {self.background}"}[self.background_kind]
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {motion} on {back} background"


def caption_for(colour: str, shape: str, direction: str, background: str, *, kind: str = "plain",
                turning: bool = False) -> str:
    """A caption in the training form (for prompts); raises ValueError for a word outside the data."""
    for value, allowed, key in ((colour, SHAPE_COLOURS, "colour"), (shape, SHAPES, "shape"),
                                (direction, DIRECTIONS, "direction"), (background, BACKGROUND_COLOURS, "background"),
                                (kind, BACKGROUND_KINDS, "kind")):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not in the demo data; allowed: {', '.join(allowed)}")
    spec = ClipSpec(shape=shape, colour=colour, direction=direction, background=background, background_kind=kind,
                    turning=turning, radius_px=0, speed_px=0, start_xy=(0, 0), angle0_rad=0, spin_rad=0,
                    texture_seed=0)
    return spec.caption


def sample_spec(rng: np.random.Generator, *, num_frames: int, height: int, width: int) -> ClipSpec:
    """Draw one clip's content from ``rng``; the path of the shape stays inside the frame."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    background = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    kind = BACKGROUND_KINDS[rng.choice(3, p=[0.5, 0.3, 0.2])]
    turning = shape != "circle" and rng.random() < 0.3
    size = min(height, width)
    radius = float(rng.uniform(0.10, 0.16) * size)
    speed = float(rng.uniform(0.8, 1.4) * size / 64.0)  # 64 px frame: 0.8..1.4 px per frame
    travel = speed * (num_frames - 1)
    dx, dy = DIRECTIONS[direction]
    margin = radius + 1.0

    def start(extent: float, d: float) -> float:
        lo, hi = margin, extent - margin
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return float(rng.uniform(lo, max(lo, hi)))

    return ClipSpec(
        shape=shape, colour=colour, direction=direction, background=background, background_kind=kind,
        turning=bool(turning), radius_px=radius, speed_px=speed, start_xy=(start(width, dx), start(height, dy)),
        angle0_rad=float(rng.uniform(0, 2 * np.pi)), spin_rad=float(rng.uniform(0.08, 0.2)) if turning else 0.0,
        texture_seed=int(rng.integers(2**31)),
    )


def _background(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 background image."""
    base = np.asarray(BACKGROUND_COLOURS[spec.background], np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if spec.background_kind == "plain":
        return np.broadcast_to(base, (height, width, 3)).copy()
    if spec.background_kind == "gradient":
        t = (yy / max(height - 1, 1))[..., None]  # dark at the top, lighter at the bottom
        return (base * (0.55 + 0.9 * t)).astype(np.float32)
    rng = np.random.default_rng(spec.texture_seed)
    fx, fy = rng.uniform(2, 5, size=2) * 2 * np.pi / width
    phase = rng.uniform(0, 2 * np.pi, size=2)
    pattern = 0.5 * np.sin(fx * xx + phase[0]) * np.sin(fy * yy + phase[1]) + 0.5  # 0..1
    return (base * (0.6 + 0.8 * pattern[..., None])).astype(np.float32)


def _shape_coverage(spec: ClipSpec, cx: float, cy: float, angle: float, height: int, width: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: anti-aliased coverage of the shape (1 px soft edge)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # shape frame
    r = spec.radius_px
    if spec.shape == "circle":
        dist = np.hypot(x, y) - r
    elif spec.shape == "square":
        dist = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    else:  # equilateral triangle, circumradius ~1.15 r: max of three half-plane distances
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        dist = np.max([nx * u + ny * v for nx, ny in normals], axis=0) - 0.58 * r
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def render_clip(spec: ClipSpec, *, num_frames: int, height: int, width: int, return_coverage: bool = False):
    """Frames of ``spec``: float32 (num_frames, height, width, 3) in [0, 1]; with ``return_coverage``
    also the shape's coverage per pixel, float32 (num_frames, height, width) in [0, 1]."""
    back = _background(spec, height, width)
    colour = np.asarray(SHAPE_COLOURS[spec.colour], np.float32)
    dx, dy = DIRECTIONS[spec.direction]
    frames = np.empty((num_frames, height, width, 3), np.float32)
    coverage = np.empty((num_frames, height, width), np.float32)
    for f in range(num_frames):
        cx = spec.start_xy[0] + dx * spec.speed_px * f
        cy = spec.start_xy[1] + dy * spec.speed_px * f
        coverage[f] = _shape_coverage(spec, cx, cy, spec.angle0_rad + spec.spin_rad * f, height, width)
        alpha = coverage[f][..., None]
        frames[f] = back * (1 - alpha) + colour * alpha
    frames = np.clip(frames, 0.0, 1.0)
    return (frames, coverage) if return_coverage else frames


def make_clip(seed: int, index: int, *, num_frames: int = 21, height: int = 64, width: int = 64) -> tuple[np.ndarray, str]:
    """Clip ``index`` of the data set ``seed``: (frames float32 (F, H, W, 3) in [0, 1], caption)."""
    rng = np.random.default_rng([int(seed), int(index)])
    spec = sample_spec(rng, num_frames=num_frames, height=height, width=width)
    return render_clip(spec, num_frames=num_frames, height=height, width=width), spec.caption


def make_batch(seed: int, indices, *, num_frames: int = 21, height: int = 64, width: int = 64,
               return_coverage: bool = False):
    """Clips ``indices`` as one array: (video float32 (B, 3, F, H, W) in [-1, 1], captions list of B str),
    with ``return_coverage`` also the shapes' coverage, float32 (B, F, H, W) in [0, 1].

    The layout (channels first, values in [-1, 1]) is what ``AutoencoderKLWan`` takes.
    """
    clips, captions, coverages = [], [], []
    for i in indices:
        spec = sample_spec(np.random.default_rng([int(seed), int(i)]), num_frames=num_frames, height=height,
                           width=width)  # as make_clip
        frames, coverage = render_clip(spec, num_frames=num_frames, height=height, width=width, return_coverage=True)
        clips.append(frames.transpose(3, 0, 1, 2))  # (F, H, W, 3) -> (3, F, H, W)
        captions.append(spec.caption)
        coverages.append(coverage)
    video = np.stack(clips) * 2.0 - 1.0
    return (video, captions, np.stack(coverages)) if return_coverage else (video, captions)


def colour_mask(frames: np.ndarray, colour: str, *, tolerance: float = 0.25) -> np.ndarray:
    """Pixels close to shape colour ``colour``: bool (..., H, W) from frames (..., H, W, 3).

    ``frames`` are uint8 (0..255) or float in [0, 1]. A pixel matches when its RGB distance to the
    colour is below ``tolerance`` (units of [0, 1] RGB) and it is nearer to this colour than to any
    other shape colour.
    """
    x = np.asarray(frames, np.float32)
    if np.asarray(frames).dtype == np.uint8:
        x = x / 255.0
    refs = np.asarray(list(SHAPE_COLOURS.values()), np.float32)  # (K, 3)
    dist = np.linalg.norm(x[..., None, :] - refs, axis=-1)  # (..., H, W, K)
    k = list(SHAPE_COLOURS).index(colour)
    return (dist[..., k] < tolerance) & (dist.argmin(-1) == k)


def colour_centroids(frames: np.ndarray, colour: str, *, tolerance: float = 0.25, min_pixels: int = 3) -> np.ndarray:
    """Per frame, the (x, y) pixel centroid of ``colour``: float (F, 2); NaN where fewer than
    ``min_pixels`` pixels match. ``frames``: (F, H, W, 3) uint8 or float in [0, 1]."""
    mask = colour_mask(frames, colour, tolerance=tolerance)  # (F, H, W)
    out = np.full((mask.shape[0], 2), np.nan)
    for f, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(xs) >= min_pixels:
            out[f] = (xs.mean() + 0.5, ys.mean() + 0.5)
    return out
