"""Command line: ``hpcvideo generate | submit | sbatch | check | plan | status | export | verify | tiny-model``.

Every command validates its input first and exits with status 2 and a one-screen message naming
the key, the value and what is allowed; nothing is created or submitted before that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path


class _SetKey(argparse.Action):
    """An option that is a shortcut for ``--set KEY=VALUE`` (the value kept a string)."""

    def __init__(self, *args, key: str, **kwargs) -> None:
        self.key = key
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        overrides = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, overrides + [f"{self.key}={json.dumps(values)}"])


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file or preset name in configs/ (e.g. tiny-cpu)")
    parser.add_argument("--output", "-o", help="run store path (overrides store.path)")
    parser.add_argument("--frames", type=int, help="number of pixel frames, any whole number >= 1 (overrides video.num_frames; "
                        "a larger number on an existing store extends it)")
    parser.add_argument("--seed", type=int, help="random seed (overrides sampling.seed)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.num_inference_steps=20 (repeatable; YAML values)",
    )
    parser.add_argument("--image", dest="overrides", action=_SetKey, key="condition.image", metavar="PATH",
                        help="start the video from this image (overrides condition.image; Wan2.2 TI2V and "
                        "image-to-video models)")
    parser.add_argument("--init-video", dest="overrides", action=_SetKey, key="condition.init_video", metavar="PATH",
                        help="continue this video: its last frames are the first block's context (condition.init_video)")
    parser.add_argument("--init-store", dest="overrides", action=_SetKey, key="condition.init_store",
                        metavar="RUN.zarr", help="continue the video of this run store (condition.init_store)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcvideo", description="Distributed long-video diffusion inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate (or resume, or extend) a video into a run store")
    _add_config_args(gen)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument(
        "--ranks", type=int, default=None,
        help="start N local MPI ranks (mpiexec of the installed MPI) when not already under mpiexec/srun; "
        "one DualParal pipeline stage per rank (at most the model's transformer blocks), or one Video-Infinity "
        "clip per rank; a count the run cannot use is refused before any rank starts; per-rank logs in RUN.zarr.logs/",
    )

    status = sub.add_parser("status", help="progress of a run store (works while the run is going)")
    status.add_argument("store")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--seams", action="store_true",
                        help="also compute the seam metric (reads every ready frame once; hpcvideo.metrics)")

    export = sub.add_parser("export", help="write the frames of a run store to an mp4 (PyAV)")
    export.add_argument("store")
    export.add_argument("output")
    export.add_argument("--fps", type=float, default=None, help="frames per second (default: the run's video.fps)")
    export.add_argument("--allow-incomplete", action="store_true",
                        help="export the leading frames that verify of an incomplete or damaged store (refused otherwise)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file (refused otherwise)")

    verify = sub.add_parser("verify", help="read a run store back against its checksums, running nothing; "
                            "exit 0 intact and complete, 1 damaged, 3 intact but incomplete")
    verify.add_argument("store")
    verify.add_argument("--json", action="store_true", help="machine-readable output")

    submit = sub.add_parser("submit", help="check, plan, create the store, and submit to SLURM (submitit; requeued on timeout)")
    _add_config_args(submit)
    submit.add_argument("--prompts", metavar="FILE", help="one prompt per line: a job array, one store per prompt")
    submit.add_argument("--wait", action="store_true", help="wait for the job(s) and report the result or the failure")

    sbatch = sub.add_parser("sbatch", help="check the config, then print a plain sbatch script for it "
                            "(hpcvideo check, then srun --mpi=... hpcvideo generate; requeues)")
    _add_config_args(sbatch)

    check = sub.add_parser("check", help="check that `generate` with the same options can run on N ranks: config, "
                           "model folder (JSON only, no weights), rank count, existing store, memory plan; creates nothing")
    _add_config_args(check)
    check.add_argument("--ranks", type=int, default=None,
                       help="ranks the run will have (default: the MPI launcher's, else 1); the sbatch scripts pass $SLURM_NTASKS")
    check.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # accepted: same options as generate

    plan = sub.add_parser("plan", help="memory, bytes and time per tick per rank, without loading weights")
    _add_config_args(plan)
    plan.add_argument("--ranks", type=int, default=None, help="ranks (default: cluster.nodes x cluster.gpus_per_node)")
    plan.add_argument("--tflops", type=float, default=None, help="effective throughput per GPU, TFLOP/s (time per tick)")
    plan.add_argument("--from-store", default=None, metavar="RUN.zarr", help="take the throughput measured by a finished run")
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    shm = sub.add_parser("clean-shm", help="remove this SLURM job's stale MPICH shared-memory segments "
                         "(before srun in a requeued job; the scripts of submit/sbatch run it); outside a SLURM job, "
                         "every MPICH segment on this machine that no process uses")
    shm.add_argument("--job-id", default=None, help="default: $SLURM_JOB_ID")

    tiny = sub.add_parser("tiny-model", help="build (or find) the cached tiny random-weight Wan model; prints its path")
    tiny.add_argument("--path", default=None, help="build into this folder instead of the cache")
    tiny.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("train-demo", help="train the small demo Wan model on synthetic motion clips (hpcvideo.demo)")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    return parser


def _cmd_generate(args) -> int:
    from .config import load_config
    from .faults import FaultPlan
    from .launch.local import check_launch, maybe_relaunch

    try:
        faults = FaultPlan.from_env()  # the tests' HPCVIDEO_FAULT: read once per process, here, and handed down
    except ValueError as error:
        print(f"hpcvideo generate: error: {error}", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output)
    check_launch(cfg, args.ranks)  # a rank count the run cannot use: exit 2 before mpiexec starts
    code = maybe_relaunch(args.ranks, args.argv, log_dir=Path(f"{cfg.store.path}.logs"))  # after validation
    if code is not None:
        return code
    from .generate import generate
    from .runtime.preempt import EXIT_REQUEUE, Preempted, mark_stopped
    from .runtime.signals import clean_stop_for_cli, stopped_line

    # SIGINT / SIGTERM (and SLURM's USR2 before the time limit): every rank stops at a tick with a checkpoint
    request = clean_stop_for_cli()
    try:
        status = generate(cfg, progress=not args.no_progress and sys.stderr.isatty(), stop=request, faults=faults)
    except Preempted as stop:
        line, code = stopped_line(stop)
        print(f"hpcvideo generate: {line}", file=sys.stderr)
        if code == EXIT_REQUEUE:
            mark_stopped()  # for slurm/*.sbatch: srun's exit code may hide the 75
        return code
    finally:
        if request is not None:
            request.uninstall()  # the handlers this command replaced come back
    if status is None:  # not rank 0
        return 0
    print(f"{status['path']}: {status['num_frames_written']}/{status['num_frames']} frames, complete={status['complete']}")
    return 0


def _cmd_status(args) -> int:
    from .progress import format_status, run_status

    status = run_status(args.store, seams=args.seams)  # store + per-rank heartbeats (+ seams)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    print(format_status(status))
    return 0


def _cmd_export(args) -> int:
    from .export import export_mp4

    try:
        count = export_mp4(args.store, args.output, fps=args.fps, allow_incomplete=args.allow_incomplete,
                           overwrite=args.overwrite)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:  # the output path: nothing written
        print(f"hpcvideo export: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {count} frames")
    return 0


def _cmd_verify(args) -> int:
    from .store import RunStore
    from .store.integrity import format_verify

    report = RunStore.open(args.store, mode="r").verify()
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_verify(report))
    return report["exit_code"]


def _cmd_tiny(args) -> int:
    from .check import cache_folder
    from .models import build_tiny_wan, ensure_tiny_wan

    path = build_tiny_wan(args.path, seed=args.seed) if args.path else ensure_tiny_wan(cache_folder())
    print(path)
    return 0


def _cmd_train_demo(args) -> int:
    from .demo.train import run_from_args

    print(run_from_args(args))
    return 0


def _cmd_submit(args) -> int:
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from .launch.slurm import NotOnClusterError, load_submit_config, submit

    cfg = load_submit_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output)
    prompts = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    try:
        submitted = submit(cfg, prompts=prompts)  # checks everything, then SLURM's presence, then creates the store
    except NotOnClusterError as error:  # checked before anything is created
        print(f"hpcvideo submit: error: {error}", file=sys.stderr)
        return 2
    except (FailedJobError, FailedSubmissionError) as error:  # sbatch itself refused (its message is the error); what was created is gone
        reason = " ".join(str(error).split()) or "no message"
        print(f"hpcvideo submit: error: sbatch refused the job: {reason}", file=sys.stderr)
        return 1
    for item in submitted:
        print(f"job {item.job_id}: store {item.store_path}  logs {item.log_folder}")
    if not args.wait:
        return 0
    from .launch.wait import wait_for_results

    code = 0
    for item in submitted:
        try:
            status = wait_for_results(item.job)[0]  # rank 0's return value (every task returns; the others None)
            print(f"job {item.job_id}: {status['path']}: {status['num_frames_written']}/{status['num_frames']} frames, "
                  f"complete={status['complete']}")
        except Exception as error:  # noqa: BLE001 - submitit's UncompletedJobError/FailedJobError carry the logs
            print(f"job {item.job_id} failed: {error}", file=sys.stderr)
            code = 1
    return code


def _cmd_sbatch(args) -> int:
    from .config import load_config
    from .launch.sbatch import render_sbatch
    from .launch.slurm import check_job

    cfg = load_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output,
                      check_paths=False)
    check_job(cfg)  # the job's rank count (cluster section), paths, model, memory: refused here, not in the queue
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    if cfg.store.path:
        cfg.store.path = str(Path(cfg.store.path).resolve())
    overrides = list(args.overrides) + [f"video.num_frames={cfg.video.num_frames}", f"sampling.seed={cfg.sampling.seed}"]
    sys.stdout.write(render_sbatch(cfg, config=config, overrides=overrides))
    return 0


def _cmd_check(args) -> int:
    from .check import validate_for_model
    from .config import load_config
    from .launch.local import launcher_rank_and_size

    cfg = load_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output,
                      check_paths=False)
    launched = launcher_rank_and_size()
    world_size = args.ranks if args.ranks is not None else (launched[1] if launched else 1)
    cfg = validate_for_model(cfg, world_size, what=f"--ranks {world_size}: " if args.ranks is not None else f"{world_size} rank(s): ")
    units = "clips" if cfg.strategy.name == "videoinfinity" else "blocks"
    print(f"ok: {cfg.video.num_frames} frames in {cfg.num_blocks} {units} ({cfg.strategy.name}) on {world_size} rank(s), "
          f"model {cfg.model.path}, store {cfg.store.path}")
    return 0


def _cmd_clean_shm(args) -> int:
    from .runtime.shm import main as clean_shm

    return clean_shm(args.job_id)


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import check_fits, check_plan, format_plan, make_plan, throughput_from_store

    cfg = load_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output,
                      check_paths=False)
    check_plan(cfg, args.ranks)  # the model's JSON and the rank count (hpcvideo.check.validate_for_model)
    tflops = args.tflops
    if args.from_store:
        tflops = throughput_from_store(cfg, args.from_store)
    plan = make_plan(cfg, num_ranks=args.ranks, throughput_tflops=tflops)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(format_plan(plan, cfg.cluster.gpu_mem_gb))
    check_fits(plan, cfg)  # exit 2 with what would fit
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Config and run warnings as one line for a user (``hpcvideo: warning: ...``), not Python's source-line form;
    a config warning once per job (the ranks of a job load the same config: hpcvideo.runtime.output)."""
    from .config.validate import ConfigWarning
    from .runtime.output import first_process_of_job

    if issubclass(category, ConfigWarning) and not first_process_of_job():
        return
    print(f"hpcvideo: warning: {message}", file=sys.stderr if file is None else file)


COMMANDS = {"submit": _cmd_submit, "sbatch": _cmd_sbatch, "check": _cmd_check, "plan": _cmd_plan, "clean-shm": _cmd_clean_shm, "generate": _cmd_generate, "status": _cmd_status, "export": _cmd_export, "verify": _cmd_verify, "tiny-model": _cmd_tiny,
            "train-demo": _cmd_train_demo}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself (`hpcvideo ...`, `python -m hpcvideo.cli ...`): exit without the teardown
        from .runtime.exit import leave

        leave(main(sys.argv[1:]))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warnings.showwarning = _show_warning
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local folders
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .config import ConfigError
    from .runtime.env import LaunchError
    from .store import StoreError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, StoreError, FileNotFoundError, LaunchError) as error:
        print(f"hpcvideo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handler (hpcvideo.runtime.signals): no traceback
        print(f"hpcvideo {args.command}: interrupted (exit 130)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
