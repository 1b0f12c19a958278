"""``sumcircuit finetune``: full fine-tuning, LoRA on every layer, or targeted LoRA.

Defaults per method are the paper's (arXiv 2505.17073): full lr 3e-5, batch 32,
10 epochs, no early stopping; lora and targeted-lora lr 5e-5, batch 16, 10
epochs, early stopping with patience 3 evaluations; all AdamW with weight decay
0.01 (not on biases/norms); LoRA rank 8 on the query and value projections.
Our own choices (not in the paper): alpha 16, LoRA dropout 0.05, linear decay
without warmup, gradient clipping 1.0, one evaluation per epoch. --batch-size
is the micro-batch: effective batch = batch-size x grad-accum. Without
--val-data, 10%% of the training file (seeded) is held out for validation.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sumcircuit.cli.common import (
    NON_NEGATIVE,
    NON_NEGATIVE_REAL,
    POSITIVE,
    POSITIVE_REAL,
    add_data_options,
    add_model_options,
    add_runtime_options,
    data_config,
    real,
)
from sumcircuit.errors import SumcircuitError
from sumcircuit.options import ADAPT_UNITS, FINETUNE_METHODS

if TYPE_CHECKING:
    from sumcircuit.data import DataConfig
    from sumcircuit.training import FinetuneConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune for summarization: full, LoRA on all layers, or targeted LoRA",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    add_data_options(parser)
    val = parser.add_argument_group("validation")
    val.add_argument("--val-data", help="validation data (same options as --data; default: a held-out "
                                        "fraction of the training file)")
    val.add_argument("--val-split", help="split of --val-data, for folders, presets and hf: sources")
    val.add_argument("--val-n-docs", type=POSITIVE, help="use the first N validation records (default: all)")
    val.add_argument("--val-fraction", type=real(0.0, 1.0, low_open=True, high_open=True), default=0.1,
                     help="fraction held out when --val-data is not given (default: %(default)s)")
    method = parser.add_argument_group("method")
    method.add_argument("--method", required=True, choices=FINETUNE_METHODS)
    layers = method.add_mutually_exclusive_group()
    layers.add_argument("--layers", help="targeted-lora: layers to adapt, e.g. 2,3,5 or 2-5")
    layers.add_argument("--circuit", help="targeted-lora: circuit.json from `sumcircuit circuit`")
    layers.add_argument("--random-layers", type=POSITIVE, metavar="K",
                        help="targeted-lora: K layers drawn uniformly (control); seeded by --layer-seed")
    method.add_argument("--unit", choices=ADAPT_UNITS, default="layer",
                        help="targeted-lora with --circuit: adapt whole layers, or only the q rows of the "
                             "circuit's heads and the v rows of their key/value heads (default: %(default)s)")
    method.add_argument("--layer-seed", type=NON_NEGATIVE, help="seed of --random-layers (default: --seed)")
    method.add_argument("--rank", type=POSITIVE, default=8, help="LoRA rank (default: %(default)s)")
    method.add_argument("--alpha", type=POSITIVE_REAL, default=16.0, help="LoRA alpha (default: %(default)s)")
    method.add_argument("--lora-dropout", type=real(0.0, 1.0, high_open=True), default=0.05, help="(default: %(default)s)")
    opt = parser.add_argument_group("optimization (defaults: the method's paper values)")
    opt.add_argument("--lr", type=POSITIVE_REAL, help="learning rate (full 3e-5, LoRA 5e-5)")
    opt.add_argument("--batch-size", type=POSITIVE, help="micro-batch per forward pass (full 32, LoRA 16)")
    opt.add_argument("--grad-accum", type=POSITIVE, default=1,
                     help="micro-batches per optimizer step, over all processes: the effective batch is "
                          "batch-size x grad-accum for any number of processes (a multiple of them)")
    opt.add_argument("--epochs", type=POSITIVE_REAL, help="epochs (default: 10)")
    opt.add_argument("--max-steps", type=POSITIVE, help="optimizer steps; overrides --epochs")
    opt.add_argument("--eval-every", type=POSITIVE, help="validate every N optimizer steps (default: each epoch)")
    opt.add_argument("--save-every", type=POSITIVE, help="checkpoint every N steps (default: at each evaluation)")
    opt.add_argument("--patience", type=NON_NEGATIVE,
                     help="stop after N evaluations without improvement; 0 = off (full 0, LoRA 3)")
    opt.add_argument("--min-delta", type=NON_NEGATIVE_REAL, default=0.0,
                     help="validation-loss decrease that counts as an improvement (default: %(default)s)")
    opt.add_argument("--weight-decay", type=NON_NEGATIVE_REAL, default=0.01, help="AdamW (default: %(default)s)")
    opt.add_argument("--warmup-steps", type=NON_NEGATIVE, default=0, help="(default: %(default)s)")
    opt.add_argument("--scheduler", choices=("linear", "constant"), default="linear")
    opt.add_argument("--max-grad-norm", type=NON_NEGATIVE_REAL, default=1.0, help="clip; 0 = off (default: %(default)s)")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    opt.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                     help="autocast (for CUDA; default: %(default)s)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    out.add_argument("--final", choices=("best", "last"), default="best",
                     help="weights in final/: best validation loss or last step (default: %(default)s)")
    out.add_argument("--keep-checkpoints", type=POSITIVE, default=2, help="step checkpoints kept (default: %(default)s)")
    out.add_argument("--track-every", type=POSITIVE, help="every N steps, per-head entropy/KL against the start "
                                                     "model on a probe set -> tracking.csv")
    out.add_argument("--track-docs", type=POSITIVE, default=8, help="probe documents (default: %(default)s)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_options(parser)
    parser.set_defaults(handler=run)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    from sumcircuit.sites import parse_layers
    from sumcircuit.training import FinetuneConfig

    return FinetuneConfig(
        method=args.method, layers=tuple(parse_layers(args.layers, what="--layers")) if args.layers else None,
        circuit=args.circuit, random_layers=args.random_layers, unit=args.unit,
        layer_seed=args.layer_seed, rank=args.rank, alpha=args.alpha, lora_dropout=args.lora_dropout,
        lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
        max_steps=args.max_steps, eval_every=args.eval_every, save_every=args.save_every,
        patience=args.patience, min_delta=args.min_delta, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        scheduler=args.scheduler, max_grad_norm=args.max_grad_norm or None, val_fraction=args.val_fraction,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision, track_every=args.track_every, track_docs=args.track_docs,
        final=args.final, keep_checkpoints=args.keep_checkpoints, device=args.device, dtype=args.dtype,
        progress=not args.no_progress)


def val_config(args: argparse.Namespace, train: DataConfig) -> DataConfig | None:
    if args.val_data is None:
        if args.val_split or args.val_n_docs:
            raise SumcircuitError("--val-split/--val-n-docs need --val-data")
        return None
    from sumcircuit.data import DataConfig

    return DataConfig(data=args.val_data, text_field=train.text_field, summary_field=train.summary_field,
                      template=train.template, max_tokens=train.max_tokens, n_docs=args.val_n_docs,
                      split=args.val_split, skip_invalid=train.skip_invalid)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.distributed import is_main_process
    from sumcircuit.training import finetune

    if args.trust_remote_code:
        raise SumcircuitError("finetune does not run remote model code")
    train = data_config(args)
    summary = finetune(args.model, train, finetune_config(args), out=args.out, val_data=val_config(args, train),
                       resume=args.resume).summary
    if summary.get("processes", 1) > 1 and not is_main_process():  # rank 0 reports
        return 0
    what = f"heads {', '.join(summary['circuit_heads'])}" if summary.get("unit") == "head" \
        else f"layers {summary['layers']}"
    print(f"method {summary['method']}, {what}: {summary['trainable_params']:,} trainable "
          f"of {summary['total_params']:,} parameters")
    print(f"{summary['steps']} steps ({summary['epochs']:.2f} epochs); best validation loss "
          f"{summary['best_val_loss']:.4f} at step {summary['best_step']} (epoch {summary['epochs_to_best']:.2f})"
          + ("; stopped early" if summary["stopped_early"] else ""))
    print(f"final weights ({summary['final_weights']}): {summary['final_dir']}")
    return 0
