"""The package's shape, checked: no import cycles, modules of a readable size, documented public names."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import sumcircuit as sc

SRC = Path(sc.__file__).parent
LONG = 420  # lines; a longer module states at its top why it is one module


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules of ours imported when ``path`` is imported (not inside functions or ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("sumcircuit")}
            elif isinstance(sub, ast.ImportFrom):
                module = sub.module or ""
                if sub.level:
                    module = ".".join(package.split(".")[:len(package.split(".")) - sub.level + 1] + [module])
                if module.startswith("sumcircuit"):
                    out.add(module)
                    out |= {f"{module}.{a.name}" for a in sub.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _top_level_imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_config_modules_import_no_torch_or_numpy() -> None:
    """The CLI builds every parser from the configs, so they must stay light."""
    graph = _graph()
    for name in ("sumcircuit.config", "sumcircuit.analysis.config", "sumcircuit.causal.config",
                 "sumcircuit.training.config", "sumcircuit.evaluation.config", "sumcircuit.circuit.config",
                 "sumcircuit.study.config", "sumcircuit.data.config", "sumcircuit.runtime"):
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo += graph[current]
        for module in seen:
            text = (SRC.parent / (module.replace(".", "/") + ".py")).read_text() \
                if (SRC.parent / (module.replace(".", "/") + ".py")).is_file() \
                else (SRC.parent / module.replace(".", "/") / "__init__.py").read_text()
            heavy = [line for line in text.splitlines() if line.startswith(("import torch", "import numpy",
                                                                             "from torch", "import transformers"))]
            assert not heavy, (name, module, heavy)


def test_long_modules_say_why() -> None:
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > LONG:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "One module because" in doc, f"{path.relative_to(SRC)}: {len(lines)} lines, no reason at its top"


def test_lazy_exports_never_shadow_a_submodule() -> None:
    """A package's lazy name equal to one of its submodules was replaced by the module on first import."""
    for package in ("sumcircuit", "sumcircuit.analysis", "sumcircuit.causal", "sumcircuit.circuit", "sumcircuit.data",
                    "sumcircuit.generalization",
                    "sumcircuit.evaluation", "sumcircuit.study", "sumcircuit.training"):
        module = importlib.import_module(package)
        submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
        assert not set(module.__all__) & submodules, (package, set(module.__all__) & submodules)
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)


def _public_objects() -> list[tuple[str, object]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        if name.startswith("sumcircuit.cli.") and path.stem not in ("generate", "common"):
            continue  # command modules: register/run, documented by their --help
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{name}.{attr}", obj))
                if inspect.isclass(obj):
                    for member, value in vars(obj).items():
                        if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                            out.append((f"{name}.{attr}.{member}", getattr(obj, member)))
    return out


def test_every_public_function_and_class_has_a_docstring() -> None:
    missing = [name for name, obj in _public_objects() if not inspect.getdoc(obj)]
    assert not missing, f"{len(missing)} without a docstring: {missing[:20]}"


def test_the_api_documents_arguments_returns_and_an_example() -> None:
    """What ``import sumcircuit as sc`` offers: every function says Args, Returns and shows an example."""
    problems = []
    for name in sc.__all__:
        obj = getattr(sc, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if "Example" not in doc and ">>>" not in doc:
            problems.append(f"{name}: no example")
        if inspect.isfunction(obj):
            params = [p for p in inspect.signature(obj).parameters.values() if p.kind != p.VAR_KEYWORD]
            if params and "Args:" not in doc:
                problems.append(f"{name}: no Args")
            if inspect.signature(obj).return_annotation not in ("None", None) and "Returns:" not in doc:
                problems.append(f"{name}: no Returns")
    assert not problems, problems
