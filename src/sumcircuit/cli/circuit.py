"""``sumcircuit circuit``: pick the most-changed (or most causal) layers and heads.

From an analysis folder the ranking is correlational (how much a layer
changed, not whether it matters); test the selection with ``sumcircuit
ablate --circuit`` and ``sumcircuit patch``. From an attribution folder it
ranks by estimated cause. Stability: how often each selected layer stays in
the top-K when the documents are resampled.
"""

from __future__ import annotations

import argparse

from sumcircuit.circuit.config import CircuitConfig
from sumcircuit.cli.common import Subparsers
from sumcircuit.cli.generate import add_config, config_from_args


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "circuit", help="rank layers/heads by a change score and write circuit.json (with bootstrap stability)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--analysis", help="folder written by `sumcircuit analyze` (change scores)")
    source.add_argument("--attribution", help="folder written by `sumcircuit attribute` (--score attribution: "
                                              "circuits by cause)")
    add_config(parser, CircuitConfig)
    parser.add_argument("--plot", action="store_true", help="also write a bar plot next to --out (.png)")
    parser.add_argument("--out", required=True, help="circuit file to write, e.g. circuit.json")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sumcircuit.circuit.select import select_circuit
    from sumcircuit.plots import save_figure

    config = config_from_args(CircuitConfig, args)
    circuit = select_circuit(args.attribution or args.analysis, config, out=args.out)
    if args.plot:
        save_figure(circuit.plot(), Path(args.out).with_suffix(".png"))
    summary = circuit.summary
    stab = ", ".join(f"{layer}: {'n/a' if v is None else f'{v:.2f}'}" for layer, v in summary["stability"].items())
    print(f"layers {summary['layers']} by {summary['score']} (stability over {config.n_bootstrap} resamples: {stab})")
    if summary["heads"]:
        print(f"heads {summary['heads']}")
    print(f"wrote {args.out}")
    return 0
