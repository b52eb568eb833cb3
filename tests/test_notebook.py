"""notebooks/inspect_run.ipynb runs top to bottom (nbclient) against a tiny run and a just-created store."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

from hpcvideo.config import load_config
from hpcvideo.generate import generate
from hpcvideo.metrics import seam_metric
from hpcvideo.store import RunStore

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "inspect_run.ipynb"


def execute(run_path, monkeypatch) -> list:
    """Execute the notebook on ``run_path``; returns its code cells (CellExecutionError fails the test)."""
    monkeypatch.setenv("HPCVIDEO_RUN", str(run_path))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return [c for c in nb.cells if c.cell_type == "code"]


def outputs(cell, kind: str) -> list:
    return [o for o in cell.outputs if kind in o.get("data", {})]


def text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_notebook_on_a_tiny_run(tmp_path, monkeypatch, tiny_model_dir):
    cfg = load_config("tiny-test", output=tmp_path / "run.zarr")
    generate(cfg, progress=False)
    cells = execute(cfg.store.path, monkeypatch)
    by_source = {key: next(c for c in cells if key in c.source)
                 for key in ("print(format_status", "GRID_FRAMES).round", "to_jshtml", "tick_times", "return_frame_diff")}
    assert "ticks      7/7" in text(by_source["print(format_status"]) and outputs(by_source["print(format_status"], "image/png")
    assert outputs(by_source["GRID_FRAMES).round"], "image/png")
    assert any("<script" in o.data["text/html"] for o in outputs(by_source["to_jshtml"], "text/html"))
    assert outputs(by_source["tick_times"], "image/png")
    seams = seam_metric(cfg.store.path)
    assert f"overall seam ratio {seams['overall']}" in text(by_source["return_frame_diff"])
    assert outputs(by_source["return_frame_diff"], "image/png")


def test_notebook_on_a_store_with_nothing_done_yet(tmp_path, monkeypatch):
    """The first minutes of a job: a store with no block done, no heartbeat, no tick."""
    path = tmp_path / "new.zarr"
    RunStore.create(path, config={"strategy": {"name": "dualparal"}}, num_latent_frames=4, block_latent_frames=2,
                    latent_channels=1, latent_height=1, latent_width=1, height=8, width=8, fps=16.0, model_id="x")
    cells = execute(path, monkeypatch)
    printed = "".join(text(c) for c in cells)
    for message in ("no heartbeat yet", "no frames decoded yet", "not enough frames decoded yet", "no tick recorded yet",
                    "0 over 0 frames"):
        assert message in printed
