"""``sumcircuit analyze``: what changed inside the model between base and fine-tuned weights.

Per head: attention entropy of both models and KL in both directions; per
layer: residual-stream norm, CKA and weight change; per neuron: activation
change. Writes heads.csv, layers.csv, neurons.csv, stats.safetensors,
per_doc.safetensors and summary.json; an interrupted run resumes from the
last finished shard of documents. Under `accelerate launch` (N processes) the
shards are shared out, the statistics reduced across processes, and only
rank 0 writes (README, "Scaling out").
"""

from __future__ import annotations

import argparse

from sumcircuit.analysis.config import AnalysisConfig
from sumcircuit.cli.common import (
    Subparsers,
    add_data,
    add_model,
    add_out,
    add_resume,
    add_runtime,
    data_from_args,
    runtime_from_args,
)
from sumcircuit.cli.generate import add_config, config_from_args


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="per-head attention entropy/KL and per-layer/neuron activation change, base vs tuned",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(parser, "--base", "base model spec (see `sumcircuit models`)")
    add_model(parser, "--tuned", "fine-tuned model spec (same tokenizer and architecture)")
    add_out(parser)
    add_data(parser)
    add_config(parser, AnalysisConfig)
    add_resume(parser, "--restart", what="analysis files (finished shards included)")
    add_runtime(parser, placement=True)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.analysis.run import analyze_to_folder

    result = analyze_to_folder(args.base, args.tuned, data_from_args(args), config_from_args(AnalysisConfig, args),
                               args.out, runtime_from_args(args), args.resume)
    if result is None:  # not rank 0 of a multi-process run: rank 0 reports and writes
        return 0
    s = result.summary
    low, high = s["share_heads_entropy_decreased_ci"]
    print(f"analyzed {s['n_docs']} documents, {s['n_tokens']} tokens (region {s['region']})")
    print(f"heads with lower entropy after tuning: {s['share_heads_entropy_decreased']:.1%} "
          f"(95% CI {low:.1%}..{high:.1%})")
    print(f"mean KL(base||tuned) {s['mean_kl_base_tuned']:.4g} nats; layers by KL: {s['layers_by_kl'][:5]}")
    print(f"layers by activation change: {s['layers_by_activation_change'][:5]}")
    print(f"outputs in {args.out}")
    return 0
