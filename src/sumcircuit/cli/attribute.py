"""``sumcircuit attribute``: which components carry the fine-tuning's effect, all at once.

Attribution patching between a base and a tuned model: for every attention
head, attention and MLP contribution and MLP neuron, the loss change of
patching it from the other model is estimated as (a_donor - a_receiver) .
dL/da, the gradient taken in the receiving run (denoise: base, noise: tuned),
L the same teacher-forced summary loss as `patch`. One forward per model and
one backward per direction score every component; --validate K checks the
top-K and K random components against exact patching. Writes
attribution.json/.csv/.png and attribution_neurons.safetensors; the CSV has
the columns and component names of patching.csv.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    add_pair_options,
    add_runtime_options,
    data_config,
    split_directions,
)
from sumcircuit.options import ATTRIBUTION_GRANULARITIES, ATTRIBUTION_METHODS, DIRECTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute", help="attribution patching: every head, block and neuron scored in one backward pass",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_options(parser)
    parser.add_argument("--granularity", choices=ATTRIBUTION_GRANULARITIES, default="all",
                        help="layer: attention and MLP contributions; head; neuron; all (default: %(default)s)")
    parser.add_argument("--direction", choices=(*DIRECTIONS, "both"), default="both",
                        help="denoise (gradient in the base run), noise (in the tuned run) or both")
    parser.add_argument("--method", choices=ATTRIBUTION_METHODS, default="linear",
                        help="linear: first order; ig: gradient averaged along the weight path (default: %(default)s)")
    parser.add_argument("--ig-steps", type=POSITIVE, default=5, help="K for --method ig (default: %(default)s)")
    parser.add_argument("--validate", type=NON_NEGATIVE, default=0, metavar="K",
                        help="exact patching of the top-K and K random components per direction and kind")
    parser.add_argument("--n-bootstrap", type=POSITIVE, default=1000, help="document resamples for CIs")
    parser.add_argument("--batch-size", type=POSITIVE, default=4, help="documents per forward (default: %(default)s)")
    add_runtime_options(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.causal.attribution import AttributionConfig, attribute
    from sumcircuit.distributed import is_main_process

    cfg = AttributionConfig(granularity=args.granularity, directions=split_directions(args.direction),  # type: ignore[arg-type]
                            method=args.method, ig_steps=args.ig_steps, validate=args.validate,
                            batch_size=args.batch_size, n_bootstrap=args.n_bootstrap, seed=args.seed,
                            device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    result = attribute(args.base, args.tuned, data_config(args), cfg, out=args.out)
    if not is_main_process():
        return 0
    s = result.summary
    print(f"loss base {s['loss_base']:.4f}, tuned {s['loss_tuned']:.4f} (gap {s['gap']['mean']:+.4f} "
          f"[{s['gap']['ci_low']:+.4f}, {s['gap']['ci_high']:+.4f}]) over {s['n_docs']} documents")
    for direction in cfg.directions:
        top = sorted((r for r in result.rows if r["direction"] == direction),
                     key=lambda r: -abs(float(r["effect"])))[:5]
        print(f"{direction}: largest effects " + ", ".join(f"{r['component']} {float(r['effect']):+.3f}" for r in top))
    for key, v in s.get("validation", {}).items():
        print(f"validation {key}: pearson {v['pearson']:.3f}, spearman {v['spearman']:.3f}, "
              f"top-{v['top_k']} overlap {v['top_k_overlap']:.2f} (n={v['n']})")
    cost = s["cost"]
    print(f"{cost['forwards_per_batch']:.0f} forwards and {cost['backwards'] / max(cost['batches'], 1):.0f} "
          f"backwards per batch, {cost['wall_s']:.1f} s")
    print(f"wrote {args.out}/attribution.json, attribution.csv, attribution_neurons.safetensors, attribution.png")
    return 0
