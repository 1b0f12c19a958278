"""Registries: one place where each kind of pluggable thing is listed by name.

Fine-tuning methods, causal methods, circuit scores, claims, study arms and
output kinds each live in a :class:`Registry`. Adding one is a new module
plus one registration call; every part of the package that offers a choice
(the CLI's ``choices``, a config's check, the study graph, ``load_run``)
reads the registry, so nothing else changes. A built-in entry may name its
implementation as ``"module:attribute"`` (:func:`resolve`) so that listing
the choices imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from sumcircuit.errors import SumcircuitError

T = TypeVar("T")


class RegistryError(SumcircuitError):
    """An unknown name, or a second entry under a name already taken."""


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        what: what an entry is, for messages ("fine-tuning method").

    Example:
        >>> methods: Registry[str] = Registry("colour")
        >>> methods.register("red", "#f00")
        '#f00'
        >>> methods.get("blue")
        Traceback (most recent call last):
        sumcircuit.registry.RegistryError: unknown colour 'blue'; registered: red
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` (a name already taken is an error unless ``replace``).

        Args:
            name: the name users type (CLI choice, config value).
            entry: the registered object.
            replace: allow replacing an existing entry (tests, user overrides).

        Returns:
            ``entry``, so registration can be written as an assignment.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self._entries and not replace:
            raise RegistryError(f"{self.what} '{name}' is already registered (pass replace=True to replace it)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (tests use this to undo a toy registration)."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name is a one-line error listing the registered ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(f"unknown {self.what} {name!r}; registered: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry of {self.what}s: {', '.join(self._entries)}>"


def resolve(target: str | Callable[..., Any]) -> Any:
    """A callable, or the object a ``"package.module:attribute"`` string names (imported on first use)."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
