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
from tests.helpers import ROOT

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


def fake_bin(tmp_path: Path, srun_exit: int, *, real_check: bool = False) -> Path:
    """srun that records its argv one per line (and exits srun_exit), scontrol that records its argv,
    hpcvideo whose `check` records its argv and exits $CHECK_EXIT (real_check: runs the real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = ('case "$*" in *clean-shm*) printf "%s\\n" "$@" > "$RECORD/clean.args"; exit 0;; esac\n'
            f'printf "%s\\n" "$@" > "$RECORD/srun.args"\nexit {srun_exit}\n')
    hpcvideo = (f'[ "$1" = check ] && exec {sys.executable} -m hpcvideo.cli "$@"\nexit 99\n' if real_check else
                '[ "$1" = check ] && { printf "%s\\n" "$@" > "$RECORD/check.args"; exit "${CHECK_EXIT:-0}"; }\nexit 99\n')
    for name, body in (("srun", srun), ("scontrol", 'printf "%s\\n" "$@" > "$RECORD/scontrol.args"\n'),
                       ("hpcvideo", hpcvideo)):
        exe = bin_dir / name
        exe.write_text("#!/bin/bash\n" + body)
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(tmp_path: Path, script: Path, *args: str, srun_exit: int = 0, real_check: bool = False, **env: str):
    """Run ``script`` with bash and the stand-ins; returns (result, srun argv, scontrol argv, check argv),
    each argv None where the command was not run."""
    environ = {"PATH": f"{fake_bin(tmp_path, srun_exit, real_check=real_check)}:/usr/bin:/bin", "RECORD": str(tmp_path),
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "4",
               "HOME": str(tmp_path / "home"), **env}
    for key in ("PYTHONPATH", "HPCVIDEO_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"):  # the real check's imports
        if key in os.environ:
            environ[key] = os.environ[key]
    result = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=120)

    def recorded(name: str) -> list[str] | None:
        path = tmp_path / f"{name}.args"
        return path.read_text().splitlines() if path.exists() else None

    assert not list(tmp_path.glob("pwned*")), "a value was executed by the shell"
    clean = recorded("clean")  # once per node, before the MPI step
    srun_args = recorded("srun")
    if srun_args is not None:
        assert clean == ["--ntasks=3", "--ntasks-per-node=1", "--mpi=none", "--kill-on-bad-exit=1", "hpcvideo", "clean-shm"]
    requeue = (tmp_path / "scontrol.args").read_text().split() if (tmp_path / "scontrol.args").exists() else None
    return result, srun_args, requeue, recorded("check")


@pytest.mark.parametrize("srun_exit,requeued", [(0, False), (75, True), (1, False)])
def test_generated_script_passes_values_intact_and_requeues_on_75(tmp_path, srun_exit, requeued):
    cfg, overrides = nasty_config()
    cfg.cluster.setup = []  # no module command here
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, config="configs/my run.yaml", overrides=overrides))
    result, srun_args, requeue, check = run_script(tmp_path, script, srun_exit=srun_exit)
    assert result.returncode == srun_exit
    arguments = ["configs/my run.yaml", "--output", NASTY_STORE, "--set", f"sampling.prompt={NASTY_PROMPT}"]
    assert check == ["check", *arguments, "--ranks", "8"]  # no SLURM_NTASKS: the script's own count, 2 nodes x 4
    assert srun_args == ["--mpi=pmix", "--kill-on-bad-exit=1", "hpcvideo", "generate", *arguments, "--no-progress"]
    assert requeue == (["requeue", "4242"] if requeued else None)


@pytest.mark.parametrize("srun_exit,requeued", [(0, False), (75, True)])
def test_template_passes_arguments_intact_and_requeues_on_75(tmp_path, srun_exit, requeued):
    args = ["configs/x.yaml", "--output", NASTY_STORE, "--set", f"sampling.prompt={NASTY_PROMPT}"]
    result, srun_args, requeue, check = run_script(tmp_path, ROOT / "slurm" / "generate.sbatch", *args,
                                                   srun_exit=srun_exit, SLURM_NTASKS="6")
    assert result.returncode == srun_exit
    assert check == ["check", *args, "--ranks", "6"]  # the job's task count, as SLURM says
    assert srun_args == ["--mpi=pmi2", "--kill-on-bad-exit=1", "hpcvideo", "generate", *args, "--no-progress"]
    assert requeue == (["requeue", "4242"] if requeued else None)


def test_template_counts_tasks_without_slurm_ntasks(tmp_path):
    result, _, _, check = run_script(tmp_path, ROOT / "slurm" / "generate.sbatch", "tiny-test", "-o", "x.zarr")
    assert result.returncode == 0 and check == ["check", "tiny-test", "-o", "x.zarr", "--ranks", "12"]  # 3 nodes x 4


@pytest.mark.parametrize("template", [False, True])
def test_both_scripts_stop_before_srun_when_the_check_fails(tmp_path, template):
    if template:
        script = ROOT / "slurm" / "generate.sbatch"
        args = ["tiny-test", "--output", "run.zarr"]
    else:
        cfg, overrides = nasty_config()
        cfg.cluster.setup = []
        script = tmp_path / "job.sbatch"
        script.write_text(render_sbatch(cfg, config="configs/my run.yaml", overrides=overrides))
        args = []
    result, srun_args, requeue, check = run_script(tmp_path, script, *args, CHECK_EXIT="2")
    assert result.returncode == 2 and check is not None
    assert srun_args is None and requeue is None and not (tmp_path / "clean.args").exists()  # no step started


@pytest.mark.e2e
def test_the_real_check_ends_the_job_in_seconds_with_the_reason(tmp_path, tiny_model_dir):
    """The scripts run the real `hpcvideo check` with the job's task count: 8 tasks for a 4-block model,
    and a preset whose model path is still the placeholder, end before srun with the reason."""
    cfg = load_config("tiny-test", ["cluster.nodes=2", "cluster.gpus_per_node=4"], output=tmp_path / "run.zarr",
                      check_paths=False)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, config="tiny-test"))
    result, srun_args, _, _ = run_script(tmp_path, script, real_check=True)
    assert result.returncode == 2 and srun_args is None, result.stderr
    assert "--ranks 8: 8 ranks cannot split the model's 4 transformer blocks" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run.zarr").exists()
    (tmp_path / "bin").rename(tmp_path / "bin0")
    result, srun_args, _, _ = run_script(tmp_path, ROOT / "slurm" / "generate.sbatch", "wan2.1-t2v-14b", "-o", "x.zarr",
                                         real_check=True, SLURM_NTASKS="8")
    assert result.returncode == 2 and srun_args is None, result.stderr
    assert "model.path='/path/to/Wan2.1-T2V-14B-Diffusers' is the preset's placeholder" in result.stderr
    (tmp_path / "bin").rename(tmp_path / "bin1")
    result, srun_args, _, _ = run_script(tmp_path, script, real_check=True, SLURM_NTASKS="4")  # sbatch --nodes=1
    assert result.returncode == 0 and srun_args[2:4] == ["hpcvideo", "generate"], result.stderr
    assert not (tmp_path / "run.zarr").exists()  # check creates nothing; generate (a stand-in here) would


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


# ------------------------------------------------------------------ refused before the queue (CLI)

def _tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("command,args,needle", [
    ("sbatch", ["tiny-test", "--set", "cluster.gpus_per_node=8"],
     "cluster.nodes=1 x cluster.gpus_per_node=8 = 8 rank(s): 8 ranks cannot split the model's 4 transformer blocks"),
    ("submit", ["tiny-test", "--set", "cluster.nodes=3", "--set", "cluster.gpus_per_node=2"],
     "cluster.nodes=3 x cluster.gpus_per_node=2 = 6 rank(s): 6 ranks cannot split"),
    ("sbatch", ["tiny-test", "--set", "cluster.gpus_per_node=2", "--set", "runtime.stage_layers=[1, 1, 2]"],
     "runtime.stage_layers=[1, 1, 2] gives 3 pipeline stage(s) but the job has 2 rank(s)"),
    ("sbatch", ["tiny-vi-unet3d", "--set", "cluster.gpus_per_node=5"], "5 ranks cannot share video.num_frames=16"),
    ("submit", ["wan2.1-t2v-14b"], "model.path='/path/to/Wan2.1-T2V-14B-Diffusers' is the preset's placeholder"),
    ("sbatch", ["videocrafter2-vi-8gpu"], "model.path='/path/to/videocrafter2-diffusers' is the preset's placeholder"),
    ("sbatch", ["tiny-test", "--set", "model.path=/nonexistent/wan"], "model.path='/nonexistent/wan' does not exist"),
    ("sbatch", ["tiny-test", "--set", "cluster.gpus_per_node=2", "--set", "cluster.gpu_mem_gb=0.0001"],
     "cluster.gpu_mem_gb=0.0001 is too small for this layout"),
    ("check", ["tiny-test", "--ranks", "0"], "--ranks 0: 0 ranks is not allowed"),
    ("check", ["tiny-test", "--ranks", "5"], "--ranks 5: 5 ranks cannot split the model's 4 transformer blocks"),
])
def test_cluster_commands_refuse_what_the_job_cannot_run(tmp_path, capsys, tiny_model_dir, command, args, needle):
    from hpcvideo.cli import main

    path = tmp_path / "runs" / "x.zarr"
    assert main([command, *args, "--output", str(path)]) == 2
    out, err = capsys.readouterr()
    assert needle in err and err.startswith(f"hpcvideo {command}: error: ") and "Traceback" not in err
    assert out == "" and not (tmp_path / "runs").exists()  # no script, no store, no log folder


def test_check_passes_a_runnable_job_and_creates_nothing(tmp_path, capsys, tiny_model_dir):
    from hpcvideo.cli import main
    from hpcvideo.launch import slurm

    path = tmp_path / "run.zarr"
    assert main(["check", "tiny-test", "--output", str(path), "--ranks", "2", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ok: 29 frames in 4 blocks (dualparal) on 2 rank(s)")
    assert not path.exists()
    slurm.create_store(slurm.check_job(load_config("tiny-test", output=path, check_paths=False), 2))
    before = _tree(path)
    assert main(["check", "tiny-test", "--output", str(path), "--ranks", "2", "--frames", "61"]) == 0  # an extension
    assert main(["check", "tiny-test", "--output", str(path), "--ranks", "2", "--seed", "7"]) == 2  # another run
    assert "sampling.seed" in capsys.readouterr().err
    assert main(["check", "tiny-test", "--output", str(path), "--ranks", "2", "--frames", "9"]) == 2
    assert "video.num_frames=9 is shorter than the store's 29 frames" in capsys.readouterr().err
    assert _tree(path) == before


def test_submit_off_a_cluster_says_so_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from hpcvideo.cli import main
    from hpcvideo.launch import slurm

    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # no sbatch, no srun
    new = tmp_path / "runs" / "new.zarr"
    assert main(["submit", "tiny-test", "--output", str(new)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpcvideo submit: error: no SLURM here (sbatch and srun not found on PATH)")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    old = tmp_path / "old.zarr"  # an existing store (e.g. to resume) is left exactly as it was
    slurm.create_store(slurm.check_job(load_config("tiny-test", output=old, check_paths=False)))
    before = _tree(tmp_path)
    assert main(["submit", "tiny-test", "--output", str(old)]) == 2
    assert "no SLURM here" in capsys.readouterr().err and _tree(tmp_path) == before


def test_a_submission_sbatch_refuses_removes_only_what_it_created(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from hpcvideo.cli import main
    from hpcvideo.launch import slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0\n"),
                       ("sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')):
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    new = work / "runs" / "new.zarr"
    assert main(["submit", "tiny-test", "--output", str(new), "--set", "cluster.partition=nope"]) == 1
    err = capsys.readouterr().err
    assert "hpcvideo submit: error: sbatch refused the job: sbatch: error: invalid partition specified: nope" in err
    assert "Traceback" not in err and list(work.iterdir()) == []  # store, runs/ and the log folder: gone
    old = work / "old.zarr"
    slurm.create_store(slurm.check_job(load_config("tiny-test", output=old, check_paths=False)))
    (work / "mine.txt").write_text("not the run's")
    before = _tree(work)
    assert main(["submit", "tiny-test", "--output", str(old), "--set", "cluster.partition=nope"]) == 1
    assert _tree(work) == before  # the store that existed is untouched; the log folder this call made is gone
