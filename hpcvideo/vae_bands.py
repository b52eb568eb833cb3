"""Bands of latent rows for the row-parallel VAE decode (:mod:`hpcvideo.parallel_vae`), and its rank-count rule.

Kept apart from :mod:`hpcvideo.parallel_vae` because it needs no torch: the checks ``hpcvideo generate --ranks N``
runs before it starts mpiexec (and ``check``/``plan``/``submit`` on a login node) import it without paying
torch's import (~1 s).
"""

from __future__ import annotations


def band_rows(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """[r0, r1) of each rank's band of ``num_rows`` latent rows (``numpy.array_split``'s sizes). Raises
    ValueError naming both numbers when a band would be empty (more ranks than latent rows)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    if num_rows < world_size:
        raise ValueError(f"patch-parallel VAE decode: {num_rows} latent rows (video.height / 8) cannot be split "
                         f"over world_size={world_size} ranks (each rank needs at least 1 row); use at most "
                         f"{num_rows} ranks or a taller video")
    base, extra = divmod(num_rows, world_size)
    bounds, r0 = [], 0
    for rank in range(world_size):
        r1 = r0 + base + (rank < extra)
        bounds.append((r0, r1))
        r0 = r1
    return bounds


def ranks_problem(cfg, world_size: int, spatial_factor: int = 8) -> str | None:
    """None unless ``runtime.vae_decode`` is ``rows`` and ``world_size`` ranks cannot each get a latent row of
    ``video.height`` (``spatial_factor``: the VAE's spatial stride; 8 (Wan2.1) before the model's facts are
    read, the model's own, e.g. Wan2.2 TI2V's 16, once they are)."""
    if getattr(cfg.runtime, "vae_decode", "auto") != "rows" or world_size <= 1:
        return None
    rows = cfg.video.height // spatial_factor
    if rows < world_size:
        return (f"runtime.vae_decode='rows' gives each rank a band of the {rows} latent rows of video.height="
                f"{cfg.video.height}, but the job has {world_size} ranks; allowed: at most {rows} ranks, a taller "
                "video, or runtime.vae_decode='auto'")
    return None
