"""One command per registered causal method (``ablate``, ``patch``, ``attribute``, and any registered later).

The command's flags are its config's fields, the data flags, the runtime
flags and ``--out``; a method on one model takes ``--model`` (and
``--adapter``), a method on a pair ``--base`` and ``--tuned``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sumcircuit.causal.registry import CAUSAL_METHODS, CausalMethod
from sumcircuit.cli.common import (
    Subparsers,
    add_adapter,
    add_data,
    add_model,
    add_out,
    add_runtime,
    data_from_args,
    model_from_args,
    print_lines,
    runtime_from_args,
)
from sumcircuit.cli.generate import add_config, config_from_args


def register_method(subparsers: Subparsers, method: CausalMethod) -> None:
    """Add the command of one causal method."""
    parser = subparsers.add_parser(method.name, help=method.help, description=method.description or method.help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    if method.inputs == "pair":
        add_model(parser, "--base", "the model before fine-tuning (any model spec)")
        add_model(parser, "--tuned", "the fine-tuned model (HF folder or adapter folder)")
    else:
        add_model(parser)
        add_adapter(parser)
    add_data(parser)
    add_config(parser, method.config)
    add_runtime(parser, placement=True)
    add_out(parser)
    parser.set_defaults(handler=_handler(method))


def _handler(method: CausalMethod) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from sumcircuit.distributed import is_main_process

        runtime = runtime_from_args(args)
        models = [args.base, args.tuned] if method.inputs == "pair" else [model_from_args(args, runtime)]
        result = method.function()(*models, data_from_args(args), config_from_args(method.config, args),
                                   runtime=runtime, out=args.out)
        if not is_main_process():  # under N processes rank 0 reports (every rank has the numbers)
            return 0
        lines = method.report_lines(result)
        print_lines([*lines[:-1], lines[-1].replace("wrote ", f"wrote {args.out}/", 1)] if lines else lines)
        return 0
    return run


def register(subparsers: Subparsers) -> None:
    """Every registered causal method's command."""
    for _, method in CAUSAL_METHODS.items():
        register_method(subparsers, method)
