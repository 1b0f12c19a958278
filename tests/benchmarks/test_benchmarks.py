"""Benchmarks are not run by the suite, but every sumcircuit name they import must exist (they import lazily)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from helpers import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "examples").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(script: Path) -> None:
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sumcircuit"):
            module = importlib.import_module(str(node.module))
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert not missing, f"{script.name} imports names that no longer exist: {missing}"
