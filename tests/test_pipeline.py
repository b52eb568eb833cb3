"""DualParal across MPI ranks (gloo on CPU): bit-identical to the single-process reference executor
for 1-4 ranks, resume on another rank count, and failures that stop every rank without hanging.

The multi-rank runs (and the resumes of killed ones) come from one mpiexec launch per world size
(tests/conftest.py: mpi_runs; the tables MPI_RUNS and MPI_KILLED in tests/helpers.py); each kill has a
launch of its own, or ends a shared launch (MPI_KILLED_LAST); the 3-rank run goes through ``--ranks 3`` (the CLI's own
relaunch: mpiexec started by the CLI, here called in this process)."""

import numpy as np
import pytest
import torch

from hpcvideo.config import load_config
from hpcvideo.models import encode_prompts, load_wan
from hpcvideo.noise import block_noise
from hpcvideo.schedulers import make_scheduler
from hpcvideo.progress import read_heartbeats
from hpcvideo.store import RunStore
from hpcvideo.strategies.dualparal.pipeline import split_layers
from hpcvideo.strategies.dualparal.reference import DualParalReference
from tests.helpers import MPI_KILLED, cli, needs_mpiexec, store_arrays



def relaunch(num_ranks, *args):
    """``hpcvideo generate tiny-test ARGS --ranks N``: the CLI (in this process) starts mpiexec itself."""
    return cli("generate", "tiny-test", *args, "--ranks", num_ranks, check=False)


def ok(result):
    """A Result, or a run of the mpi_runs fixture (a dict), that exited 0."""
    if isinstance(result, dict):
        assert result["returncode"] == 0, f"exit {result['returncode']}\n{result['stdout']}\n{result['stderr']}"
        return result
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def reference_latents(tiny_model_dir):
    """tiny-test through the single-process reference executor: latents (L, C, h, w) float32."""
    cfg = load_config("tiny-test", check_paths=False)
    s, strategy = cfg.sampling, cfg.strategy
    components = load_wan(tiny_model_dir, dtype=torch.float32)
    embeds, negative = encode_prompts(
        components, [p.prompt for p in s.prompts], negative_prompt=s.negative_prompt,
        max_sequence_length=s.max_sequence_length, device="cpu", dtype=torch.float32,
    )
    shape = dict(latent_channels=4, latent_height=cfg.video.height // 8, latent_width=cfg.video.width // 8)
    executor = DualParalReference(
        transformer=components.transformer,
        scheduler_template=make_scheduler(s.scheduler, scheduler_config=components.scheduler_config,
                                          flow_shift=s.flow_shift, num_inference_steps=s.num_inference_steps),
        prompt_embeds=embeds, negative_prompt_embeds=negative, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=s.guidance_scale, num_blocks=cfg.num_blocks, block_latent_frames=strategy.block_latent_frames,
        context_latent_frames=strategy.context_latent_frames, feature_cache=strategy.feature_cache,
        noise_fn=lambda j: block_noise(seed=s.seed, block_index=j, block_latent_frames=strategy.block_latent_frames,
                                       context_latent_frames=strategy.context_latent_frames, **shape),
    )
    blocks = {}
    while not executor.done:
        blocks.update(executor.run_tick())
    executor.close()
    return torch.cat([blocks[j][0] for j in range(cfg.num_blocks)], dim=1).permute(1, 0, 2, 3).numpy()


@pytest.fixture(scope="module")
def one_rank_frames(tiny_test_arrays, reference_latents):
    """The frames of the session's 1-rank tiny-test run (tests/conftest.py), whose latents equal the reference's."""
    latents, frames = tiny_test_arrays
    assert np.array_equal(latents, reference_latents)
    return frames


@pytest.mark.e2e
def test_one_rank_run_equals_the_reference_executor(tiny_test_arrays, reference_latents):
    assert np.array_equal(tiny_test_arrays[0], reference_latents)


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("num_ranks,launcher", [(2, "mpiexec"), (3, "relaunch"), (4, "mpiexec")])
def test_ranks_are_bit_identical_to_the_reference(tmp_path, mpi_runs, reference_latents, one_rank_frames, num_ranks, launcher):
    if launcher == "mpiexec":  # the session's launch for this world size (tests/conftest.py: mpi_runs)
        run_ = mpi_runs(num_ranks)["tiny-test"]
        ok(run_)
        path = run_["path"]
    else:
        path = tmp_path / "run.zarr"
        ok(relaunch(num_ranks, "--output", path))
    latents, frames = store_arrays(path)
    assert np.array_equal(latents, reference_latents)
    assert np.array_equal(frames, one_rank_frames)
    stats = RunStore.open(path).attrs["rank_stats"]
    assert [s["rank"] for s in stats] == list(range(num_ranks))
    assert [tuple(s["layers"]) for s in stats] == [(r.start, r.stop) for r in split_layers(4, num_ranks)]
    assert sorted(p.name for p in path.parent.joinpath("run.zarr.logs").iterdir()) == [f"rank{r}.log" for r in range(num_ranks)]
    beats = read_heartbeats(path)  # every rank's last heartbeat, written at the end of the run (hpcvideo.progress)
    assert [(b["rank"], b["tick"], b["state"]) for b in beats] == [(r, beats[0]["num_ticks"], "finished") for r in range(num_ranks)]


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
def test_a_given_stage_split_is_used_and_bad_splits_are_refused(mpi_runs, reference_latents):
    """Two runs of the session's 2-rank launch (tests/conftest.py: mpi_runs)."""
    given = mpi_runs(2)["tiny-test-stages-3-1"]
    ok(given)
    path = given["path"]
    assert np.array_equal(store_arrays(path)[0], reference_latents)
    assert [s["layers"] for s in RunStore.open(path).attrs["rank_stats"]] == [[0, 3], [3, 4]]
    refused = mpi_runs(2)["tiny-test-stages-2-1"]
    assert refused["returncode"] == 2
    assert "runtime.stage_layers=[2, 1]" in refused["stderr"]
    assert not refused["path"].exists()


def test_split_layers():
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert split_layers(4, 1) == [range(0, 4)]
    assert split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]
    with pytest.raises(ValueError, match="at most 4 ranks"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match=r"runtime.stage_layers=\[2, 2\]"):
        split_layers(5, 2, [2, 2])


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("first,second,fault", [(3, 2, "tick:3"), (1, 4, "tick:4"), (2, 3, "frames:1")])
def test_resume_on_another_number_of_ranks(mpi_runs, reference_latents, one_rank_frames, first, second, fault):
    """Killed on ``first`` ranks by a launch of its own (1 rank: a fork of the pre-imported worker; 3 ranks: as the
    last run of the session's 3-rank launch, MPI_KILLED_LAST), resumed by the session's launch on ``second`` ranks
    (tests/conftest.py: MPI_KILLED, mpi_runs)."""
    run_ = mpi_runs(second)[f"tiny-test-killed-on-{first}"]
    assert MPI_KILLED[f"tiny-test-killed-on-{first}"][1:] == (first, fault, second)
    killed = run_["killed"]
    assert killed["result"].returncode != 0
    assert not killed["status"]["complete"]
    ok(run_)
    latents, frames = store_arrays(run_["path"])
    assert np.array_equal(latents, reference_latents) and np.array_equal(frames, one_rank_frames)


@pytest.mark.e2e
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("name,fault,needle", [("tiny-test-rank-1-raised", "raise:tick:2@1", "rank 1 failed"),
                                               ("tiny-test-rank-2-killed", "tick:2@2", "")])
def test_a_failed_rank_stops_every_rank_and_the_run_resumes(mpi_runs, reference_latents, name, fault, needle):
    """A rank that raises (or is SIGKILLed) ends the whole job non-zero within 60 s; nothing hangs;
    the store stays consistent and the same command (3 ranks: the session's 3-rank launch) resumes to the
    reference result (tests/conftest.py: MPI_KILLED, mpi_runs)."""
    assert MPI_KILLED[name][1:] == (3, fault, 3)
    run_ = mpi_runs(3)[name]
    failed = run_["killed"]["result"]
    assert failed.returncode != 0
    assert failed.elapsed_s < 60 + 20  # 60 s budget after the failure, + start-up of 3 ranks on 2 cores
    logs = failed.stdout + failed.stderr + run_["killed"]["logs"]
    assert needle in logs
    if needle:
        assert "stopping because rank 1 failed" in logs  # the peers say which rank failed
    ok(run_)
    assert np.array_equal(store_arrays(run_["path"])[0], reference_latents)
