"""Benchmarks are not run by the suite, but every sumcircuit name they import must exist (they import lazily)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from helpers import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "examples").glob("*.py"))


def _is_submodule(package: str, name: str) -> bool:
    """``from sumcircuit.training import loop`` names a module, an attribute of its package only once imported
    (so whether it was depended on the order the suite ran in)."""
    return hasattr(importlib.import_module(package), "__path__") and \
        importlib.util.find_spec(f"{package}.{name}") is not None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(script: Path) -> None:
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sumcircuit"):
            module = importlib.import_module(str(node.module))
            missing += [f"{node.module}.{a.name}" for a in node.names
                        if not hasattr(module, a.name) and not _is_submodule(str(node.module), a.name)]
    assert not missing, f"{script.name} imports names that no longer exist: {missing}"


def test_attribution_speed_runs_on_a_tiny_pair(tiny_model_dirs: dict[str, Path]) -> None:
    """The benchmark itself runs (it once crashed unpacking its timer): every method, one length, tiny model."""
    import argparse
    import sys

    from sumcircuit.models import load_model

    from helpers import CNNDM

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.import_module("attribution_speed")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    base = load_model(str(tiny_model_dirs["llama"]))
    tuned = bench.noisy_copy(base)
    for p in (*base.model.parameters(), *tuned.model.parameters()):
        p.requires_grad_(False)
    args = argparse.Namespace(docs=2, batch_size=2, head_layers=2, data=str(CNNDM))
    rows = bench.run_length(base, tuned, 48, args)
    assert [r["method"] for r in rows][-1] == "attribute default (estimates + exact blocks)" and len(rows) == 5
    assert "layers [0, 2]" in rows[3]["method"]  # heads sampled at the first and the last layer
    assert all(r["seconds"] > 0 for r in rows)
