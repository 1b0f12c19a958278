"""Lazy exports: a package names its public objects and imports each module on first use.

``import sumcircuit`` (and every subpackage) must stay light so that
``sumcircuit --help`` answers at once and a notebook imports the package in
milliseconds; the torch-using modules load when a name that needs them is
first used. Every package's ``__getattr__`` is made here, once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` (a submodule of ``package``, or a full module path).

    Args:
        package: the package's ``__name__``.
        table: public name -> the module that defines it (``"run"`` or ``"sumcircuit.analysis.run"``).
        namespace: the package's ``globals()``; a name, once imported, is stored there.

    Returns:
        The ``__getattr__`` to assign in the package.

    Example:
        >>> __getattr__ = lazy_getattr(__name__, {"analyze": "run"}, globals())  # doctest: +SKIP
    """
    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = module if module.startswith("sumcircuit") else f"{package}.{module}"
        value = getattr(importlib.import_module(path), name)
        namespace[name] = value
        return value
    return __getattr__
