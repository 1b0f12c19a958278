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

from sumcircuit.cli.common import NON_NEGATIVE_REAL, POSITIVE, add_data_options, add_runtime_options, data_config
from sumcircuit.options import KERNEL_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze", help="per-head attention entropy/KL and per-layer/neuron activation change, base vs tuned",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model spec (see `sumcircuit models`)")
    parser.add_argument("--tuned", required=True, help="fine-tuned model spec (same tokenizer and architecture)")
    parser.add_argument("--out", required=True, help="output folder")
    add_data_options(parser)
    group = parser.add_argument_group("analysis")
    group.add_argument("--region", choices=("all", "document", "summary"), default="all",
                       help="which query positions count (default: %(default)s)")
    group.add_argument("--batch-size", type=POSITIVE, default=4, help="documents per forward pass (default: %(default)s)")
    group.add_argument("--top-k", type=POSITIVE, default=100, help="neurons listed in neurons.csv (default: %(default)s)")
    group.add_argument("--neuron-threshold", type=NON_NEGATIVE_REAL, default=0.5,
                       help="|standardized change| (Cohen's d) above which a neuron counts as changed "
                            "(default: %(default)s)")
    group.add_argument("--rank-neurons-by", choices=("standardized", "abs_change"), default="standardized",
                       help="ordering of neurons.csv (default: %(default)s)")
    group.add_argument("--shard-size", type=POSITIVE, default=32,
                       help="documents per resumable shard; under N processes each process takes one shard "
                            "per round (default: %(default)s)")
    group.add_argument("--ci", choices=("bootstrap", "normal"), default="bootstrap",
                       help="95%% CI from per-document values: percentile bootstrap over documents, or "
                            "normal approximation (default: %(default)s)")
    group.add_argument("--n-bootstrap", type=POSITIVE, default=1000, help="bootstrap replicates (default: %(default)s)")
    group.add_argument("--no-cka", action="store_true", help="skip linear CKA (saves 3 d x d products per layer)")
    group.add_argument("--kernels", choices=KERNEL_MODES, default="auto",
                       help="statistics kernels compiled in C++ for this CPU (needs a C++ compiler, built once; "
                            "2-4x faster), run eagerly, or fused: from one attention call per model returning the "
                            "log-sum-exp (CUDA's memory-efficient kernel; elsewhere its explicit statement, slower); "
                            "auto: compiled on CPU (eager without a compiler), fused on CUDA (default: %(default)s)")
    group.add_argument("--restart", action="store_true", help="ignore finished shards in --out and start over")
    add_runtime_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.analysis import AnalysisConfig, run_analysis

    config = AnalysisConfig(region=args.region, batch_size=args.batch_size, top_k=args.top_k,
                            neuron_threshold=args.neuron_threshold, neuron_rank_by=args.rank_neurons_by,
                            shard_size=args.shard_size, seed=args.seed, ci_method=args.ci,
                            n_bootstrap=args.n_bootstrap, cka=not args.no_cka,
                            kernels=args.kernels)
    result = run_analysis(args.base, args.tuned, data_config(args), config, args.out, device=args.device,
                          dtype=args.dtype, restart=args.restart, trust_remote_code=args.trust_remote_code)
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
