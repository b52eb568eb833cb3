"""Frame arithmetic and rank layout (hpcvideo.layout): any frame count, rank counts a run can use."""

import json
from pathlib import Path

import pytest

from hpcvideo.config import load_config
from hpcvideo.layout import (
    block_frame_range,
    frames_for_latents,
    generated_latent_frames,
    latent_frames_for,
    model_num_layers,
    num_units,
    ranks_problem,
    resolve_config,
    videoinfinity_rank_counts,
)


@pytest.mark.parametrize("num_frames, wan, unet3d", [(1, 1, 1), (2, 2, 2), (5, 2, 5), (6, 3, 6), (21, 6, 21),
                                                     (22, 7, 22), (100, 26, 100), (1005, 252, 1005)])
def test_latent_frames_for_any_frame_count(num_frames, wan, unet3d):
    assert latent_frames_for(num_frames, "wan") == wan and latent_frames_for(num_frames, "unet3d") == unet3d
    # the fewest latent frames that decode to at least num_frames frames
    assert frames_for_latents(wan, "wan") >= num_frames > frames_for_latents(wan - 1, "wan")


@pytest.mark.parametrize("num_frames", [0, -1])
def test_latent_frames_for_refuses_less_than_one_frame(num_frames):
    with pytest.raises(ValueError, match=f"video.num_frames={num_frames} is out of range; allowed: any whole number >= 1"):
        latent_frames_for(num_frames)


def test_whole_blocks_and_frame_ranges_cut_at_the_video():
    cfg = load_config("demo-cpu", check_paths=False, num_frames=1000, overrides=["strategy.block_latent_frames=4"])
    # 251 latent frames, blocks of 4
    assert (cfg.num_latent_frames, num_units(cfg), generated_latent_frames(cfg)) == (251, 63, 252)
    assert block_frame_range(62, 4) == (989, 1005) and block_frame_range(62, 4, num_frames=1000) == (989, 1000)
    assert block_frame_range(0, 4, num_frames=1000) == (0, 13)


def test_ranks_problem_refuses_non_positive_rank_counts():
    cfg = load_config("demo-cpu", check_paths=False)
    for world_size in (0, -1):
        assert ranks_problem(cfg, world_size) == f"{world_size} ranks is not allowed; allowed: a whole number of ranks >= 1"


def test_ranks_problem_dualparal_stages_against_layers():
    cfg = load_config("demo-cpu", check_paths=False)
    assert model_num_layers(cfg) == 4
    assert ranks_problem(cfg, 4, num_layers=4) is None and ranks_problem(cfg, 64) is None  # blocks unknown: no verdict
    assert ranks_problem(cfg, 64, num_layers=4) == (
        "64 ranks cannot split the model's 4 transformer blocks into pipeline stages (DualParal: one stage of >= 1 "
        "block per rank); allowed: 1-4 ranks")
    split = load_config("demo-cpu", ["runtime.stage_layers=[1, 3]"], check_paths=False)
    assert ranks_problem(split, 2, num_layers=4) is None
    assert "gives 2 pipeline stage(s) but the job has 3 rank(s)" in ranks_problem(split, 3, num_layers=4)
    assert "allowed: 2 rank(s), a list of 3 counts summing to 4, or runtime.stage_layers=null" in ranks_problem(
        split, 3, num_layers=4)
    assert "sums to 4 but the model has 5 transformer blocks" in ranks_problem(split, 2, num_layers=5)


def test_ranks_problem_videoinfinity_clips():
    cfg = load_config("tiny-vi-wan", check_paths=False)  # 8 latent frames, clip length derived
    assert videoinfinity_rank_counts(8) == [1, 2, 3, 4, 8]
    assert [w for w in range(1, 12) if ranks_problem(cfg, w) is None] == [1, 2, 3, 4, 8]
    assert "clips of 2 latent frames fill only 4 rank(s)" in ranks_problem(cfg, 5)
    assert "(fewer latent frames than ranks); allowed: 1-4, 8 ranks" in ranks_problem(cfg, 9)
    assert [resolve_config(cfg, w).strategy.clip_latent_frames for w in (1, 2, 3, 4, 8)] == [8, 4, 3, 2, 1]
    fixed = load_config("tiny-vi-wan", ["strategy.clip_latent_frames=2"], check_paths=False)
    assert ranks_problem(fixed, 4) is None and resolve_config(fixed, 4) is fixed
    assert ranks_problem(fixed, 2) == (
        "strategy.clip_latent_frames=2 splits video.num_frames=29 (8 latent frames) into 4 clip(s), one per rank, but "
        "the job has 2 rank(s); allowed: 4 rank(s), or strategy.clip_latent_frames=null (derived from the rank "
        "count; works on 1-4, 8 ranks)")
    # any frame count: 25 frames = 7 latent frames; 2 ranks -> clips of 4 (8 generated), 3 ranks -> 3 (9)
    odd = load_config("tiny-vi-wan", check_paths=False, num_frames=25)
    assert [generated_latent_frames(odd, w) for w in (1, 2, 3, 4)] == [7, 8, 9, 8]
    assert ranks_problem(odd, 5) is not None and ranks_problem(odd, 7) is None


def test_model_num_layers_reads_the_transformer_config(tmp_path, tiny_model_dir):
    tiny = load_config("tiny-test", check_paths=False)
    built = json.loads((Path(tiny_model_dir) / "transformer" / "config.json").read_text())["num_layers"]
    assert model_num_layers(tiny) == built == 4
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"num_layers": 30}))
    assert model_num_layers(load_config("tiny-test", [f"model.path={folder}"], check_paths=False)) == 30
    (folder / "transformer" / "config.json").write_text("{not json")
    assert model_num_layers(load_config("tiny-test", [f"model.path={folder}"], check_paths=False)) is None
    assert model_num_layers(load_config("tiny-test", [f"model.path={tmp_path / 'missing'}"], check_paths=False)) is None
    assert model_num_layers(load_config("tiny-vi-unet3d", check_paths=False)) is None  # no layer split


@pytest.mark.unit
def test_the_launcher_checks_a_rank_count_without_importing_torch():
    """``hpcvideo generate --ranks N`` checks the run and the rank count, then starts mpiexec: torch's import (~1 s)
    is paid by the ranks, not also by the launcher before them (nor by check on a login node)."""
    import subprocess
    import sys

    code = ("import sys; from hpcvideo.config import load_config; from hpcvideo.launch.local import check_launch; "
            "cfg = load_config('demo-cpu', ['runtime.vae_decode=rows'], num_frames=None, seed=None, output='x.zarr'); "
            "check_launch(cfg, 2); print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
