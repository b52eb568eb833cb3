"""notebooks/inspect_run.ipynb runs top to bottom (nbclient) against a tiny run and a just-created store,
with the kernel started in notebooks/ as Jupyter does (the just-created store, named by a path relative to the
repository root, is executed once and read by two tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

from hpcvideo.metrics import seam_metric
from hpcvideo.store import RunStore
from tests.helpers import copy_store

pytestmark = pytest.mark.e2e  # each test starts a Jupyter kernel and runs the whole notebook

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "inspect_run.ipynb"


def execute(run_path, monkeypatch, notebook: Path = NOTEBOOK) -> list:
    """Execute ``notebook`` on ``run_path`` with the kernel's working directory in the notebook's folder
    (as Jupyter starts it); returns its code cells (CellExecutionError fails the test)."""
    monkeypatch.setenv("HPCVIDEO_RUN", str(run_path))  # the kernel inherits the environment
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
    return [c for c in nb.cells if c.cell_type == "code"]


def create_empty_store(path: Path) -> None:
    """A store as a job leaves it in its first minutes: created, nothing done, no heartbeat, no tick."""
    RunStore.create(path, config={"strategy": {"name": "dualparal"}}, num_latent_frames=4, block_latent_frames=2,
                    latent_channels=1, latent_height=1, latent_width=1, height=8, width=8, fps=16.0, model_id="x")


def outputs(cell, kind: str) -> list:
    return [o for o in cell.outputs if kind in o.get("data", {})]


def text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_on_a_tiny_run(tmp_path, monkeypatch, tiny_test_run):
    """On a copy of the session's finished tiny-test run (tests/conftest.py)."""
    path = copy_store(tiny_test_run, tmp_path / "run.zarr")
    cells = execute(path, monkeypatch)
    by_source = {key: next(c for c in cells if key in c.source)
                 for key in ("print(format_status", "GRID_FRAMES).round", "to_jshtml", "tick_times", "return_frame_diff")}
    assert "ticks      7/7" in text(by_source["print(format_status"]) and outputs(by_source["print(format_status"], "image/png")
    assert outputs(by_source["GRID_FRAMES).round"], "image/png")
    assert any("<script" in o.data["text/html"] for o in outputs(by_source["to_jshtml"], "text/html"))
    assert outputs(by_source["tick_times"], "image/png")
    seams = seam_metric(path)
    assert f"overall seam ratio {seams['overall']}" in text(by_source["return_frame_diff"])
    assert outputs(by_source["return_frame_diff"], "image/png")


@pytest.fixture(scope="module")
def run_named_from_notebooks(tmp_path_factory):
    """The notebook executed once, as Jupyter runs it from notebooks/ in a repository, on ``HPCVIDEO_RUN=runs/new.zarr``
    (relative to the repository root, as the READMEs write it): a store with nothing done yet, as a job leaves it in
    its first minutes. (repository folder, notebook copy, code cells); two tests read it."""
    repo = tmp_path_factory.mktemp("notebook-repo") / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # marks the repository root
    notebook = repo / "notebooks" / NOTEBOOK.name
    shutil.copy(NOTEBOOK, notebook)
    create_empty_store(repo / "runs" / "new.zarr")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cells = execute("runs/new.zarr", monkeypatch, notebook)
    return repo, notebook, cells


def test_notebook_on_a_store_with_nothing_done_yet(run_named_from_notebooks):
    """The first minutes of a job: a store with no block done, no heartbeat, no tick."""
    _, _, cells = run_named_from_notebooks
    printed = "".join(text(c) for c in cells)
    for message in ("no heartbeat yet", "no frames decoded yet", "not enough frames decoded yet", "no tick recorded yet",
                    "0 over 0 frames"):
        assert message in printed


def test_notebook_finds_a_relative_run_from_the_notebooks_folder(run_named_from_notebooks, monkeypatch):
    """``HPCVIDEO_RUN=runs/NAME.zarr`` (relative to the repository root, as the READMEs write it) works when
    Jupyter starts the kernel in notebooks/; the search stops at the repository root and a miss names the path."""
    repo, notebook, cells = run_named_from_notebooks
    opened = next(c for c in cells if "RUN_PATH = find_run(RUN)" in c.source)
    assert text(opened).splitlines()[0] == str(repo / "runs" / "new.zarr")
    assert "no heartbeat yet" in "".join(text(c) for c in cells)

    create_empty_store(repo.parent / "runs" / "above-the-root.zarr")  # outside the repository: not searched
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        execute("runs/above-the-root.zarr", monkeypatch, notebook)
    assert "run store 'runs/above-the-root.zarr' not found in" in str(error.value)
    assert f"{repo / 'notebooks'}, {repo}; set HPCVIDEO_RUN" in str(error.value)
