"""sbatch scripts: the generated text against golden files, and both scripts run by bash with
stand-ins for srun/scontrol, so quoting and the requeue on exit 75 are checked for real."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpcvideo.config import ConfigError, load_config
from hpcvideo.launch.sbatch import render_sbatch
from hpcvideo.launch.slurm import executor_parameters

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
NASTY_PROMPT = "it's a \"fox\" $(touch pwned) `touch pwned2`; rm -rf ~ & echo $HOME"
NASTY_STORE = "runs/a b/$(touch pwned3).zarr"


def nasty_config():
    overrides = [
        f"sampling.prompt={NASTY_PROMPT}", "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.cpus_per_task=16",
        "cluster.mem_gb=480", "cluster.timeout_min=150", "cluster.partition=gpu", "cluster.account=proj 42",
        "cluster.qos=high", "cluster.constraint=a100&ib", "cluster.mpi=pmix", "cluster.signal_delay_s=300",
        'cluster.setup=["module load cuda/12.4", "source $HOME/venv/bin/activate"]',
        "cluster.sbatch_options={mail-type: END, exclusive: true, comment: \"x; y\"}",
    ]
    cfg = load_config("tiny-test", overrides, output=NASTY_STORE, check_paths=False)
    return cfg, [overrides[0]]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPCVIDEO_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file (HPCVIDEO_UPDATE_GOLDEN=1 rewrites it)"


def test_generated_script_matches_golden_text():
    cfg, overrides = nasty_config()
    check_golden("generate.sbatch", render_sbatch(cfg, config="configs/my run.yaml", overrides=overrides))


def test_cpu_nodes_ask_for_no_gpus():
    cfg = load_config("tiny-test", ["cluster.request_gpus=false", "cluster.gpus_per_node=2"], check_paths=False)
    text = render_sbatch(cfg, config="tiny-test")
    assert "#SBATCH --ntasks-per-node=2" in text and "gpus-per-node" not in text


def fake_bin(tmp_path: Path, srun_exit: int) -> Path:
    """srun that records its argv one per line (and exits srun_exit), scontrol that records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = ('case "$*" in *clean-shm*) printf "%s\\n" "$@" > "$RECORD/clean.args"; exit 0;; esac\n'
            f'printf "%s\\n" "$@" > "$RECORD/srun.args"\nexit {srun_exit}\n')
    for name, body in (("srun", srun),
                       ("scontrol", 'printf "%s\\n" "$@" > "$RECORD/scontrol.args"\n')):
        exe = bin_dir / name
        exe.write_text("#!/bin/bash\n" + body)
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(tmp_path: Path, script: Path, *args: str, srun_exit: int = 0):
    environ = {"PATH": f"{fake_bin(tmp_path, srun_exit)}:/usr/bin:/bin", "RECORD": str(tmp_path),
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "HOME": str(tmp_path / "home")}
    result = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=30)
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    requeue = (tmp_path / "scontrol.args").read_text().split() if (tmp_path / "scontrol.args").exists() else None
    assert not list(tmp_path.glob("pwned*")), "a value was executed by the shell"
    clean = (tmp_path / "clean.args").read_text().splitlines()  # once per node, before the MPI step
    assert clean == ["--ntasks=3", "--ntasks-per-node=1", "--mpi=none", "--kill-on-bad-exit=1", "hpcvideo", "clean-shm"]
    return result, srun_args, requeue


@pytest.mark.parametrize("srun_exit,requeued", [(0, False), (75, True), (1, False)])
def test_generated_script_passes_values_intact_and_requeues_on_75(tmp_path, srun_exit, requeued):
    cfg, overrides = nasty_config()
    cfg.cluster.setup = []  # no module command here
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, config="configs/my run.yaml", overrides=overrides))
    result, srun_args, requeue = run_script(tmp_path, script, srun_exit=srun_exit)
    assert result.returncode == srun_exit
    assert srun_args[:4] == ["--mpi=pmix", "--kill-on-bad-exit=1", "hpcvideo", "generate"]
    assert srun_args[4:] == ["configs/my run.yaml", "--output", NASTY_STORE, "--set", f"sampling.prompt={NASTY_PROMPT}",
                             "--no-progress"]
    assert requeue == (["requeue", "4242"] if requeued else None)


@pytest.mark.parametrize("srun_exit,requeued", [(0, False), (75, True)])
def test_template_passes_arguments_intact_and_requeues_on_75(tmp_path, srun_exit, requeued):
    args = ["configs/x.yaml", "--output", NASTY_STORE, "--set", f"sampling.prompt={NASTY_PROMPT}"]
    result, srun_args, requeue = run_script(tmp_path, ROOT / "slurm" / "generate.sbatch", *args, srun_exit=srun_exit)
    assert result.returncode == srun_exit
    assert srun_args == ["--mpi=pmi2", "--kill-on-bad-exit=1", "hpcvideo", "generate", *args, "--no-progress"]
    assert requeue == (["requeue", "4242"] if requeued else None)


def test_cluster_section_maps_to_submitit_parameters():
    cfg, _ = nasty_config()
    assert executor_parameters(cfg) == {
        "name": "hpcvideo", "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 16, "mem_gb": 480,
        "timeout_min": 150, "slurm_srun_args": ["--mpi=pmix", "--kill-on-bad-exit=1"], "slurm_signal_delay_s": 300,
        "slurm_partition": "gpu", "slurm_account": "proj 42", "slurm_qos": "high", "slurm_constraint": "a100&ib",
        "slurm_setup": ["module load cuda/12.4", "source $HOME/venv/bin/activate",
                        f"srun --ntasks=2 --ntasks-per-node=1 --mpi=none --kill-on-bad-exit=1 {sys.executable} -m hpcvideo.cli clean-shm"],
        "slurm_additional_parameters": {"mail-type": "END", "exclusive": True, "comment": "x; y"},
    }
    import submitit  # submitit itself accepts every name (it raises on unknown parameters)

    executor = submitit.AutoExecutor(folder="unused", cluster="debug")
    executor.update_parameters(**{k: v for k, v in executor_parameters(cfg).items() if not k.startswith("slurm_")})


@pytest.mark.parametrize("override,needle", [
    ("cluster.mpi=openmpi", "cluster.mpi='openmpi' is not allowed; allowed: 'pmi2', 'pmix'"),
    ("cluster.sbatch_options={time: 10}", "option 'time' is set by the cluster section itself"),
    ("cluster.sbatch_options={'bad option': 1}", "is not an sbatch long option name"),
    ('cluster.setup=["a\\nb"]', "contains a line break"),
    ("cluster.partition=\"a\\nb\"", "cluster.partition='a\\nb' contains a line break"),
    ("cluster.signal_delay_s=600", "cluster.signal_delay_s=600 is not shorter than cluster.timeout_min=10 minutes"),
    ("cluster.gpu_mem_gb=0", "cluster.gpu_mem_gb=0.0 is out of range; allowed: > 0"),
])
def test_bad_cluster_values_are_refused_with_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as error:
        load_config("tiny-test", ["cluster.timeout_min=10", override], check_paths=False)
    assert needle in str(error.value)


def test_stale_mpich_segments_of_this_job_only_are_removed(tmp_path):
    from hpcvideo.runtime.shm import mpich_world_id, remove_stale_segments

    # measured here: a requeued job 3963040 found /dev/shm/mpich_shm_b6312cc_0 from its killed allocation
    assert f"{mpich_world_id('3963040.0'):x}" == "b6312cc"
    ours = [f"mpich_shm_{mpich_world_id('77.0'):x}_0", f"mpich_vci_{mpich_world_id('77.0'):x}_0",
            f"mpich_shm_{mpich_world_id('77.1'):x}_1"]
    others = [f"mpich_shm_{mpich_world_id('78.0'):x}_0", "mpich_shm_deadbeef_0", "unrelated"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_segments("77", shm_dir=tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_many_prompts_become_a_job_array_with_one_store_each(tmp_path, monkeypatch, tiny_model_dir):
    """Every store exists (created on the login node) before the one array submission; submitit's
    debug executor stands in for SLURM here (the real submission is tests/test_cluster.py)."""
    import submitit

    from hpcvideo.launch import slurm

    submissions = []

    def debug_executor(cfg, *, folder=None):
        executor = submitit.AutoExecutor(folder=folder, cluster="debug")
        original = executor.submit

        def submit(fn):
            submissions.append(fn.config["store"]["path"])
            assert Path(fn.config["store"]["path"]).exists()  # created before submitting
            return original(fn)

        executor.submit = submit
        return executor

    monkeypatch.setattr(slurm, "make_executor", debug_executor)
    cfg = load_config("tiny-test", output=tmp_path / "runs" / "fox.zarr")
    jobs = slurm.submit(cfg, prompts=["a red fox", "a blue whale; $(rm -rf /)"])
    assert [item.store_path for item in jobs] == submissions == [str(tmp_path / "runs" / f"fox-{i:03d}.zarr") for i in range(2)]
    assert all(item.log_folder == (tmp_path / "runs" / "fox.zarr.slurm") for item in jobs)
    from hpcvideo.store import RunStore

    prompts = [RunStore.open(item.store_path).attrs["config"]["sampling"]["prompts"] for item in jobs]
    assert prompts == [[{"from_frame": 0, "prompt": "a red fox"}], [{"from_frame": 0, "prompt": "a blue whale; $(rm -rf /)"}]]
    with pytest.raises(ConfigError, match="no prompt"):
        slurm.submit(cfg, prompts=[])
