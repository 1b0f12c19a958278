"""What several commands share, generated from the configs: data, runtime, output folder, resume, models.

Every flag comes from a config field (:mod:`sumcircuit.cli.generate`); this
module only groups them the way the commands use them, and turns what the
library says about a *parameter* into what the user typed: the *flag*.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sumcircuit.cli.generate import add_config, config_from_args, flag_for
from sumcircuit.data.config import DataConfig
from sumcircuit.runtime import Runtime

if TYPE_CHECKING:
    from sumcircuit.models import LoadedModel

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction
MODEL_HELP = "hub id, local HF folder, .gguf file, or a named model (see `sumcircuit models`)"


def add_data(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """--data (or a positional DATA), --text-field, --summary-field, --template, --max-tokens, --n-docs, ..."""
    add_config(parser, DataConfig, required=() if positional else ("data",), positional=("data",) if positional else ())


def data_from_args(args: argparse.Namespace) -> DataConfig:
    """The :class:`DataConfig` the data flags describe."""
    return config_from_args(DataConfig, args)


PLACEMENT = ("device_map", "max_memory", "offload_folder")


def add_runtime(parser: argparse.ArgumentParser, only: Sequence[str] | None = None, placement: bool = False) -> None:
    """--device, --dtype, --trust-remote-code, --no-progress (or ``only`` some of them); with ``placement``,
    --device-map, --max-memory and --offload-folder too."""
    add_config(parser, Runtime, only=only, skip=() if placement else PLACEMENT)


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    """The :class:`Runtime` the runtime flags describe."""
    return config_from_args(Runtime, args)


def add_out(parser: argparse.ArgumentParser, help_text: str = "output folder") -> None:
    """--out (required)."""
    parser.add_argument("--out", required=True, help=help_text)


def add_resume(parser: argparse.ArgumentParser, *aliases: str, what: str = "outputs") -> None:
    """--no-resume (``resume=False``: start over, replacing sumcircuit's earlier outputs in --out), plus older spellings."""
    parser.add_argument("--no-resume", *aliases, dest="resume", action="store_false",
                        help=f"start over: replace the {what} sumcircuit wrote in --out (default: continue a run "
                             "of the same settings found there)")
    flags = dict(parser.get_default("param_flags") or {})
    parser.set_defaults(param_flags={**flags, "resume": "--no-resume"})


def add_model(parser: argparse.ArgumentParser, flag: str = "--model", help_text: str = MODEL_HELP) -> None:
    """One required model flag."""
    parser.add_argument(flag, required=True, help=help_text)


def add_adapter(parser: argparse.ArgumentParser) -> None:
    """--adapter: a PEFT adapter folder merged into --model."""
    parser.add_argument("--adapter", help="PEFT adapter folder (from `sumcircuit finetune`) merged into --model")


def model_from_args(args: argparse.Namespace, runtime: Runtime) -> str | LoadedModel:
    """--model as a spec, or loaded with --adapter merged into it."""
    if getattr(args, "adapter", None) is None:
        return str(args.model)
    from pathlib import Path

    from sumcircuit.errors import ModelError
    from sumcircuit.models import ensure_loaded, load_adapter

    if not Path(args.adapter).is_dir():
        raise ModelError(f"--adapter {args.adapter}: adapter folder not found")
    return load_adapter(ensure_loaded(str(args.model), runtime=runtime), args.adapter, merge=True)


_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def in_flags(message: str, args: argparse.Namespace) -> str:
    """A library message with its `parameter` names written as this command's flags (``--max-tokens``)."""
    return _PARAM.sub(lambda m: flag_for(args, m.group(1)) if flag_for(args, m.group(1)) != m.group(1)
                      else m.group(1), message)


def print_json(obj: Any) -> None:
    """JSON for scripts (``--json``)."""
    print(json.dumps(obj, indent=2, default=str))


def print_lines(lines: Sequence[str]) -> None:
    """A command's report, line by line."""
    for line in lines:
        print(line)
