"""CFG parallelism (``runtime.cfg_parallel``): DualParal's cond and uncond branches on two halves of the ranks.

The runs are those of the session's 2- and 4-rank launches (tests/conftest.py: mpi_runs; tests/helpers.py:
MPI_RUNS "tiny-test-cfg-parallel"), compared bit for bit with the session's 1-rank tiny-test run."""

from __future__ import annotations

import pytest

from hpcvideo.config import ConfigError, load_config
from hpcvideo.layout import ranks_problem
from hpcvideo.plan import make_plan
from hpcvideo.store import RunStore
from hpcvideo.strategies.dualparal.spec import DualParalSpec
from tests.helpers import assert_same_run, cli, needs_mpiexec

CFG = ["runtime.cfg_parallel=true"]


@needs_mpiexec
@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_cfg_parallel_is_bit_identical_to_one_rank(mpi_runs, tiny_test_arrays, num_ranks):
    run = mpi_runs(num_ranks)["tiny-test-cfg-parallel"]
    assert run["returncode"] == 0, f"{run['stdout']}\n{run['stderr']}"
    assert_same_run(run["path"], tiny_test_arrays)
    stats = {r["rank"]: r for r in RunStore.open(run["path"]).attrs["rank_stats"]}
    plan = make_plan(load_config("tiny-test", CFG, check_paths=False), num_ranks=num_ranks)
    # each half of the ranks is one pipeline over all the blocks; the plan's bytes are the pipeline's counters
    half = num_ranks // 2
    assert [stats[r]["layers"] for r in range(num_ranks)] == 2 * [stats[r]["layers"] for r in range(half)]
    assert [list(r.layers) for r in plan.ranks] == [stats[r]["layers"] for r in range(num_ranks)]
    assert [r.sent_bytes_total for r in plan.ranks] == [stats[r]["bytes_sent"] for r in range(num_ranks)]
    assert all(stats[r]["bytes_sent"] > 0 for r in range(num_ranks))


def test_cfg_parallel_needs_guidance_and_a_supported_strategy():
    with pytest.raises(ConfigError) as error:
        load_config("tiny-test", [*CFG, "sampling.guidance_scale=1.0"], check_paths=False)
    assert "runtime.cfg_parallel=true needs classifier-free guidance" in str(error.value)
    assert "sampling.guidance_scale=1.0" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config("tiny-vi-wan", CFG, check_paths=False)
    assert "runtime.cfg_parallel=true is not supported with strategy.name='videoinfinity'" in str(error.value)
    assert not load_config("tiny-test", check_paths=False).runtime.cfg_parallel  # off by default


def test_cfg_parallel_needs_an_even_number_of_ranks_and_splits_each_half():
    cfg = load_config("tiny-test", CFG, check_paths=False)
    for odd in (1, 3):
        assert "two equal groups (cond, uncond), but the job has" in ranks_problem(cfg, odd, num_layers=4)
    assert ranks_problem(cfg, 2, num_layers=4) is None and ranks_problem(cfg, 8, num_layers=4) is None
    assert "cannot split" in ranks_problem(cfg, 10, num_layers=4)  # 5 stages per half for 4 blocks
    staged = load_config("tiny-test", [*CFG, "runtime.stage_layers=[3, 1]"], check_paths=False)
    assert ranks_problem(staged, 4, num_layers=4) is None  # one count per stage of a half
    assert "runtime.stage_layers=[3, 1]" in ranks_problem(staged, 2, num_layers=4)
    info = {"num_layers": 4}
    assert [list(r) for r in DualParalSpec().plan(staged, info, 4)] == [[0, 1, 2], [3], [0, 1, 2], [3]]


def test_an_odd_rank_count_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run.zarr"
    result = cli("generate", "tiny-test", "--output", out, "--ranks", 3, "--set", "runtime.cfg_parallel=true",
                 "--no-progress", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runtime.cfg_parallel=true splits the ranks into two equal groups" in result.stderr
    assert not out.exists()
