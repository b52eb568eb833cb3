"""The READMEs' commands work as written.

Every command line of every fenced ```bash block in README.md, notebooks/README.md, slurm/README.md and
bench/README.md is either

* in :data:`RUN`: run as written, in document order (README.md first), each once, in one temporary copy of
  the repository, so ``runs/...`` paths land there and each command sees what the ones before it left
  (generate, then status, then export); the value is a piece of output the command must print, or None; or
* in :data:`NOT_RUN`, with the reason it cannot run here (a cluster, a real checkpoint, a package install,
  minutes of benchmark). These are still checked statically: the ``hpcvideo`` arguments parse with the
  CLI's own parser, the extras named in ``pip install`` exist in pyproject.toml, and the repository files
  they name exist.

A command in neither list fails :func:`test_every_command_is_classified`, as does a list entry that no
README has any more. ```python blocks are run too, after the shell commands of the same file before them.
Inline code in the prose is not run (commands meant to be typed are in the blocks; inline ones are usage
lines with placeholders or repeat a block's command), but inline `hpcvideo ...` and `pip install ...` spans
must parse (:func:`test_inline_commands_in_the_prose_parse`) and inline repository paths must exist
(:func:`test_repository_paths_named_in_the_docs_exist`).

Running one case alone (``-k``) runs it without the state the commands before it leave.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "notebooks/README.md", "slurm/README.md", "bench/README.md")
MODEL = "--set model.path=/models/Wan2.1-T2V-1.3B-Diffusers"  # the READMEs' stand-in for a real checkpoint

RUN: dict[str, str | None] = {
    # README.md
    "hpcvideo generate tiny-cpu --output runs/tiny-cpu.zarr --frames 109": "runs/tiny-cpu.zarr: 109/109 frames, complete=True",
    "hpcvideo status runs/tiny-cpu.zarr": "frames     109/109 written",
    "hpcvideo export runs/tiny-cpu.zarr runs/tiny-cpu.mp4": "runs/tiny-cpu.mp4: 109 frames",
    "hpcvideo generate demo-cpu --output runs/demo-100.zarr --frames 100": "runs/demo-100.zarr: 100/100 frames, complete=True",
    "hpcvideo export runs/demo-100.zarr runs/demo-100.mp4": "runs/demo-100.mp4: 100 frames",
    "hpcvideo generate tiny-test --output runs/x.zarr --ranks 4": "runs/x.zarr: 29/29 frames, complete=True",
    "mpiexec -n 2 hpcvideo generate tiny-test --output runs/x.zarr --frames 61": "runs/x.zarr: 61/61 frames, complete=True",
    "hpcvideo generate tiny-vi-wan --output runs/vi.zarr --ranks 4": "runs/vi.zarr: 29/29 frames, complete=True",
    "hpcvideo generate tiny-vi-unet3d --output runs/vu.zarr --ranks 2": "runs/vu.zarr: 16/16 frames, complete=True",
    "hpcvideo check tiny-vi-wan --output runs/vi.zarr --ranks 4": None,
    "hpcvideo plan tiny-cpu --ranks 2": "tiny-wan-v2-seed0: 2 rank(s), 18 blocks, 25 ticks",
    "hpcvideo plan tiny-vi-wan --ranks 4 --set model.text_encoder_device=cpu": "Video-Infinity, 4 rank(s) = clips",
    "hpcvideo status runs/tiny-cpu.zarr --seams": "seams      block boundaries: 3 over 109 frames",
    "HPCVIDEO_RUN=runs/tiny-cpu.zarr jupyter execute notebooks/inspect_run.ipynb": None,
}

CLUSTER = "needs a SLURM cluster"
CHECKPOINT = "needs a real Wan2.1 checkpoint at /models/... (nothing is downloaded)"
INSTALL = "installs packages into the current environment (tests run in one that .ci/run installed with .[dev])"
NOT_RUN: dict[str, str] = {
    # README.md
    "python3 -m venv .venv && . .venv/bin/activate && PIP_CONSTRAINT=constraints.txt pip install -e . && "
    "hpcvideo generate demo-cpu --output runs/demo.zarr && hpcvideo export runs/demo.zarr runs/demo.mp4":
        "a fresh venv and the default install: .ci/run runs this line itself (with a small --frames)",
    "pip install -e '.[mpi]'": INSTALL,
    "pip install -e '.[notebook]'": INSTALL,
    "pip install -e '.[dev]'": INSTALL,
    "bash .ci/run": "is CI itself: a fresh venv and the whole test suite (about 10 minutes on 2 cores)",
    f"srun --mpi=pmi2 -n 4 hpcvideo generate wan2.1-t2v-1.3b {MODEL} -o runs/y.zarr": f"{CLUSTER}; {CHECKPOINT}",
    "hpcvideo train-demo --output runs/demo-model": "trains the demo model: about an hour on one CPU thread",
    "hpcvideo generate demo-cpu --set model.path=runs/demo-model --output runs/demo-retrained.zarr":
        "needs the model the hour-long train-demo command writes",
    "python bench/bench_demo.py": "benchmark: tens of minutes (every part generates its videos afresh)",
    f"hpcvideo check wan2.1-t2v-1.3b {MODEL} --ranks 4": CHECKPOINT,
    f"hpcvideo plan wan2.1-t2v-1.3b {MODEL} --set cluster.gpu_mem_gb=80": CHECKPOINT,
    f"hpcvideo submit wan2.1-t2v-1.3b {MODEL} --output runs/long.zarr": f"{CLUSTER}; {CHECKPOINT}",
    "hpcvideo generate wan2.2-ti2v-5b --set model.path=/models/Wan2.2-TI2V-5B-Diffusers --image first.png "
    "-o runs/fox.zarr": "needs a real Wan2.2-TI2V-5B checkpoint and an image (tests/test_conditioning.py runs tiny ones)",
    "hpcvideo plan wan2.2-ti2v-5b --set model.path=/models/Wan2.2-TI2V-5B-Diffusers --set cluster.gpu_mem_gb=80":
        "needs the real checkpoint's configs (tests/test_conditioning.py plans the preset on them)",
    f"sbatch slurm/generate.sbatch wan2.1-t2v-1.3b {MODEL} --output runs/long.zarr": f"{CLUSTER}; {CHECKPOINT}",
    "HPCVIDEO_RUN=runs/tiny-cpu.zarr jupyter lab notebooks/inspect_run.ipynb":
        "starts an interactive JupyterLab server (the same notebook runs headless with `jupyter execute`)",
    # slurm/README.md
    f"hpcvideo sbatch wan2.1-t2v-1.3b {MODEL} --output runs/long.zarr > run.sbatch": CHECKPOINT,
    "sbatch run.sbatch": CLUSTER,
    "bash slurm/lab/up.sh": "starts SLURM daemons: needs root and Debian's slurm packages (tests/test_cluster.py runs it)",
    "bash slurm/lab/down.sh": "stops the SLURM daemons up.sh started (tests/test_cluster.py runs it)",
    "bash slurm/lab/up.sh --nodes 2 /tmp/hpcvideo-nodes":
        "starts SLURM daemons in network namespaces: needs root (tests/test_multinode.py runs it)",
    ". /tmp/hpcvideo-nodes/env.sh && sinfo -N": "needs the lab of the line before (tests/test_multinode.py runs sinfo)",
    "bash slurm/lab/down.sh /tmp/hpcvideo-nodes": "stops that lab (tests/test_multinode.py runs it)",
    # bench/README.md
    "python bench/bench_generate.py": "benchmark: minutes",
    "python bench/bench_pipeline.py --quick": "benchmark: 2-3 minutes",
    "python bench/bench_videoinfinity.py": "benchmark: 5-8 minutes",
    "python bench/bench_integrity.py": "benchmark: minutes (tests/test_integrity.py tests each mechanism)",
    "python bench/bench_ranks.py --ranks 1,2,4": "benchmark: several minutes of whole runs",
    "python bench/report.py --quick": "benchmark report: about 30 minutes",
    "python bench/bench_real_arch.py": "benchmark: minutes and about 9 GB (the 1.3B architecture on CPU)",
    "python bench/bench_cfg_parallel.py": "benchmark: 2-3 minutes (2 ranks, alternating runs)",
    "python bench/bench_vae_decode.py --latent-frames 1": "benchmark: minutes and several GB (Wan2.1's VAE at 480x832)",
    "python bench/gpu_check.py": "needs a GPU to measure; its no-GPU exit is tested in tests/test_plan.py",
}

TIMEOUT_S = 600  # per command; the slowest take about 15 s on 2 idle cores


@dataclass(frozen=True)
class Snippet:
    doc: str
    lang: str  # "bash" | "python"
    text: str  # a bash command line (trailing comment removed, spaces collapsed) or a whole python block

    def __str__(self) -> str:
        return f"{self.doc}: {self.text}"


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def snippets(doc: str) -> list[Snippet]:
    """The bash command lines and python blocks of ``doc``, in order (continuation lines joined)."""
    out: list[Snippet] = []
    text = (REPO / doc).read_text()
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "python":
            out.append(Snippet(doc, "python", body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                command = " ".join(strip_comment(line).split())
                if command:
                    out.append(Snippet(doc, "bash", command))
    return out


ALL = [s for doc in DOCS for s in snippets(doc)]
COMMANDS = [s for s in ALL if s.lang == "bash"]


def _first_occurrences() -> list[Snippet]:
    seen, out = set(), []
    for s in ALL:
        if s.lang == "python" or (s.text in RUN and s.text not in seen):
            seen.add(s.text)
            out.append(s)
    return out


TO_RUN = _first_occurrences()


def test_every_command_is_classified():
    texts = {s.text for s in COMMANDS}
    unclassified = [str(s) for s in COMMANDS if s.text not in RUN and s.text not in NOT_RUN]
    assert not unclassified, ("README commands neither run by this test nor listed in NOT_RUN with a reason "
                              f"(add each to RUN or NOT_RUN in {Path(__file__).name}): {unclassified}")
    stale = [c for c in (*RUN, *NOT_RUN) if c not in texts]
    assert not stale, f"listed here but in no README any more: {stale}"
    assert not set(RUN) & set(NOT_RUN)
    assert all(reason.strip() for reason in NOT_RUN.values())


def _hpcvideo_args(tokens: list[str]) -> list[list[str]]:
    """The hpcvideo arguments of each ``&&``-separated part of a command line (after srun/mpiexec/env
    assignments; ``sbatch slurm/generate.sbatch`` takes generate's), without redirections."""
    parts, part = [], []
    for token in [*tokens, "&&"]:
        if token != "&&":
            part.append(token)
            continue
        for stop in (">", "|"):
            if stop in part:
                part = part[:part.index(stop)]
        if "hpcvideo" in part:
            parts.append(part[part.index("hpcvideo") + 1:])
        elif part[:2] == ["sbatch", "slurm/generate.sbatch"]:
            parts.append(["generate", *part[2:]])
        part = []
    return parts


@pytest.mark.parametrize("command", sorted(NOT_RUN), ids=lambda c: c[:60])
def test_commands_not_run_are_well_formed(command):
    """What cannot run here still names real subcommands, options, extras and files."""
    from hpcvideo.cli import build_parser

    tokens = shlex.split(command)
    for args in _hpcvideo_args(tokens):
        try:
            build_parser().parse_args(args)
        except SystemExit as error:  # argparse's exit on a bad argument
            pytest.fail(f"{command!r}: hpcvideo {shlex.join(args)} does not parse (exit {error.code})")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for token in tokens:
        match = re.fullmatch(r"\.\[(\w+)\]", token)
        if match:
            assert match.group(1) in extras, f"{command!r}: no extra {match.group(1)!r} in pyproject.toml"
        if re.match(r"(\.ci|bench|slurm|notebooks|configs)/", token):
            assert (REPO / token).exists(), f"{command!r}: {token} is not in the repository"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the repository's files (tracked and untracked, not ignored ones), where the commands run."""
    work = tmp_path_factory.mktemp("readme") / "hpcvideo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=False)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (REPO / name).is_file():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, work / name)
    else:  # not a git checkout (an unpacked source archive)
        shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "__pycache__"))
    return work


@pytest.mark.e2e
@pytest.mark.parametrize("snippet", TO_RUN, ids=lambda s: f"{s.doc}: {s.text.splitlines()[0][:70]}")
def test_command_runs_as_written(snippet, workdir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if snippet.lang == "python":
        argv = [sys.executable, "-c", snippet.text]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", snippet.text]
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{snippet} exited {result.returncode}:\n{output[-3000:]}"
    expected = RUN.get(snippet.text)
    if expected is not None:
        assert expected in output, f"{snippet}: {expected!r} not in its output:\n{output[-3000:]}"


INLINE_COMMAND = re.compile(r"`((?:hpcvideo|pip install) [^`]*)`")
PLACEHOLDERS = {"N": "2", "K": "1", "S": "0", "F": "16", "FILE": "prompts.txt", "DIR": "folder"}


def test_inline_commands_in_the_prose_parse():
    """Inline `hpcvideo ...` spans (usage lines included: ``[--ranks N]`` is read as ``--ranks 2``) name real
    subcommands and options; inline `pip install` spans name real extras."""
    from hpcvideo.cli import build_parser

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    bad = []
    for doc in (*DOCS, "docs/DESIGN.md"):
        for span in INLINE_COMMAND.findall((REPO / doc).read_text()):
            if span.startswith("pip"):
                bad += [f"{doc}: {span}" for extra in re.findall(r"\.\[(\w+)\]", span) if extra not in extras]
                continue
            usage = re.sub(r"\.\.\.|[\[\]]", " ", span)  # [--ranks N]... -> --ranks N
            for args in _hpcvideo_args([PLACEHOLDERS.get(t, t) for t in shlex.split(usage)]):
                if len(args) == 1:  # a subcommand named in the prose
                    if args[0] not in subcommands:
                        bad.append(f"{doc}: {span}")
                    continue
                try:
                    build_parser().parse_args(args)
                except SystemExit:
                    bad.append(f"{doc}: {span}")
    assert not bad, bad


PATH_SPAN = re.compile(r"`((?:hpcvideo|configs|docs|bench|slurm|notebooks|tests|\.ci)/[\w./-]*)`")


def test_repository_paths_named_in_the_docs_exist():
    docs = [*DOCS, *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md")))]
    missing = [f"{doc}: {path}" for doc in docs for path in PATH_SPAN.findall((REPO / doc).read_text())
               if not (REPO / path).exists()]
    assert not missing, missing


def test_docs_refer_to_nothing_outside_the_repository():
    pattern = re.compile(r"\.\./shared|\bissue \d+|DESIGN(\.md)? ?§|/work/|notes/cluster")
    docs = [*DOCS, *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md"))),
            "notebooks/inspect_run.ipynb", "bench/results/report.md", "bench/results/report.json"]
    found = [f"{doc}: {m.group(0)}" for doc in docs for m in pattern.finditer((REPO / doc).read_text())]
    assert not found, found


def _load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_report_writes_repository_relative_paths(tmp_path):
    report = _load_report_module()
    repo, env = tmp_path / "checkout", tmp_path / "venv"
    value = {"machine": {"mpiexec": f"{repo}/.venv/bin/mpiexec", "cpus": 2},
             "suite": [f"{env}/bin/python", f"error in {repo}/bench/x.py line 3", str(repo)]}
    assert report.relative_paths(value, repo=repo, prefix=str(env)) == {
        "machine": {"mpiexec": ".venv/bin/mpiexec", "cpus": 2},
        "suite": ["<python env>/bin/python", "error in bench/x.py line 3", "."]}


def test_committed_bench_results_hold_no_machine_path():
    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    absolute = [s for s in strings(json.loads((REPO / "bench/results/report.json").read_text()))
                if re.search(r"(^|[\s'\"(=])/(?!/)\w", s)]
    assert not absolute, absolute
