"""``sumcircuit patch``: which components carry the fine-tuning's effect?

Activation patching between a base and a tuned model on the same inputs:
``denoise`` runs the base model with one component taken from the tuned
model, ``noise`` the reverse. Reports (L_base - L_patched) / (L_base - L_tuned)
on the mean teacher-forced summary loss, per layer (attention and MLP
separately), per head, or per whole block, with bootstrap CIs over documents.
Writes patching.json/.csv/.png and per-document losses.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import (
    POSITIVE,
    add_pair_options,
    add_runtime_options,
    data_config,
    split_directions,
)
from sumcircuit.options import DIRECTIONS, GRANULARITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "patch", help="activation patching between base and tuned models: loss-gap recovery per component",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_options(parser)
    parser.add_argument("--granularity", choices=GRANULARITIES, default="layer",
                        help="layer: attention and MLP output per layer; head: each head; block: "
                             "each decoder block's output (default: %(default)s)")
    parser.add_argument("--direction", choices=(*DIRECTIONS, "both"), default="both",
                        help="denoise (base run, tuned activation), noise (the reverse) or both")
    parser.add_argument("--layers", help="restrict to these layers, e.g. 0-5 (default: all)")
    parser.add_argument("--no-all", action="store_true", help="skip the all-components-at-once row")
    parser.add_argument("--n-bootstrap", type=POSITIVE, default=1000, help="document resamples for CIs")
    parser.add_argument("--batch-size", type=POSITIVE, default=4, help="documents per forward (default: %(default)s)")
    add_runtime_options(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.causal import PatchConfig, patch
    from sumcircuit.distributed import is_main_process
    from sumcircuit.sites import parse_layers

    cfg = PatchConfig(granularity=args.granularity, directions=split_directions(args.direction),  # type: ignore[arg-type]
                      layers=tuple(parse_layers(args.layers, what="--layers")) if args.layers else (),
                      include_all=not args.no_all, batch_size=args.batch_size, n_bootstrap=args.n_bootstrap,
                      seed=args.seed, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    summary = patch(args.base, args.tuned, data_config(args), cfg, out=args.out).summary
    if not is_main_process():  # under N processes rank 0 reports (every rank has the numbers)
        return 0
    print(f"loss base {summary['loss_base']['mean']:.4f}, tuned {summary['loss_tuned']['mean']:.4f} "
          f"(gap {summary['gap']['mean']:+.4f} [{summary['gap']['ci_low']:+.4f}, {summary['gap']['ci_high']:+.4f}]) "
          f"over {summary['n_docs']} documents")
    if "warning" in summary:
        print(f"warning: {summary['warning']}")
    cost = summary["cost"]
    print(f"{cost['forwards_per_batch']:.0f} forwards per batch ({cost['full_forward_equivalents_per_batch']:.1f} "
          f"full-forward equivalents), {cost['wall_s']:.1f} s")
    print(f"wrote {args.out}/patching.json, patching.csv, patching_per_doc.csv, patching.png")
    return 0
