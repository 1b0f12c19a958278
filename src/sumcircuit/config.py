"""Configs are the single source of truth for every option: default, type, choices, range and help.

Every operation's config is a frozen dataclass whose fields are declared with
:func:`option`: the default, the help text, the allowed range (:class:`Bound`)
and, for closed sets, a ``Literal`` type. Three things read that one
declaration, so they cannot drift apart:

- :class:`Config` checks every value when a config is made (a wrong type,
  choice or range is a :class:`~sumcircuit.errors.ConfigError` naming the
  parameter, never a traceback from deep inside torch later);
- the command line (``sumcircuit.cli.generate``) builds each flag, its
  default, choices and help from the fields;
- provenance and stage keys record ``asdict(config)``.

This module imports neither torch nor numpy: ``sumcircuit --help`` builds
every parser from these declarations and must answer at once.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from sumcircuit.errors import ConfigError, SumcircuitError

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class Bound:
    """A numeric range that an option's value must lie in (ends closed unless marked open).

    Example:
        >>> Bound(1).problem(0)
        'must be >= 1, got 0'
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The range in words: ``>= 1``, ``in (0, 1)``."""
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if math.isinf(self.low):
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def problem(self, value: float) -> str | None:
        """Why ``value`` is outside the range, or None when it is inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        return f"must be {self.describe()}, got {value!r}" if below or above else None


def at_least(low: float) -> Bound:
    """``value >= low``."""
    return Bound(low)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bound:
    """``low <= value <= high`` (either end open when asked)."""
    return Bound(low, high, low_open, high_open)


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
POSITIVE_REAL = Bound(0.0, low_open=True)
NON_NEGATIVE_REAL = Bound(0.0)
PROBABILITY_OPEN = between(0.0, 1.0, low_open=True, high_open=True)


def option(default: Any = MISSING, *, help: str, flag: str | None = None, aliases: Sequence[str] = (),
           bound: Bound | None = None, normalize: Callable[[Any], Any] | None = None,
           choices: Callable[[], Sequence[str]] | None = None, metavar: str | None = None,
           group: str | None = None, cli: bool = True, repeat: bool = False,
           cli_choices: Sequence[str] | None = None, cli_default: Any = MISSING,
           cli_type: Callable[[str], Any] | None = None,
           default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A config field with everything the API, the checks and the CLI need to know about it.

    Args:
        default: the default value (or give ``default_factory``).
        help: one sentence for ``--help`` and the docs; the default is appended unless it is None.
        flag: the CLI flag (default ``--field-name``; ``--no-field-name`` for a bool that defaults to True).
        aliases: further flags accepted for the same field (older spellings).
        bound: the numeric range the value must lie in.
        normalize: maps an API or CLI value to the stored one (``"2-5"`` -> ``(2, 3, 4, 5)``);
            its :class:`~sumcircuit.errors.SumcircuitError` becomes a ConfigError naming the field.
        choices: names allowed for a ``str`` field backed by a registry (read when checked).
        metavar: the CLI's placeholder for the value.
        group: the ``--help`` section the flag is listed under.
        cli: False for fields the command line does not expose.
        repeat: a tuple field filled by repeating the flag (``--stop A --stop B``).
        cli_choices: the words the flag accepts when they differ from the stored values
            (``--direction both`` stores ``("denoise", "noise")``; ``normalize`` maps them).
        cli_default: the flag's default as typed, when it differs from the stored default.
        cli_type: converts the text typed on the command line (``"\\n"`` -> a newline) before the config sees it.
        default_factory: builds the default (for nested configs and mappings).

    Returns:
        A :func:`dataclasses.field` carrying this metadata.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Demo(Config):
        ...     batch_size: int = option(4, help="documents per forward pass", bound=POSITIVE)
        >>> Demo(batch_size=0)
        Traceback (most recent call last):
        sumcircuit.errors.ConfigError: batch_size: must be >= 1, got 0
    """
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "bound": bound, "normalize": normalize,
                "choices": choices, "metavar": metavar, "group": group, "cli": cli, "repeat": repeat,
                "cli_choices": tuple(cli_choices) if cli_choices is not None else None, "cli_default": cli_default,
                "cli_type": cli_type}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a config class (annotations are strings here; resolved once)."""
    if cls not in _TYPES:
        _TYPES[cls] = get_type_hints(cls)
    return _TYPES[cls]


def describe_type(hint: Any) -> str:
    """A type in words, for error messages."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(hint))
    if origin is tuple:
        args = get_args(hint)
        inner = describe_type(args[0]) if args else "values"
        return f"a tuple of {inner}" if len(args) != 2 or args[1] is not Ellipsis else f"a tuple of ({inner})"
    names = {int: "an integer", float: "a number", str: "a string", bool: "True or False", type(None): "None"}
    if hint in names:
        return names[hint]
    return getattr(hint, "__name__", str(hint))


def check_value(param: str, hint: Any, value: Any) -> Any:
    """``value`` checked against the type ``hint``; lists become tuples. Raises ConfigError naming ``param``."""
    origin = get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin is Literal:
        if value not in get_args(hint) or isinstance(value, bool) != any(isinstance(a, bool) for a in get_args(hint)):
            raise ConfigError(param, f"choose {describe_type(hint)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(param, f"expected {describe_type(hint)}, got None")
        first: ConfigError | None = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(param, arg, value)
            except ConfigError as exc:
                first = first or exc
        if first is not None and sum(a is not type(None) for a in args) == 1:
            raise first
        raise ConfigError(param, f"expected {describe_type(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(param, f"expected True or False, got {value!r} ({type(value).__name__})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(param, f"expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(param, f"expected a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(param, f"must be a finite number, got {value}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(param, f"expected a string, got {value!r} ({type(value).__name__})")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(param, f"expected {describe_type(hint)}, got {value!r} ({type(value).__name__})")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(param, args[0], v) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(param, f"expected {len(args)} values, got {len(value)}")
        return tuple(check_value(param, a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(param, f"expected a mapping, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(param, f"expected {_a(hint.__name__)}, got {type(value).__name__}")
        return value
    return value


class Config:
    """Base of every config dataclass: each value is normalized and checked when the config is made.

    Subclasses are ``@dataclass(frozen=True)`` with fields declared by :func:`option`.
    A subclass with checks across fields overrides :meth:`check` (called after the
    per-field checks) and raises :class:`~sumcircuit.errors.ConfigError` naming a field.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Demo(Config):
        ...     mode: Literal["zero", "mean"] = option("zero", help="how")
        >>> Demo(mode="max")
        Traceback (most recent call last):
        sumcircuit.errors.ConfigError: mode: choose one of 'zero', 'mean', got 'max'
    """

    def __post_init__(self) -> None:
        types_ = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            meta = f.metadata
            normalize = meta.get("normalize")
            if normalize is not None and value is not None:
                try:
                    value = normalize(value)
                except ConfigError:
                    raise
                except SumcircuitError as exc:
                    raise ConfigError(f.name, str(exc)) from None
            value = check_value(f.name, types_[f.name], value)
            choices = meta.get("choices")
            if choices is not None and value is not None and value not in choices():
                raise ConfigError(f.name, f"choose one of {', '.join(choices())}, got {value!r}")
            bound: Bound | None = meta.get("bound")
            if bound is not None and value is not None and (problem := bound.problem(value)):
                raise ConfigError(f.name, problem)
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks that involve several fields (none by default)."""

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (checked like a new config).

        Example:
            >>> import sumcircuit as sc
            >>> sc.PatchConfig().replace(granularity="head").granularity
            'head'
        """
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what provenance records)."""
        out: dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]
        return out


def config_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a config class, nested configs included, in declaration order (flattened).

    A field whose type is itself a :class:`Config` contributes its own fields:
    the CLI shows them as flags of the enclosing command.
    """
    out: list[dataclasses.Field[Any]] = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        hint = types_[f.name]
        if isinstance(hint, type) and issubclass(hint, Config):
            out.extend(config_fields(hint))
        else:
            out.append(f)
    return out


def _a(name: str) -> str:
    """``a PatchConfig``, ``an AnalysisConfig``."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def coerce_config(cls: type[C], value: C | Mapping[str, Any] | None, param: str = "config") -> C:
    """``value`` as a ``cls``: None gives the defaults; a config of another type is a one-line error.

    Args:
        cls: the config class the operation takes.
        value: a ``cls`` instance, None, or a mapping of its fields.
        param: the parameter name used in errors.

    Returns:
        An instance of ``cls``.

    Example:
        >>> import sumcircuit as sc
        >>> coerce_config(sc.PatchConfig, {"granularity": "head"}).granularity
        'head'
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(param, f"{cls.__name__} has no field(s) {', '.join(unknown)}; "
                                     f"fields: {', '.join(sorted(known))}")
        return cls(**value)
    raise ConfigError(param, f"expected {_a(cls.__name__)} (or a dict of its fields), got {type(value).__name__}"
                             + (f" {value!r}" if isinstance(value, (str, int, float)) else ""))


def flag_of(f: dataclasses.Field[Any], default: Any = MISSING) -> str:
    """The CLI flag of a field: its declared one, ``--no-x`` for a bool defaulting to True, else ``--x``."""
    declared = f.metadata.get("flag")
    if declared:
        return str(declared)
    dashed = f.name.replace("_", "-")
    if f.default is True:
        return f"--no-{dashed}"
    return f"--{dashed}"


def param_flags(classes: Iterable[type]) -> dict[str, str]:
    """Parameter name -> CLI flag for every CLI field of ``classes`` (the CLI's error translation)."""
    return {f.name: flag_of(f) for cls in classes for f in config_fields(cls) if f.metadata.get("cli", True)}
