"""Command-line options generated from config dataclasses (:mod:`sumcircuit.config`).

Every flag, its default, choices, range check and help text come from the
config field it sets, so the CLI cannot disagree with the API. We use our
own ~150 lines of argparse glue rather than ``HfArgumentParser`` or
``tyro``: neither keeps the flags users already type (``--no-cka``,
``--direction both``, repeatable ``--stop``), neither checks a value's range
while parsing (so a bad value is a usage error before any model is loaded),
and both import their heavy dependencies before ``--help`` can answer.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from sumcircuit.config import Bound, Config, config_fields, field_types, flag_of

C = TypeVar("C")
Adder = argparse.ArgumentParser | argparse._ArgumentGroup

_SCALARS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str}
_NAMES = {int: "an integer", float: "a number", str: "text"}


def _scalar_type(hint: Any) -> Any:
    """The one non-None type of ``hint`` (``int | None`` -> ``int``)."""
    if get_origin(hint) in (Union, type(int | None)):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def value_parser(hint: Any, bound: Bound | None) -> Callable[[str], Any]:
    """An argparse ``type``: the text converted to the field's type and checked against its range."""
    target = _scalar_type(hint)
    convert = _SCALARS.get(target, str)

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_NAMES.get(target, 'a value')}, got {text!r}") from None
        if bound is not None and (problem := bound.problem(value)):
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = getattr(target, "__name__", "value")  # argparse names the type in its messages
    return parse


def _help(f: dataclasses.Field[Any], default: Any) -> str:
    text = str(f.metadata.get("help", "")).replace("%", "%%")
    if default is not None and not isinstance(default, bool) and default != () and "default" not in text:
        text += " (default: %(default)s)"
    return text


def _groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    existing = getattr(parser, "_sumcircuit_groups", None)
    if existing is None:
        existing = {}
        parser._sumcircuit_groups = existing  # type: ignore[attr-defined]
    return existing


def add_config(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None,
               skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
               required: Iterable[str] = (), positional: Iterable[str] = (),
               help_overrides: Mapping[str, str] | None = None) -> None:
    """Add one flag per CLI field of the config class ``cls`` (nested configs flattened).

    Args:
        parser: the command's parser.
        cls: a :class:`~sumcircuit.config.Config` subclass.
        only: add only these fields.
        skip: leave these fields out (the command sets them itself).
        defaults: defaults that differ from the field's for this command.
        required: fields the user must give.
        positional: fields given as positional arguments.
        help_overrides: help text that differs from the field's for this command.
    """
    wanted = set(only) if only is not None else None
    skipped, req, pos = set(skip), set(required), set(positional)
    overrides, helps = dict(defaults or {}), dict(help_overrides or {})
    flags = dict(parser.get_default("param_flags") or {})
    groups = _groups(parser)
    for f in config_fields(cls):
        if not f.metadata.get("cli", True) or f.name in skipped or (wanted is not None and f.name not in wanted):
            continue
        owner = _owner(cls, f.name)
        hint = field_types(owner)[f.name]
        default = overrides.get(f.name, _default_of(f))
        if f.name not in overrides and f.metadata.get("cli_default", dataclasses.MISSING) is not dataclasses.MISSING:
            default = f.metadata["cli_default"]
        group_name = f.metadata.get("group")
        target: Adder = parser
        if group_name:
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(group_name)
            target = groups[group_name]
        if f.name in helps:
            f = _with_help(f, helps[f.name])
        if f.name in pos:
            target.add_argument(f.name, help=_help(f, None), type=value_parser(hint, f.metadata.get("bound")))
            flags[f.name] = f.name.upper()
            continue
        names = [flag_of(f), *f.metadata.get("aliases", ())]
        flags[f.name] = names[0]
        kwargs: dict[str, Any] = {"dest": f.name, "help": _help(f, default)}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if hint is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
            kwargs["default"] = default
        elif f.metadata.get("repeat"):
            kwargs.update(action="append", default=None, type=f.metadata.get("cli_type") or str)
        else:
            kwargs["default"] = default
            kwargs["required"] = f.name in req
            choices = _choices(f, hint)
            if choices is not None:
                kwargs["choices"] = choices
            elif f.metadata.get("cli_type") is not None:
                kwargs["type"] = f.metadata["cli_type"]
            elif f.metadata.get("normalize") is not None:
                kwargs["type"] = str  # the config normalizes and checks it, for the API and the CLI alike
            else:
                kwargs["type"] = value_parser(hint, f.metadata.get("bound"))
        target.add_argument(*names, **kwargs)
    parser.set_defaults(param_flags=flags)


def _owner(cls: type, name: str) -> type:
    """The (possibly nested) config class that declares field ``name``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return cls
        hint = field_types(cls)[f.name]
        if isinstance(hint, type) and issubclass(hint, Config):
            if any(g.name == name for g in config_fields(hint)):
                return _owner(hint, name)
    raise KeyError(name)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _with_help(f: dataclasses.Field[Any], text: str) -> dataclasses.Field[Any]:
    copy: dataclasses.Field[Any] = dataclasses.field(default=f.default, metadata={**f.metadata, "help": text})
    copy.name = f.name
    return copy


def _choices(f: dataclasses.Field[Any], hint: Any) -> tuple[Any, ...] | None:
    if f.metadata.get("cli_choices") is not None:
        return tuple(f.metadata["cli_choices"])
    registry = f.metadata.get("choices")
    if registry is not None:
        return tuple(registry())
    inner = _scalar_type(hint)
    if get_origin(inner) is Literal:
        return get_args(inner)
    return None


def config_from_args(cls: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """The config the parsed ``args`` describe (fields the CLI does not set keep their defaults).

    Args:
        cls: the config class (its nested configs are built from the same ``args``).
        args: what :func:`add_config` parsed.
        fixed: values the command sets itself (they win over ``args``).

    Returns:
        A checked ``cls`` instance; a bad value raises a ConfigError naming the field.
    """
    values: dict[str, Any] = {}
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = types_[f.name]
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif isinstance(hint, type) and issubclass(hint, Config):
            values[f.name] = config_from_args(hint, args, **fixed)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            if f.metadata.get("repeat"):
                value = tuple(value or ())
            values[f.name] = value
    return cls(**values)


def flag_for(args: argparse.Namespace, param: str) -> str:
    """The flag that set ``param`` in this command (``--param`` for a plain option; the name itself if none did)."""
    flags = getattr(args, "param_flags", None) or {}
    if param in flags:
        return str(flags[param])
    return f"--{param.replace('_', '-')}" if param in vars(args) and param not in ("command", "handler") else param
