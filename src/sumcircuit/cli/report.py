"""``sumcircuit report RUN``: one self-contained HTML page for a study or any output folder."""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("report", help="write a self-contained HTML report for a run directory",
                                   description=__doc__)
    parser.add_argument("run", help="a `sumcircuit reproduce` run directory, or any single output folder "
                                    "(analyze, evaluate, patch, ablate, attribute, finetune)")
    parser.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.study.report import build_report

    path = build_report(args.run, args.out)
    print(f"report written to {path}")
    return 0
