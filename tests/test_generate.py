"""The main job end to end: parity with diffusers, resume after SIGKILL, extension, refusals, CLI."""

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from hpcvideo.config import load_config
from hpcvideo.generate import generate
from hpcvideo.noise import block_noise
from hpcvideo.store import RunStore
from tests.helpers import assert_same_run, cli, clean_env
from tests.helpers import store_arrays as arrays

pytestmark = pytest.mark.e2e

# The runs go in this process (tests.helpers.cli) unless the test needs a real process: a SIGKILL at an
# HPCVIDEO_FAULT point runs in a fork of the pre-imported worker (the forker fixture), and the one external
# kill of a running process (test_resume_after_external_sigkill_while_running) in a fresh subprocess.


def test_one_block_equals_wan_pipeline(tmp_path, tiny_model_dir):
    """A video that fits in one block gives WanPipeline's latents bit for bit (same model, seed, noise)."""
    from diffusers import WanPipeline

    cfg = load_config("tiny-test", ["strategy.block_latent_frames=3"], num_frames=9, output=tmp_path / "one.zarr")
    assert cfg.num_blocks == 1
    generate(cfg, progress=False)
    store = RunStore.open(cfg.store.path)
    ours = torch.from_numpy(store.read_latents(0, 3)).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, 3, h, w)

    pipe = WanPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    noise = block_noise(
        seed=cfg.sampling.seed, block_index=0, block_latent_frames=3, context_latent_frames=cfg.strategy.context_latent_frames,
        latent_channels=ours.shape[1], latent_height=ours.shape[3], latent_width=ours.shape[4],
    )
    theirs = pipe(
        prompt=cfg.sampling.prompts[0].prompt, negative_prompt=cfg.sampling.negative_prompt,
        height=cfg.video.height, width=cfg.video.width, num_frames=9,
        num_inference_steps=cfg.sampling.num_inference_steps, guidance_scale=cfg.sampling.guidance_scale,
        latents=noise.clone(), output_type="latent", max_sequence_length=cfg.sampling.max_sequence_length,
    ).frames
    assert theirs.shape == ours.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fault", ["tick:2", "latents:0", "frames:1", "tick:6", "frames:3"])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_test_arrays, forker, fault):
    path = tmp_path / "run.zarr"
    killed = forker.run("generate", "tiny-test", "--output", path, fault=fault, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    status = json.loads(cli("status", path, "--json").stdout)
    assert not status["complete"]
    cli("generate", "tiny-test", "--output", path)
    assert_same_run(path, tiny_test_arrays)


def running(pid: int) -> bool:
    """Whether process ``pid`` (a child of the forker's worker, which reaps it at once) has not ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_resume_after_external_sigkill_while_running(tmp_path, forker):
    """Kill from outside at an arbitrary moment once the run has checkpointed; twice in a row. (The run: a fork of
    the pre-imported worker, a process of its own, SIGKILLed by this process.)"""
    path = tmp_path / "run.zarr"
    args = ["generate", "tiny-test", "--output", str(path), "--set", "video.num_frames=61"]  # 16 latent frames = 8 blocks: a longer run to hit
    for _ in range(2):
        pid = forker.start(*args, env=clean_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and running(pid):
            if RunStore.exists(path) and RunStore.open(path).status_dict()["last_checkpoint_tick"] is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):  # a run that ended first is not killed (nor was it before)
            os.kill(pid, signal.SIGKILL)
        forker.wait_started()
    cli("generate", "tiny-test", "--output", path, "--frames", 61)
    uninterrupted = tmp_path / "uninterrupted.zarr"
    cli("generate", "tiny-test", "--output", uninterrupted, "--frames", 61)
    assert_same_run(path, arrays(uninterrupted))


def test_extend_equals_asking_for_the_longer_video(tmp_path, tiny_test_arrays):
    path = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--frames", 13)  # 4 latent frames = 2 blocks
    short = RunStore.open(path).status_dict()
    assert short["complete"] and short["num_frames"] == 13
    cli("generate", "tiny-test", "--output", path, "--frames", 21)  # 3 blocks
    cli("generate", "tiny-test", "--output", path)  # 29 frames, 4 blocks: equals the reference run
    assert_same_run(path, tiny_test_arrays)


def test_any_frame_count_and_an_extension_that_needs_no_new_block(tmp_path, tiny_test_arrays):
    """22 and 25 frames both need 7 latent frames = 4 whole blocks of 2 (8 latent frames, 29 decoded frames):
    the store holds exactly N frames; extending 22 -> 25 -> 29 writes the missing frames of the last block
    as an uninterrupted run of the larger N does, bit for bit."""
    scratch = tmp_path / "scratch25.zarr"
    cli("generate", "tiny-test", "--output", scratch, "--frames", 25)
    status = RunStore.open(scratch).status_dict()
    assert status["complete"] and status["num_frames"] == status["num_frames_written"] == 25
    assert status["num_frames_ready"] == 25 and status["num_blocks"] == 4 and status["num_latent_frames"] == 8
    path = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--frames", 22)
    store = RunStore.open(path)
    assert store.status_dict()["complete"] and store.num_frames == 22 and store.read_frames(0, 22).shape[0] == 22
    assert store.frame_range(3) == (21, 22)  # block 3 decodes frames [21, 29); the store keeps frame 21
    cli("generate", "tiny-test", "--output", path, "--frames", 25)  # no new block: the frames 22..24 come in
    assert_same_run(path, arrays(scratch))
    cli("generate", "tiny-test", "--output", path)  # 29 frames, still 4 blocks: equals the reference run
    assert_same_run(path, tiny_test_arrays)
    # status, the mp4 and xarray see exactly N frames
    import av
    import xarray

    status = json.loads(cli("status", scratch, "--json").stdout)
    assert status["complete"] is True and status["num_frames"] == status["num_frames_written"] == 25
    video = tmp_path / "scratch25.mp4"
    assert "25 frames" in cli("export", scratch, video).stdout
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 25
    assert xarray.open_zarr(scratch, consolidated=False)["frames"].shape == (25, 32, 32, 3)


@pytest.mark.parametrize("frames, blocks", [(21, 3), (1, 1)])
def test_demo_preset_takes_any_frame_count(tmp_path, frames, blocks):
    """demo-cpu has blocks of 2 latent frames: 21 frames = 6 latent frames = 3 blocks, 1 frame = 1 block."""
    path = tmp_path / "demo.zarr"
    result = cli("generate", "demo-cpu", "--output", path, "--frames", frames, "--no-progress")
    assert f"{frames}/{frames} frames, complete=True" in result.stdout
    status = RunStore.open(path).status_dict()
    assert (status["num_frames"], status["num_blocks"], status["num_frames_ready"]) == (frames, blocks, frames)


@pytest.mark.parametrize("steps", [4, 1])
def test_extension_that_needs_new_blocks_from_a_cut_last_block(tmp_path, steps):
    """10 frames = 4 latent frames = 2 blocks whose last one is cut (13 decoded frames); extending to 22
    frames (4 blocks) equals a from-scratch run of 22 frames. With 4 steps block 1 is still in the queue
    at the extension tick and is denoised again; with 1 step it left the queue before it, and its missing
    frames come from the kept decode of the shorter run."""
    steps_arg = ("--set", f"sampling.num_inference_steps={steps}")
    scratch = tmp_path / "scratch.zarr"
    cli("generate", "tiny-test", "--output", scratch, "--frames", 22, *steps_arg)
    path = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--frames", 10, *steps_arg)
    short = RunStore.open(path).status_dict()
    assert short["complete"] and short["num_frames"] == short["num_frames_written"] == 10 and short["num_blocks"] == 2
    cli("generate", "tiny-test", "--output", path, "--frames", 22, *steps_arg)
    assert_same_run(path, arrays(scratch))


def test_extend_after_a_kill_past_the_end_of_the_shorter_run(tmp_path, tiny_test_arrays, forker):
    path = tmp_path / "run.zarr"
    killed = forker.run("generate", "tiny-test", "--output", path, "--frames", 13, fault="tick:4", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cli("generate", "tiny-test", "--output", path)
    assert_same_run(path, tiny_test_arrays)


def test_store_with_different_config_is_refused_and_untouched(tmp_path, tiny_test_arrays):
    path = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--frames", 13)
    before = arrays(path)
    refused = cli("generate", "tiny-test", "--output", path, "--frames", 13, "--seed", 7,
                  "--set", "sampling.guidance_scale=2.0", check=False)
    assert refused.returncode == 2
    assert "sampling.seed" in refused.stderr and "sampling.guidance_scale" in refused.stderr
    assert "video.num_frames: store" not in refused.stderr  # a length change is an extension, not a mismatch
    shorter = cli("generate", "tiny-test", "--output", path, "--frames", 5, check=False)
    assert shorter.returncode == 2 and "shorter" in shorter.stderr
    after = arrays(path)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--frames", "0"], "video.num_frames=0 is out of range; allowed: any whole number >= 1"),
        (["--frames", "-3"], "video.num_frames=-3 is out of range; allowed: any whole number >= 1"),
        (["--set", "video.height=40"], "video.height=40"),
        (["--set", "strategy.block_latent_frames=0"], "strategy.block_latent_frames=0"),
        (["--ranks", "0"], "--ranks 0: 0 ranks is not allowed; allowed: a whole number of ranks >= 1"),
        (["--ranks", "-1"], "--ranks -1: -1 ranks is not allowed"),
        (["--ranks", "64"], "--ranks 64: 64 ranks cannot split the model's 4 transformer blocks"),
        (["--ranks", "3", "--set", "runtime.stage_layers=[2,2]"], "runtime.stage_layers=[2, 2] gives 2 pipeline"),
        (["--set", "video.num_frame=5"], "did you mean 'video.num_frames'"),
        (["--set", "model.path=/nonexistent/model"], "model.path"),
        (["--set", "sampling.prompts=[{from_frame: 9, prompt: a}, {from_frame: 0, prompt: b}]"], "sampling.prompts"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, needle):
    path = tmp_path / "never.zarr"
    result = cli("generate", "tiny-test", "--output", path, *args, check=False)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists()
    if "--ranks" in args:  # one line, before mpiexec started anything (no per-rank log folder)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "never.zarr.logs").exists()


def test_a_rank_count_the_run_cannot_use_fails_inside_the_launcher(tmp_path, forker):
    """Under a launcher (mpiexec -n 64 ...) every rank reaches the same verdict before MPI starts:
    rank 0 says why in one line, the others exit 2 quietly. (A real process per rank: the forker.)"""
    path = tmp_path / "never.zarr"
    for rank, expected in ((0, "64 rank(s): 64 ranks cannot split the model's 4 transformer blocks"), (5, "")):
        result = forker.run("generate", "tiny-test", "--output", path, env=clean_env(PMI_RANK=str(rank), PMI_SIZE="64"),
                            check=False)
        assert result.returncode == 2, result.stderr
        assert (expected in result.stderr) if expected else result.stderr.strip() == ""
        assert "Traceback" not in result.stderr and not path.exists()


def test_a_malformed_fault_is_refused_before_any_work(tmp_path):
    path = tmp_path / "never.zarr"
    result = cli("generate", "tiny-test", "--output", path, fault="raise:tick", check=False)  # no index
    assert result.returncode == 2 and "Traceback" not in result.stderr and not path.exists()
    assert "HPCVIDEO_FAULT='raise:tick': expected '[raise:]point:index[@rank]'" in result.stderr


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("generate", "tiny-test", "--output", blocker / "run.zarr", check=False)
    assert result.returncode == 2 and "store.path" in result.stderr


def test_cli_round_trip_status_and_export(tmp_path, tiny_test_arrays):
    import av

    path = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", path)
    status = json.loads(cli("status", path, "--json").stdout)
    assert status["complete"] is True
    assert status["num_frames"] == status["num_frames_written"] == 29
    text = cli("status", path).stdout
    assert "29/29 written" in text and "ticks      7/7" in text  # hpcvideo.progress.format_status
    mp4 = tmp_path / "out.mp4"
    cli("export", path, mp4)
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = stream.average_rate
    assert len(decoded) == 29 and decoded[0].shape == (32, 32, 3)
    assert float(rate) == 16.0
    import xarray

    dataset = xarray.open_zarr(path, consolidated=False)
    assert dataset["frames"].dims == ("frame", "height", "width", "rgb")
    assert dataset["frames"].shape == (29, 32, 32, 3)


@pytest.mark.parametrize(
    "every_ticks,every_s,expected_tick",
    [(1000, 1e-6, 5), (2, 1e9, 4), (1000, 1e9, None)],  # by seconds, by ticks, neither (before the kill)
)
def test_checkpoint_frequency_by_ticks_and_by_seconds(tmp_path, forker, every_ticks, every_s, expected_tick):
    path = tmp_path / "run.zarr"
    killed = forker.run("generate", "tiny-test", "--output", path, "--frames", 61, "--set", f"store.checkpoint_every_ticks={every_ticks}",
                 "--set", f"store.checkpoint_every_s={every_s}", fault="tick:5", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert RunStore.open(path).status_dict()["last_checkpoint_tick"] == expected_tick


def test_orphaned_partial_files_are_swept_on_resume(tmp_path, tiny_test_arrays, forker):
    path = tmp_path / "run.zarr"
    killed = forker.run("generate", "tiny-test", "--output", path, fault="frames:2", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphan = path / "frames" / "c" / "1" / "0" / "0" / ("0." + "ab" * 16 + ".partial")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a chunk")
    cli("generate", "tiny-test", "--output", path)
    assert not orphan.exists()
    assert_same_run(path, tiny_test_arrays)
