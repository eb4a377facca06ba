"""The notebooks run from a fresh clone: each is executed on small data it makes itself."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel from the repository root; raise on any error."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """All text the cells printed or displayed, and the MIME types of rich outputs."""
    text, kinds = [], []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/markdown", "") + data.get("text/plain", ""))
            kinds += list(data)
    return "\n".join(text), kinds


@pytest.mark.parametrize("name", ["tour.ipynb", "inspect_results.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_tour_times_both_jobs_on_every_backend_and_draws_the_chart():
    text, kinds = outputs(execute("tour.ipynb"))
    for setup in ["sync", "threads (2)", "threads (8)", "processes (2)", "distributed (2)"]:
        assert text.count(f"{setup:<16} ") == 2, setup  # the I/O job and the CPU job
    assert "partition_size  1:" in text and "partition_size 40:" in text
    assert "dashboard: http://127.0.0.1:" in text
    assert "image/png" in kinds


@pytest.mark.slow
def test_inspect_results_reports_failures_sizes_and_thumbnails():
    text, kinds = outputs(execute("inspect_results.ipynb"))
    assert "'counts': {'failed': 5, 'ok': 17, 'skipped': 0}" in text
    for row in ["| `http_4xx` | 2 | download |", "| `truncated` | 1 | decode |", "| `empty` | 1 |"]:
        assert row in text
    assert kinds.count("image/png") == 2  # the histograms and the contact sheet
