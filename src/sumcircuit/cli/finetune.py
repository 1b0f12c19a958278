"""``sumcircuit finetune``: full fine-tuning, LoRA on every layer, targeted LoRA, or any registered method.

Defaults per method are the paper's (arXiv 2505.17073): full lr 3e-5, batch 32,
10 epochs, no early stopping; lora and targeted-lora lr 5e-5, batch 16, 10
epochs, early stopping with patience 3 evaluations; all AdamW with weight decay
0.01 (not on biases/norms); LoRA rank 8 on the query and value projections.
Our own choices (not in the paper): alpha 16, LoRA dropout 0.05, linear decay
without warmup, gradient clipping 1.0, one evaluation per epoch. --batch-size
is the micro-batch: effective batch = batch-size x grad-accum. Without
--val-data, 10%% of the training file (seeded) is held out for validation.
A rerun into the same --out continues from its newest checkpoint (a
checkpoint of other settings is refused); --no-resume starts over.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import (
    Subparsers,
    add_data,
    add_model,
    add_out,
    add_resume,
    add_runtime,
    data_from_args,
    print_lines,
    runtime_from_args,
)
from sumcircuit.cli.generate import add_config, config_from_args
from sumcircuit.data.config import DataConfig
from sumcircuit.errors import ConfigError
from sumcircuit.training.config import FinetuneConfig


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune for summarization: full, LoRA on all layers, or targeted LoRA",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(parser)
    add_data(parser)
    val = parser.add_argument_group("validation")
    val.add_argument("--val-data", help="validation data (same options as --data; default: a held-out "
                                        "fraction of the training file)")
    val.add_argument("--val-split", help="split of --val-data, for folders, presets and hf: sources")
    val.add_argument("--val-n-docs", type=int, help="use the first N validation records (default: all)")
    add_config(parser, FinetuneConfig, required=("method",))
    add_out(parser)
    add_resume(parser, what="checkpoints, logs and final model")
    parser.add_argument("--resume", action="store_true", dest="resume_flag",
                        help="continue from the newest checkpoint in --out (the default; kept for older scripts)")
    add_runtime(parser)
    parser.set_defaults(handler=run)


def val_config(args: argparse.Namespace, train: DataConfig) -> DataConfig | None:
    """--val-data (with the training data's formatting), or None for a held-out slice."""
    if args.val_data is None:
        if args.val_split or args.val_n_docs:
            raise ConfigError("val_data", "--val-split/--val-n-docs need --val-data")
        return None
    return train.replace(data=args.val_data, n_docs=args.val_n_docs, split=args.val_split)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.distributed import is_main_process
    from sumcircuit.training.run import finetune, report_lines

    train = data_from_args(args)
    result = finetune(args.model, train, config_from_args(FinetuneConfig, args), val_data=val_config(args, train),
                      runtime=runtime_from_args(args), out=args.out, resume=args.resume)
    if result.summary.get("processes", 1) > 1 and not is_main_process():  # rank 0 reports
        return 0
    print_lines(report_lines(result))
    return 0
