"""``sumcircuit evaluate``: generate summaries and score them with ROUGE (F1, 95% bootstrap CIs).

ROUGE is Google's rouge-score with the Porter stemmer; ROUGE-Lsum sees one
sentence per line (a deterministic splitter, applied to predictions and
references alike); with several references each metric takes the best one.
Generation is greedy (or beam search), batched with left padding, and stops at
the tokenizer's EOS, which fine-tuning appends after every summary. Models that
never emit EOS (zero-shot) need a text stop such as --stop '\\n\\n'.
Reruns into the same --out with the same settings resume where they stopped.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import (
    Subparsers,
    add_adapter,
    add_data,
    add_model,
    add_out,
    add_resume,
    add_runtime,
    data_from_args,
    model_from_args,
    print_lines,
    runtime_from_args,
)
from sumcircuit.cli.generate import add_config, config_from_args
from sumcircuit.evaluation.config import EvaluationConfig


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="generate summaries and score them: ROUGE-1/2/L/Lsum with bootstrap CIs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(parser)
    add_adapter(parser)
    add_data(parser)
    add_config(parser, EvaluationConfig)
    add_resume(parser, "--overwrite", what="predictions")
    add_out(parser, "output folder: predictions.jsonl, rouge.json")
    add_runtime(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.distributed import is_main_process
    from sumcircuit.evaluation.run import evaluate, report_lines

    runtime = runtime_from_args(args)
    result = evaluate(model_from_args(args, runtime), data_from_args(args), config_from_args(EvaluationConfig, args),
                      runtime=runtime, out=args.out, resume=args.resume)
    if not is_main_process():  # under N processes rank 0 reports (every rank has the numbers)
        return 0
    print_lines([*report_lines(result)[:-1], f"wrote {args.out}/predictions.jsonl, {args.out}/rouge.json"])
    return 0
