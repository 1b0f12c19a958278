"""``sumcircuit models``: named offline models and whether each is installed."""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import Subparsers, print_json


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("models", help="list named offline models and whether each is installed",
                                   description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sumcircuit.models import named_models_status

    rows = named_models_status()
    if args.json:
        print_json(rows)
        return 0
    print(f"{'name':<24}{'installed':<11}{'license':<20}description")
    for row in rows:
        print(f"{row['name']:<24}{row['installed']:<11}{row['license']:<20}{row['description']}")
        if row["installed"] == "no":
            print(f"{'':<24}install: {row['install']}")
    print("\nAny Hugging Face hub id (e.g. gpt2), local HF folder or .gguf file also works as a model spec.")
    return 0
