"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations

from functools import partial
from typing import Any


class SumcircuitError(Exception):
    """Base class: anything raised as this is shown to the user as a one-line message.

    Example:
        >>> import sumcircuit as sc
        >>> try:
        ...     sc.DataConfig("x", max_tokens=8)
        ... except sc.SumcircuitError as err:
        ...     print(err)
        max_tokens: must be >= 16, got 8
    """


class ModelError(SumcircuitError):
    """A model spec that cannot be resolved or loaded, or an unsupported architecture."""


class ConfigError(SumcircuitError):
    """A bad value for one parameter of a config or an API call.

    The message names the *parameter* (``batch_size: must be >= 1, got 0``):
    the library speaks in parameter names, and the CLI, which knows which
    flag set each parameter, rewrites the name as the flag (``--batch-size``).

    Args:
        param: the parameter's name, as the API spells it.
        reason: what is wrong with its value and what was expected.

    Example:
        >>> ConfigError("batch_size", "must be >= 1, got 0").param
        'batch_size'
    """

    def __init__(self, param: str, reason: str) -> None:
        self.param, self.reason = param, reason
        super().__init__(f"{param}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.param, self.reason)  # rebuilt whole in another process (a Ray stage's error)


class DataError(SumcircuitError):
    """A bad data record or source. Names the file, line and field so the user can fix it."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ":".join(str(p) for p in (file, line) if p is not None)
        parts = [where] if where else []
        if field is not None:
            parts.append(f"field '{field}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return partial(type(self), file=self.file, line=self.line, field=self.field), (self.reason,)
