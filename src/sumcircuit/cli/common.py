"""Options shared by several commands, so every command spells them the same way."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sumcircuit.options import DATA_PRESETS, DEFAULT_MAX_TOKENS, DEFAULT_TEMPLATE, MIN_MAX_TOKENS

if TYPE_CHECKING:
    from sumcircuit.data import DataConfig


# ---------------------------------------------------------------- checked numbers

def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (a bad value is a one-line usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def real(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] (ends open when asked)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text}")
        return value
    return parse


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
POSITIVE_REAL = real(0.0, low_open=True)
NON_NEGATIVE_REAL = real(0.0)


def add_data_options(parser: argparse.ArgumentParser, *, positional: bool = False,
                     max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """--data, --text-field, --summary-field, --template, --max-tokens, --n-docs, --split, --skip-invalid."""
    group = parser.add_argument_group("data")
    data_help = ("JSONL(.gz)/CSV/Parquet file, a folder with --split, a `datasets` save_to_disk folder, "
                 f"hf:ID[:CONFIG], or a preset ({', '.join(DATA_PRESETS)})")
    if positional:
        parser.add_argument("data", help=data_help)
    else:
        group.add_argument("--data", required=True, help=data_help)
    group.add_argument("--text-field", help="document field (default: detected)")
    group.add_argument("--summary-field", help="summary field (default: detected)")
    group.add_argument("--template", default=DEFAULT_TEMPLATE,
                       help="prompt template with {document} and {summary}; '{text}' = the document "
                            "alone, verbatim (default: %(default)r)")
    group.add_argument("--max-tokens", type=at_least(MIN_MAX_TOKENS), default=max_tokens,
                       help="document is truncated so document + summary fit (default: %(default)s)")
    group.add_argument("--n-docs", type=POSITIVE, default=None, help="use the first N valid records")
    group.add_argument("--split", default=None, help="split, for folders, presets and hf: sources")
    group.add_argument("--skip-invalid", action="store_true",
                       help="skip bad records (and report how many) instead of failing")


def data_config(args: argparse.Namespace) -> DataConfig:
    from sumcircuit.data import DataConfig

    return DataConfig(data=args.data, text_field=args.text_field, summary_field=args.summary_field,
                      template=args.template, max_tokens=args.max_tokens, n_docs=args.n_docs,
                      split=args.split, skip_invalid=args.skip_invalid)


def add_model_options(parser: argparse.ArgumentParser, flag: str = "--model", *,
                      required: bool = True, help_text: str | None = None) -> None:
    parser.add_argument(flag, required=required,
                        help=help_text or "hub id, local HF folder, .gguf file, or a named model "
                                          "(see `sumcircuit models`)")


def add_pair_options(parser: argparse.ArgumentParser) -> None:
    """--base, --tuned and the data options: what the commands that compare two models share."""
    add_model_options(parser, "--base", help_text="the model before fine-tuning (any model spec)")
    add_model_options(parser, "--tuned", help_text="the fine-tuned model (HF folder or adapter folder)")
    add_data_options(parser)


def _checked_by(parser_name: str) -> Callable[[str], str]:
    """An argparse type checked by ``sumcircuit.models.<parser_name>`` before anything is loaded or made.

    Its one-line ``ModelError`` becomes a usage error; the models module is imported only when parsing.
    """
    def check(text: str) -> str:
        from sumcircuit import models
        from sumcircuit.errors import ModelError

        try:
            getattr(models, parser_name)(text)
        except ModelError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


device = _checked_by("parse_device")  # a device this machine has
dtype = _checked_by("parse_dtype")  # a dtype the models can be loaded in


DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: %(default)s)"
DTYPE_HELP = "float32, bfloat16 or float16 (default: %(default)s)"


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", type=device, default="cpu", help=DEVICE_HELP)
    group.add_argument("--dtype", type=dtype, default="float32", help=DTYPE_HELP)
    group.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed (default: %(default)s)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model code from the hub (off unless asked)")


def split_directions(direction: str) -> tuple[str, ...]:
    from sumcircuit.options import DIRECTIONS

    return DIRECTIONS if direction == "both" else (direction,)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
