"""Under mpiexec -n N: the two-expert tiny Wan2.2 (hpcvideo/models/tiny_wan22.py) run to completion by both
strategies on N ranks, each into a store next to OUT (DualParal: every stage holds its layers of both experts;
Video-Infinity: one clip per rank). tests/test_wan22.py compares them with the same runs on one rank."""

from pathlib import Path

from hpcvideo.config import load_config
from hpcvideo.layout import resolve_config
from hpcvideo.runner import run

# name -> (preset, overrides); the model folder is added. guidance_scale_2 differs from guidance_scale, so
# the low-noise expert's steps are told apart by their scale too.
RUNS = {
    "dualparal": ("tiny-test", ["sampling.guidance_scale_2=3.0"]),
    "videoinfinity": ("tiny-vi-wan", ["sampling.guidance_scale_2=3.0"]),
}


def run_experts(env, out: str, folder: str) -> dict:
    """Every run of :data:`RUNS` on this world; returns {name: store path} (the same on every rank)."""
    paths = {}
    for name, (preset, overrides) in RUNS.items():
        path = Path(out).parent / f"experts-{name}-{env.world_size}.zarr"
        cfg = load_config(preset, [f"model.path={folder}", *overrides], output=path)
        run(resolve_config(cfg, env.world_size), env, progress=False)
        env.comm.barrier()
        paths[name] = str(path)
    return paths
