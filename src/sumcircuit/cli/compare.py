"""``sumcircuit compare RUN RUN [...]``: do the circuits of several studies agree, beyond chance?

Reads finished ``reproduce`` folders (different domains, models or tasks)
and writes their circuit overlaps (Jaccard and rank correlation, each
against a permutation null of random circuits of equal size, with document
bootstrap intervals), the entropy shift and KL profiles at relative depth,
the change specific to summarization where a study ran the control task,
and the transfer arm's results, as CSV tables, figures and compare.html.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import Subparsers
from sumcircuit.cli.generate import add_config, config_from_args
from sumcircuit.generalization.config import CompareConfig


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare circuits, entropy shift, control task and transfer across "
                                                   "studies", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="two or more `sumcircuit reproduce` folders")
    parser.add_argument("--labels", help="comma-separated names of the runs (default: folder names)")
    add_config(parser, CompareConfig)
    parser.add_argument("--out", required=True, help="output folder (compare.json, CSV tables, compare.html)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.generalization.run import compare

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    result = compare(args.runs, config_from_args(CompareConfig, args), labels=labels, out=args.out)
    for row in result.rows["overlap"]:
        print(f"{row['run_a']} ~ {row['run_b']} {row['circuit']} {row['level']}: Jaccard {float(row['jaccard']):.2f} "
              f"(null mean {float(row['null_mean']):.2f}, p = {float(row['p_value']):.3f}), Spearman "
              f"{float(row['spearman']):.2f} (p = {float(row['spearman_p']):.3f})")
    for claim in result.rows["claims"]:
        print(f"{claim['claim']}: {claim['verdict']}" + (f" ({claim['limited_by']})" if claim["limited_by"] else ""))
    for row in result.rows["transfer"]:
        print(f"{row['run']}: {row['comparison']} {float(row['difference']):+.4f} [{float(row['ci_low']):+.4f}, "
              f"{float(row['ci_high']):+.4f}]: {row['verdict']}")
    print(f"wrote {args.out}/compare.html")
    return 0
