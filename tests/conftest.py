"""Shared test set-up: a private model cache per session, offline hub, quiet logs; session fixtures for what
several files only read (the tiny models, one finished tiny-test run) and the forker (tests/helpers.py).

Layers (markers, pyproject.toml): unit (in this process, seconds), e2e (whole runs of the CLI, in this process,
a fork or a subprocess), mpi (several ranks under mpiexec), slurm (a real SLURM). `python -m pytest -q tests`
runs them all; `-m unit` is the quick loop, `-m "not slurm"` skips the cluster lab."""

import json
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def hpcvideo_cache(tmp_path_factory):
    """Every test and every subprocess builds/reads the tiny model in a session-private cache."""
    cache = tmp_path_factory.mktemp("hpcvideo-cache")
    previous = os.environ.get("HPCVIDEO_CACHE")
    os.environ["HPCVIDEO_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield cache
    if previous is None:
        os.environ.pop("HPCVIDEO_CACHE", None)
    else:
        os.environ["HPCVIDEO_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(hpcvideo_cache):
    from hpcvideo.models import ensure_tiny_wan

    return ensure_tiny_wan(hpcvideo_cache)


@pytest.fixture(scope="session")
def tiny_unet3d_dir(hpcvideo_cache):
    from hpcvideo.models.unet3d import ensure_tiny_unet3d

    return ensure_tiny_unet3d(hpcvideo_cache)


@pytest.fixture(scope="session")
def tiny_wan22_dir(hpcvideo_cache):
    """The tiny two-expert Wan2.2-T2V-A14B-layout folder (hpcvideo/models/tiny_wan22.py)."""
    from hpcvideo.models.tiny_wan22 import ensure_tiny_wan22_a14b

    return ensure_tiny_wan22_a14b(hpcvideo_cache)


@pytest.fixture(scope="session")
def forker(hpcvideo_cache):
    """One pre-imported worker per session; each ``forker.run(...)`` is a real, killable process (tests/helpers.py)."""
    from tests.helpers import Forker

    worker = Forker()
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def tiny_test_run(tmp_path_factory, tiny_model_dir):
    """The finished tiny-test run (29 frames = 4 blocks of 2 latent frames, 4 steps, 1 rank), made once per
    session in this process. Read it only; a test that changes a store takes a copy (tests.helpers.copy_store)."""
    from tests.helpers import cli

    path = tmp_path_factory.mktemp("tiny-test-run") / "run.zarr"
    cli("generate", "tiny-test", "--output", path, "--no-progress")
    return path


@pytest.fixture(scope="session")
def tiny_test_arrays(tiny_test_run):
    """(latents, frames) of :func:`tiny_test_run`: the uninterrupted reference every resume is compared with."""
    from tests.helpers import store_arrays

    return store_arrays(tiny_test_run)


LAYERS = ("unit", "e2e", "mpi", "slurm")


def pytest_collection_modifyitems(config, items):
    """A test with none of the layer markers is a unit test (pieces in this process): `-m unit` selects it."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in LAYERS):
            item.add_marker(pytest.mark.unit)
    from pathlib import Path

    from tests.helpers import MPI_READERS

    listed = {name for readers in MPI_READERS.values() for name in readers}
    unlisted = sorted({Path(str(item.fspath)).name for item in items
                       if {"mpi_runs", "mpi_world", "two_rank_run"} & set(getattr(item, "fixturenames", ()))} - listed)
    if unlisted:  # the shared launches make only what MPI_READERS says the selected files read
        raise pytest.UsageError(f"{', '.join(unlisted)} read(s) the shared MPI runs but tests/helpers.py MPI_READERS "
                                "does not list it: add it to the runs and scenarios it reads")


class Made(dict):
    """The runs (or scenarios) of one shared launch: a name it did not make is a clear error."""

    def __missing__(self, name):
        raise KeyError(f"{name!r} was not made by this session's launch: tests/helpers.py lists the files that read it "
                       "(MPI_READERS); add the file of the test that reads it there")


@pytest.fixture(scope="session")
def mpi_launches(request, hpcvideo_cache, tmp_path_factory, tiny_model_dir, tiny_unet3d_dir, tiny_wan22_dir, forker):
    """``mpi_launches(K)``: the one ``mpiexec -n K python tests/mpi/generate_many.py ...`` launch per world size and
    session behind :func:`mpi_runs` and :func:`mpi_world`, made at the first use of either: it runs the scenarios
    of :data:`tests.helpers.MPI_SCENARIOS` first, then every run of :data:`tests.helpers.MPI_RUNS` and the resumes of
    :data:`tests.helpers.MPI_KILLED` of that world size (one interpreter and torch import per rank for all).
    A dict: "runs" (what ``mpi_runs(K)`` returns) and "world" (what ``mpi_world(K)`` returns).
    Only what the session's selected tests read is made (:data:`tests.helpers.MPI_READERS`)."""
    from pathlib import Path

    from hpcvideo.models.tiny_cond import ensure_tiny_ti2v
    from hpcvideo.store import RunStore
    from tests.helpers import (AGAIN, MPI_KILLED, MPI_KILLED_LAST, MPI_READERS, MPI_RUNS, MPI_SCENARIOS, MPIEXEC, Result, mpi_cli,
                               cli, mpirun_script, write_start_image)

    selected = {Path(str(item.fspath)).name for item in request.session.items}

    def wanted(name: str) -> bool:  # a run, killed run or scenario (by its name before ":") a selected test reads
        readers = MPI_READERS.get(name.split(":")[0])
        return readers is None or bool(selected.intersection(readers))

    launches: dict[int, dict] = {}
    ended: dict[str, dict] = {}  # a run of MPI_KILLED_LAST, once the launch it ended is over: "path", "killed"

    def kill(args: list[str], num_ranks: int, fault: str, path) -> dict:
        argv = ["generate", args[0], "--output", path, "--no-progress", *args[1:]]
        if num_ranks == 1:
            result = forker.run(*argv, fault=fault, check=False)
        else:
            result = mpi_cli(num_ranks, *argv, fault=fault, check=False, timeout=120)
        return after_kill(result, path)

    def after_kill(result: Result, path) -> dict:
        logs = "".join(p.read_text() for p in sorted(path.parent.joinpath(f"{path.name}.logs").glob("*.log")))
        store = RunStore.open(path) if RunStore.exists(path) else None
        state = store.load_state("resume") if store is not None else None
        said = [cli("status", path, *flags, check=False).stdout if store is not None else None for flags in (["--json"], [])]
        return {"result": result, "logs": logs, "status": store.status_dict() if store is not None else None,
                "resume_tick": state[1]["tick"] if state is not None else None,
                "status_json": said[0], "status_text": said[1]}

    def launch(num_ranks: int) -> dict:
        if MPIEXEC is None:
            pytest.skip("no mpiexec (pip install mpich)")
        if num_ranks not in launches:
            for name, (_, ranks, _, resume) in MPI_KILLED.items():
                if resume == num_ranks and name in MPI_KILLED_LAST and wanted(name):  # killed at the end of its ranks' launch
                    launch(ranks)
            folder = tmp_path_factory.mktemp(f"mpi-runs-{num_ranks}")
            todo = {name: args for name, args in MPI_RUNS.get(num_ranks, {}).items() if wanted(name)}
            todo.update({name: args for name, (args, _, _, resume) in MPI_KILLED.items()
                         if resume == num_ranks and wanted(name)})
            paths = {name: ended[name]["path"] if name in ended else folder / name / "run.zarr"
                     for name in todo if not name.endswith(AGAIN)}
            paths.update({name: paths[name.removesuffix(AGAIN)] for name in todo if name.endswith(AGAIN)})
            last = [name for name, (_, ranks, _, _) in MPI_KILLED.items()
                    if ranks == num_ranks and name in MPI_KILLED_LAST and wanted(name)]
            assert len(last) <= 1, last
            for name in [*(n for n in todo if n not in ended and not n.endswith(AGAIN)), *last]:
                paths.setdefault(name, folder / name / "run.zarr").parent.mkdir()
            killed = {name: ended[name]["killed"] if name in ended else kill(args, ranks, fault, paths[name])
                      for name, (args, ranks, fault, resume) in MPI_KILLED.items() if name in todo}
            out = folder / "vi_forward.pt"
            scenarios = [s.format(out=out, unet3d=tiny_unet3d_dir, wan=tiny_model_dir, wan22=tiny_wan22_dir)
                         for s in MPI_SCENARIOS.get(num_ranks, []) if wanted(s)]
            fills = {"{ti2v}": lambda: str(ensure_tiny_ti2v(hpcvideo_cache)),  # made only for a run that names it
                     "{image}": lambda: str(write_start_image(folder / "start.png"))}
            for name, args in todo.items():
                for token, make in fills.items():
                    if any(token in arg for arg in args):
                        value = make()
                        todo[name] = args = [arg.replace(token, value) for arg in args]
            argvs = [json.dumps(["generate", args[0], "--output", str(paths[name]), "--no-progress", *args[1:]])
                     for name, args in todo.items()]
            report = folder / "report.json"
            flags = [arg for scenario in scenarios for arg in ("--scenario", scenario)]
            for name in last:
                args, _, fault, _ = MPI_KILLED[name]
                flags += ["--last-with-fault", fault,
                          json.dumps(["generate", args[0], "--output", str(paths[name]), "--no-progress", *args[1:]])]
            result, wall_s = mpirun_script(num_ranks, "generate_many.py", str(report), *flags, *argvs, timeout_s=600)
            for name in last:  # its kill ended the launch, after every other run
                assert result.returncode != 0, result.stdout + result.stderr
                ended[name] = {"path": paths[name], "killed": after_kill(
                    Result(result.returncode, result.stdout, result.stderr, wall_s, result.args), paths[name])}
            assert result.returncode == 0 or last, result.stdout + result.stderr
            reports = json.loads(report.read_text()) if todo else []
            assert len(reports) == len(todo), result.stdout + result.stderr
            world = Made({"result": result})
            for line in result.stdout.splitlines():
                if line.startswith("SCENARIO "):
                    _, scenario, answer = line.split(" ", 2)
                    name = scenario.split(":")[0] if scenario.startswith(("vi_forward:", "experts:")) else scenario
                    world[name] = out if name == "vi_forward" else json.loads(answer)
            assert all((s.split(":")[0] if s.startswith(("vi_forward", "experts")) else s) in world for s in scenarios), \
                result.stdout
            runs = Made({name: {**r, "path": paths[name], **({"killed": killed[name]} if name in killed else {})}
                         for name, r in zip(todo, reports)})
            for name in last:  # resumed by no launch: its test reads the killed store itself
                if MPI_KILLED[name][3] is None:
                    runs[name] = {"path": paths[name], "killed": ended[name]["killed"]}
            launches[num_ranks] = {"runs": runs, "world": world}
        return launches[num_ranks]

    return launch


@pytest.fixture(scope="session")
def mpi_runs(mpi_launches):
    """``mpi_runs(K)[name]``: the run ``name`` of :data:`tests.helpers.MPI_RUNS` or :data:`tests.helpers.MPI_KILLED`
    finished on K ranks, every run of a world size done by the one launch of that world size (:func:`mpi_launches`;
    a killed run: after its own kill launch, which comes first): a dict
    with "path" (the store, in a folder of its own), "returncode", rank 0's "stdout" and "stderr" of that run, and,
    for a killed run, "killed": the kill's Result plus "logs" (every rank's log), "status" (the store's status_dict),
    "resume_tick" (the tick of its resume checkpoint, or None), "status_json" and "status_text" (the output of
    ``hpcvideo status --json`` and ``hpcvideo status``), all read right after the kill. A killed run that no launch
    resumes (MPI_KILLED with resume ranks None) has only "path" and "killed"."""
    return lambda num_ranks: mpi_launches(num_ranks)["runs"]


@pytest.fixture(scope="session")
def two_rank_run(mpi_runs):
    """The store of tiny-test on 2 ranks (``mpi_runs(2)["tiny-test"]``), read by test_pipeline.py and test_plan.py."""
    run = mpi_runs(2)["tiny-test"]
    assert run["returncode"] == 0, run["stderr"]
    return run["path"]


@pytest.fixture(scope="session")
def mpi_world(mpi_launches):
    """``mpi_world(K)``: the scenarios of the one launch per world size and session (:func:`mpi_launches`:
    ``tests/mpi/scenarios.py``'s scenarios run first in it; tests/test_runtime.py, test_preempt.py and
    test_videoinfinity.py read them): a dict with the CompletedProcess ("result"), rank 0's report per scenario
    name ("exchange", "preempt:0:3", ...) and the path of the Video-Infinity forward results ("vi_forward", a
    torch.save file) where that scenario ran, and the two-expert runs' store paths ("experts")."""
    return lambda num_ranks: mpi_launches(num_ranks)["world"]
