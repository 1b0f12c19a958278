"""`sumcircuit reproduce` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse

from sumcircuit.errors import SumcircuitError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reproduce", help="(not implemented yet)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise SumcircuitError("'reproduce' is not implemented yet")
