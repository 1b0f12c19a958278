"""``sumcircuit ablate``: does removing the circuit hurt summarization more than removing random parts?

Ablates attention heads (``--heads``) or whole attention / MLP blocks
(``--layers``, ``--component``), by zero or by the data-set mean, and
measures the rise in teacher-forced summary loss per document. With
``--random-controls N`` the same-size random sets give a null distribution
and an empirical p-value. Writes ablation.json/.csv/.png and per-document losses.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import NON_NEGATIVE, POSITIVE, add_data_options, add_model_options, add_runtime_options, data_config
from sumcircuit.options import ABLATION_MODES, CONTROL_POOLS, LAYER_COMPONENTS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate", help="ablate heads/layers (zero or mean) and compare with random same-size sets",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--adapter", help="PEFT adapter folder (from `sumcircuit finetune`) merged into --model")
    add_data_options(parser)
    target = parser.add_argument_group("what to ablate (exactly one)")
    which = target.add_mutually_exclusive_group(required=True)
    which.add_argument("--heads", help="heads, comma separated: L2.H3 (or 2.3), e.g. L2.H3,L5.H0")
    which.add_argument("--layers", help="layers, e.g. 2,3,5 or 2-5 (blocks chosen by --component)")
    which.add_argument("--circuit", help="circuit.json from `sumcircuit circuit`")
    target.add_argument("--circuit-part", choices=("layers", "heads"), default="layers",
                        help="with --circuit: ablate its layers or its heads (default: %(default)s)")
    target.add_argument("--component", choices=LAYER_COMPONENTS, default="attn",
                        help="with --layers/--circuit layers: which block (default: %(default)s)")
    target.add_argument("--mode", choices=ABLATION_MODES, default="zero",
                        help="zero, or mean over the data set's non-padding tokens (default: %(default)s)")
    stats = parser.add_argument_group("controls and statistics")
    stats.add_argument("--random-controls", type=NON_NEGATIVE, default=0, metavar="N",
                       help="also ablate N random sets of the same size (seeded by --seed)")
    stats.add_argument("--control-pool", choices=CONTROL_POOLS, default="all",
                       help="draw random sets from all layers/heads or only those outside the target")
    stats.add_argument("--n-bootstrap", type=POSITIVE, default=1000, help="document resamples for CIs")
    stats.add_argument("--rouge", action="store_true",
                       help="also generate summaries with and without the ablation and compare ROUGE (slow)")
    stats.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="with --rouge (default: %(default)s)")
    parser.add_argument("--batch-size", type=POSITIVE, default=4, help="documents per forward (default: %(default)s)")
    add_runtime_options(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.causal import AblationConfig, ablate
    from sumcircuit.distributed import is_main_process
    from sumcircuit.sites import parse_heads, parse_layers

    heads = tuple(parse_heads(args.heads)) if args.heads else ()
    layers = tuple(parse_layers(args.layers, what="--layers")) if args.layers else ()
    cfg = AblationConfig(heads=heads, layers=layers, component=args.component, mode=args.mode,
                         random_controls=args.random_controls, control_pool=args.control_pool,
                         seed=args.seed, batch_size=args.batch_size, n_bootstrap=args.n_bootstrap,
                         rouge=args.rouge, rouge_max_new_tokens=args.max_new_tokens, circuit=args.circuit,
                         circuit_part=args.circuit_part, adapter=args.adapter, device=args.device,
                         dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    summary = ablate(args.model, data_config(args), cfg, out=args.out).summary
    if not is_main_process():  # under N processes rank 0 reports (every rank has the numbers)
        return 0
    c = summary["circuit"]
    print(f"{summary['mode']}-ablation of {summary['target']}: loss {summary['loss_clean']['mean']:.4f} -> "
          f"{c['loss_ablated']:.4f}, effect {c['effect']:+.4f} "
          f"[{c['effect_ci_low']:+.4f}, {c['effect_ci_high']:+.4f}] over {summary['n_docs']} documents")
    if "random_controls" in summary:
        rc = summary["random_controls"]
        print(f"random sets (n={rc['n']}): mean effect {rc['effect_mean']:+.4f}; p = {rc['p_value']:.3f} "
              f"[{rc['p_value_ci_low']:.3f}, {rc['p_value_ci_high']:.3f}]")
    print(f"wrote {args.out}/ablation.json, ablation.csv, ablation_per_doc.csv, ablation.png")
    return 0
