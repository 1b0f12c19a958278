"""`sumcircuit analyze` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse

from sumcircuit.errors import SumcircuitError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="(not implemented yet)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise SumcircuitError("'analyze' is not implemented yet")
