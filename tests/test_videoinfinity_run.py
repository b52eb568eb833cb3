"""Video-Infinity runs through the CLI under mpiexec (gloo on CPU): clip-parallel runs equal the
single-process executor (one rank whose clip is the whole video), and a killed run resumes
bit-identically. (A rank count that does not match the clips is refused: test_videoinfinity.py.)
One-rank runs go in this process; the multi-rank ones come from the session's one mpiexec launch per world size
(tests/conftest.py: mpi_runs); the kill of rank 1 has a launch of its own. (The README's ``--ranks 2`` command
runs in tests/test_docs.py.)"""

import numpy as np
import pytest

from hpcvideo.store import RunStore
from tests.helpers import AGAIN, MPI_KILLED, MPI_RUNS, cli, cli_signalled, needs_mpiexec, store_arrays

pytestmark = pytest.mark.e2e  # the multi-rank ones are also marked mpi


def run(preset, *args):
    """``hpcvideo generate PRESET --no-progress ARGS`` on one rank, in this process."""
    return cli("generate", preset, "--no-progress", *args, check=False)


def ok(result):
    """A Result, or a run of the mpi_runs fixture (a dict), that exited 0."""
    if isinstance(result, dict):
        assert result["returncode"] == 0, f"exit {result['returncode']}\n{result['stdout']}\n{result['stderr']}"
        return
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def arrays(path):
    """store_arrays of a complete store whose every clip has its latents and frames marked done."""
    store = RunStore.open(path)
    assert store.done("latents").all() and store.done("frames").all()
    return store_arrays(path)


@pytest.fixture(scope="module")
def wan_reference(tmp_path_factory, tiny_model_dir):
    """tiny-vi-wan on one rank, one clip = the whole video: the single-process executor."""
    path = tmp_path_factory.mktemp("wan1") / "run.zarr"
    ok(run("tiny-vi-wan", "--output", path, "--set", "strategy.clip_latent_frames=8"))
    return arrays(path)


@pytest.mark.mpi
@needs_mpiexec
def test_wan_on_four_ranks_is_bit_identical_to_the_reference(mpi_runs, wan_reference):
    run_ = mpi_runs(4)["tiny-vi-wan"]  # the session's 4-rank launch (tests/conftest.py)
    ok(run_)
    path = run_["path"]
    latents, frames = arrays(path)
    assert np.array_equal(latents, wan_reference[0]) and np.array_equal(frames, wan_reference[1])
    store = RunStore.open(path)
    assert store.num_frames == 29 and store.num_blocks == 4  # one clip (chunk, done marker) per rank
    stats = store.attrs["rank_stats"]
    assert [s["clip"] for s in stats] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    # per self-attention layer a rank receives its halo frames (1 each side, cut at the video's ends) and the
    # global frames (0 and 4) it does not own; 4 tokens x hidden 24 x 4 bytes per frame, 4 layers, 2 forwards
    # (CFG) per step, 4 steps
    halo, not_owned = [1, 2, 2, 1], [1, 2, 1, 2]
    assert [s["bytes_received"] for s in stats] == [(h + g) * 4 * 24 * 4 * 4 * 2 * 4 for h, g in zip(halo, not_owned)]


@pytest.mark.mpi
@needs_mpiexec
def test_any_frame_count_on_two_ranks_keeps_exactly_the_frames_asked_for(mpi_runs, wan_reference):
    """25 frames = 7 latent frames; on 2 ranks the derived clips are 4 + 4 latent frames (the last one reaches
    past the video): the same 8 latent frames as the reference, and its first 25 frames."""
    run_ = mpi_runs(2)["tiny-vi-wan-25-frames"]  # the session's 2-rank launch (tests/conftest.py)
    ok(run_)
    path = run_["path"]
    latents, frames = arrays(path)
    store = RunStore.open(path)
    assert store.num_frames == 25 and store.num_blocks == 2 and store.config["strategy"]["clip_latent_frames"] == 4
    assert store.status_dict()["num_frames_written"] == 25
    assert np.array_equal(latents, wan_reference[0]) and np.array_equal(frames, wan_reference[1][:25])


def test_rank_counts_that_cannot_lay_out_the_clips_are_refused_before_mpiexec(tmp_path):
    path = tmp_path / "never.zarr"
    for args, needle in ((("--ranks", 5), "allowed: 1-4, 8 ranks"),  # 8 latent frames: clips of 2 fill 4 ranks
                         (("--ranks", 9), "fewer latent frames than ranks"),
                         (("--ranks", 2, "--set", "strategy.clip_latent_frames=2"), "allowed: 4 rank(s)")):
        result = run("tiny-vi-wan", "--output", path, *args)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not path.exists()


@pytest.mark.mpi
@needs_mpiexec
def test_a_killed_run_resumes_bit_identically(mpi_runs, wan_reference):
    """Rank 1 is SIGKILLed at the start of step 2 of 4 (on 2 ranks, a launch of its own); the same command (in the
    session's 2-rank launch, tests/conftest.py: MPI_KILLED) finishes the run, and the result equals the
    uninterrupted single-process one bit for bit."""
    name = "tiny-vi-wan-rank-1-killed"
    assert MPI_KILLED[name] == (["tiny-vi-wan", "--set", "strategy.clip_latent_frames=4"], 2, "tick:2@1", 2)
    run_ = mpi_runs(2)[name]
    killed = run_["killed"]
    assert killed["result"].returncode != 0
    # rank 0 may still be writing step 2's checkpoint when the launcher kills it (~10 ms after rank 1)
    assert not killed["status"]["complete"] and killed["resume_tick"] in (1, 2)
    ok(run_)
    latents, frames = arrays(run_["path"])
    assert np.array_equal(latents, wan_reference[0]) and np.array_equal(frames, wan_reference[1])


@pytest.mark.mpi
@needs_mpiexec
def test_unet3d_on_two_ranks_equals_the_reference(tmp_path, tiny_unet3d_dir, mpi_runs):
    """UNet3D: float32 round-off of the video-wide GroupNorm statistics, after 4 DDIM steps with CFG 7.5:
    measured max |diff| 3e-5 in latents of magnitude ~3; asserted 2e-4 (frames within 1 of 255)."""
    one = tmp_path / "one.zarr"
    single = ("--set", "sampling.prompt=a red ball rolling on grass")  # one prompt: clips of any size agree
    ok(run("tiny-vi-unet3d", "--output", one, "--set", "strategy.clip_latent_frames=16", *single))
    # the session's 2-rank launch (tests/conftest.py: mpi_runs; the README's `--ranks 2` command: test_docs.py);
    # the clip length is derived (16 / 2 = 8)
    name = "tiny-vi-unet3d-one-prompt"
    assert MPI_RUNS[2][name] == ["tiny-vi-unet3d", *single] == MPI_RUNS[2][name + AGAIN]
    run_ = mpi_runs(2)[name]
    ok(run_)
    two = run_["path"]
    assert RunStore.open(two).config["strategy"]["clip_latent_frames"] == 8  # the store records the derived value
    again = mpi_runs(2)[name + AGAIN]  # the same command again, on the same store: nothing to do
    ok(again)
    assert again["path"] == two
    (l1, f1), (l2, f2) = arrays(one), arrays(two)
    assert l1.shape == (16, 4, 8, 8) and f1.shape == (16, 64, 64, 3)
    np.testing.assert_allclose(l2, l1, atol=2e-4, rtol=0)
    assert np.abs(f2.astype(int) - f1).max() <= 1
    assert RunStore.open(two).frame_range(1) == (8, 16)  # per-frame VAE: clip-aligned frame chunks


def test_a_preempted_run_stops_at_a_step_with_exit_75_and_resumes_bit_identically(tmp_path):
    """Under SLURM (SLURM_JOB_ID set) USR2 makes the run checkpoint the next step and exit 75 (the
    sbatch scripts requeue on it); the rerun ends equal to an uninterrupted run."""
    from hpcvideo.runtime.preempt import EXIT_REQUEUE

    args = ("--set", "strategy.clip_latent_frames=8", "--set", "sampling.num_inference_steps=12")
    whole = tmp_path / "whole.zarr"
    ok(run("tiny-vi-wan", "--output", whole, *args))
    path = tmp_path / "run.zarr"

    # in this process, signalled by a thread as SLURM signals the job (tests.helpers.cli_signalled)
    result = cli_signalled("generate", "tiny-vi-wan", "--no-progress", "--output", path, *args, store=path,
                           min_checkpoint_tick=2)
    process, stderr = result, result.stderr
    assert process.returncode == EXIT_REQUEUE, stderr
    stopped_at = int(stderr.split("stopped at step ")[1].split()[0])
    status = RunStore.open(path).status_dict()
    assert not status["complete"] and status["last_checkpoint_tick"] == stopped_at and 2 <= stopped_at < 12
    ok(run("tiny-vi-wan", "--output", path, *args))
    latents, frames = arrays(path)
    expected = arrays(whole)
    assert np.array_equal(latents, expected[0]) and np.array_equal(frames, expected[1])


@pytest.mark.mpi
@needs_mpiexec
def test_independent_clips_baseline_equals_each_clip_made_alone(tmp_path, mpi_runs):
    # strategy.sync_clips=false (the seam-comparison baseline): no messages, and clip 0 of the 4-rank run is
    # the 1-rank run of a video that is only that clip (noise is per video frame, so frames 0..1 match)
    run_, alone = mpi_runs(4)["tiny-vi-wan-independent"], tmp_path / "alone.zarr"  # the session's 4-rank launch
    ok(run_)
    path = run_["path"]
    ok(run("tiny-vi-wan", "--output", alone, "--frames", 5))
    latents, frames = arrays(path)
    clip_latents, clip_frames = arrays(alone)
    assert np.array_equal(latents[:2], clip_latents) and np.array_equal(frames[:5], clip_frames)
    assert [s["bytes_received"] for s in RunStore.open(path).attrs["rank_stats"]] == [0, 0, 0, 0]
