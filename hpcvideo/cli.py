"""Command line: ``hpcvideo generate | status | export | tiny-model``.

Every command validates its input first and exits with status 2 and a one-screen message naming
the key, the value and what is allowed; nothing is created or submitted before that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file or preset name in configs/ (e.g. tiny-cpu)")
    parser.add_argument("--output", "-o", help="run store path (overrides store.path)")
    parser.add_argument("--frames", type=int, help="number of pixel frames, 4k+1 (overrides video.num_frames)")
    parser.add_argument("--seed", type=int, help="random seed (overrides sampling.seed)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.num_inference_steps=20 (repeatable; YAML values)",
    )


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
        "one DualParal pipeline stage per rank; per-rank logs in RUN.zarr.logs/",
    )

    status = sub.add_parser("status", help="progress of a run store (works while the run is going)")
    status.add_argument("store")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    export = sub.add_parser("export", help="write the frames of a run store to an mp4 (PyAV)")
    export.add_argument("store")
    export.add_argument("output")
    export.add_argument("--fps", type=float, default=None, help="frames per second (default: the run's video.fps)")

    tiny = sub.add_parser("tiny-model", help="build (or find) the cached tiny random-weight Wan model; prints its path")
    tiny.add_argument("--path", default=None, help="build into this folder instead of the cache")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _cmd_generate(args) -> int:
    from .config import load_config
    from .launch.local import maybe_relaunch

    cfg = load_config(args.config, args.overrides, num_frames=args.frames, seed=args.seed, output=args.output)
    code = maybe_relaunch(args.ranks, args.argv, log_dir=Path(f"{cfg.store.path}.logs"))  # after validation
    if code is not None:
        return code
    from .generate import generate

    status = generate(cfg, progress=not args.no_progress and sys.stderr.isatty())
    if status is None:  # not rank 0
        return 0
    print(f"{status['path']}: {status['num_frames_written']}/{status['num_frames']} frames, complete={status['complete']}")
    return 0


def _cmd_status(args) -> int:
    from .store import RunStore

    status = RunStore.open(args.store, mode="r").status_dict()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    for key in sorted(status):
        print(f"{key}: {status[key]}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_mp4

    count = export_mp4(args.store, args.output, fps=args.fps)
    print(f"{args.output}: {count} frames")
    return 0


def _cmd_tiny(args) -> int:
    from .models import build_tiny_wan, ensure_tiny_wan

    path = build_tiny_wan(args.path, seed=args.seed) if args.path else ensure_tiny_wan()
    print(path)
    return 0


COMMANDS = {"generate": _cmd_generate, "status": _cmd_status, "export": _cmd_export, "tiny-model": _cmd_tiny}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local folders
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .config import ConfigError
    from .store import StoreError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, StoreError, FileNotFoundError) as error:
        print(f"hpcvideo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
