"""``sumcircuit circuit``: pick the most-changed layers (and heads) from an analysis folder.

The ranking is correlational (how much a layer changed, not whether it
matters); test the selection with ``sumcircuit ablate --circuit`` and
``sumcircuit patch``. Stability: how often each selected layer stays in the
top-K when the analysed documents are resampled.
"""

from __future__ import annotations

import argparse

from sumcircuit.cli.common import NON_NEGATIVE, POSITIVE
from sumcircuit.options import CIRCUIT_SCORE_DEFINITIONS, CIRCUIT_SCORES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "circuit", help="rank layers/heads by a change score and write circuit.json (with bootstrap stability)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--analysis", help="folder written by `sumcircuit analyze` (change scores)")
    source.add_argument("--attribution", help="folder written by `sumcircuit attribute` (--score attribution: "
                                              "circuits by cause)")
    parser.add_argument("--direction", choices=("denoise", "noise"),
                        help="with --attribution: which direction's effects rank (default: denoise if present)")
    parser.add_argument("--score", default="kl", choices=CIRCUIT_SCORES,
                        help="; ".join(f"{k}: {v}" for k, v in CIRCUIT_SCORE_DEFINITIONS.items()) + " (default: %(default)s)")
    parser.add_argument("--top-layers", type=POSITIVE, default=3, help="layers to select (default: %(default)s)")
    parser.add_argument("--top-heads", type=NON_NEGATIVE, default=0,
                        help="also select this many heads (kl, kl-sym, entropy, combined only; default: none)")
    parser.add_argument("--n-bootstrap", type=POSITIVE, default=1000,
                        help="document resamples for the stability estimate (default: %(default)s)")
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--plot", action="store_true", help="also write a bar plot next to --out (.png)")
    parser.add_argument("--out", required=True, help="circuit file to write, e.g. circuit.json")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sumcircuit.circuit import select_circuit, select_circuit_by_attribution
    from sumcircuit.errors import SumcircuitError

    if (args.score == "attribution") != (args.attribution is not None):
        raise SumcircuitError("--score attribution goes with --attribution DIR (and other scores with --analysis)")
    if args.attribution is not None:
        result = select_circuit_by_attribution(args.attribution, top_layers=args.top_layers, top_heads=args.top_heads,
                                               direction=args.direction, n_bootstrap=args.n_bootstrap,
                                               seed=args.seed, out=args.out)
    else:
        result = select_circuit(args.analysis, score=args.score, top_layers=args.top_layers,
                                top_heads=args.top_heads, n_bootstrap=args.n_bootstrap, seed=args.seed,
                                out=args.out)
    circuit = result.summary
    if args.plot:
        from sumcircuit.plots import plot_circuit

        plot_circuit([s if s is not None else float("nan") for s in circuit["scores"]], circuit["layers"],
                     {int(k): v for k, v in circuit["stability"].items()},
                     Path(args.out).with_suffix(".png"), title=f"{args.score} change score per layer")
    stab = ", ".join(f"{layer}: {'n/a' if v is None else f'{v:.2f}'}" for layer, v in circuit["stability"].items())
    print(f"layers {circuit['layers']} by {args.score} (stability over {args.n_bootstrap} resamples: {stab})")
    if circuit["heads"]:
        print(f"heads {circuit['heads']}")
    print(f"wrote {args.out}")
    return 0
