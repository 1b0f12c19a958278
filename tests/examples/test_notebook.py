"""examples/notebook.ipynb runs top to bottom on the real model and data, and shows what it claims to show."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO


@pytest.mark.real
def test_notebook_runs_and_shows_what_it_claims(tmp_path: Path) -> None:
    notebook = nbformat.read(REPO / "examples" / "notebook.ipynb", as_version=4)
    os.environ["SUMCIRCUIT_NOTEBOOK_OUT"] = str(tmp_path)
    try:
        NotebookClient(notebook, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    finally:
        del os.environ["SUMCIRCUIT_NOTEBOOK_OUT"]
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    texts = [out.get("data", {}).get("text/plain", "") or out.get("text", "") for out in outputs]
    reprs = [t for t in texts if t.startswith("<") and "Result" in t]
    assert any(t.startswith("<FinetuneResult lora on all 30 layers: 2 steps") for t in reprs)
    assert any(t.startswith("<AnalysisResult 30 layers x 9 heads, 4 documents") for t in reprs)
    assert all(len(t) < 400 for t in reprs)  # short reprs, not kilobytes of tables
    assert any(t.startswith("DataConfig(data='memory:") for t in texts)  # a datasets.Dataset as data
    assert any(t.strip() in ("inline", "module://matplotlib_inline.backend_inline") for t in texts)  # kept inline
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 1  # the plot shown inline
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert any("blocks.20.attn.hook_z[3] -> L20.H3" in t for t in texts)  # hook names round-trip
    assert any("<TraceResult 4 documents through base, tuned" in t for t in texts)
    assert any(t.startswith("<AnalysisResult") and "read" not in t for t in texts[-1:])  # XResult.read
