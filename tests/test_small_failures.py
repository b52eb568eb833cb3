"""The smaller ways a long run went wrong for an operator: a truncated weight file without its name, rank logs
overwritten by a rerun, a config warning once per rank, a misleading "starting without it"."""

from __future__ import annotations

import shutil
import sys
import warnings

import pytest

from hpcvideo.store import RunStore
from hpcvideo.store.lock import lock_path

from tests.helpers import assert_same_run, cli, copy_store


def test_a_truncated_safetensors_file_is_named_before_any_weights_load(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # an interrupted copy: the first half only
        handle.truncate(size // 2)
    store = tmp_path / "run.zarr"
    for command in ("check", "generate"):  # check (and plan, submit, sbatch: the same validation) before any job
        result = cli(command, "tiny-test", "--output", store, "--set", f"model.path={model}", "--no-progress"
                     if command == "generate" else "--set=runtime.device=cpu", check=False)
        assert result.returncode == 2, result.stderr
        assert f"{weights} is truncated: {size // 2} bytes, its header says {size}" in result.stderr
        assert "Traceback" not in result.stderr and not store.exists() and not lock_path(store).exists()


def test_rank_logs_of_a_rerun_are_appended_not_overwritten(tmp_path, monkeypatch):
    from hpcvideo.runtime.output import redirect_rank_output

    class Env:
        rank, world_size = 0, 2

    saved = sys.stdout, sys.stderr
    try:
        for attempt in ("first attempt", "second attempt"):
            output = redirect_rank_output(Env(), tmp_path)
            print(attempt)
            output.close()
            sys.stdout, sys.stderr = saved
    finally:
        sys.stdout, sys.stderr = saved
    text = (tmp_path / "rank0.log").read_text()
    assert text.count("==== ") == 2 and text.count("rank 0 of 2, pid") == 2
    assert text.index("first attempt") < text.index("second attempt")


@pytest.mark.parametrize("environ, shown", [
    ({}, True),                                                      # one process, or the parent of --ranks N
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, True),                      # rank 0 of a user's mpiexec / srun
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, False),                     # any other rank
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "HPCVIDEO_RELAUNCHED": "1"}, False),  # the parent said it already
])
def test_each_config_warning_is_printed_once_per_job_not_once_per_rank(monkeypatch, capsys, environ, shown):
    from hpcvideo.cli import _show_warning
    from hpcvideo.config.validate import ConfigWarning

    for key in ("PMI_RANK", "PMI_SIZE", "HPCVIDEO_RELAUNCHED", "OMPI_COMM_WORLD_RANK", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    _show_warning(ConfigWarning("sampling.prompts[1] is used by no block"), ConfigWarning, "x.py", 1)
    _show_warning(UserWarning("a run warning"), UserWarning, "x.py", 1)  # every rank's own: always shown
    err = capsys.readouterr().err
    assert ("sampling.prompts[1]" in err) is shown and "hpcvideo: warning: a run warning" in err


def test_a_damaged_last_checkpoint_says_it_resumes_from_the_extension_snapshot(tmp_path, tiny_test_run, tiny_test_arrays,
                                                                               caplog):
    path = copy_store(tiny_test_run, tmp_path / "run.zarr")
    for slot in (0, 1):  # both slots of the "resume" checkpoint damaged; the "extend" snapshot intact
        chunk = path / "state" / f"resume_{slot}" / "c" / "0"
        if chunk.exists():
            chunk.write_bytes(b"garbage")
    store = RunStore.open(path, mode="r+")
    store.clear_done("frames", [3])  # so that the rerun has work to do
    with caplog.at_level("INFO", logger="hpcvideo"), warnings.catch_warnings():
        warnings.simplefilter("always")
        result = cli("generate", "tiny-test", "--output", path)
    assert "'resume'" in caplog.text and "no slot verifies" in caplog.text  # the damaged record is named
    assert "starting without it" not in result.stderr + caplog.text
    assert "resuming from the extension snapshot (tick 4)" in caplog.text
    assert_same_run(path, tiny_test_arrays)
