"""Which attribution estimator follows exact patching, per site kind, on a real base / fine-tuned pair.

On ``--docs`` documents of the val split of ``--data`` (default ../shared/data/cnndm_gpt4): exact patching
of every attention and MLP block and every head, in both directions, and of a sample of MLP neurons (the
``--neurons`` largest by each estimator and as many random ones); estimates of the same sites by linear
attribution, IG (``--ig-steps``) and RelP. Prints, per direction and kind, each estimator's Pearson and
Spearman correlation with the exact effects and its sign errors among the 5 largest exact effects, and
writes the rows with ``--json``. Usage:

    python benchmarks/estimator_faithfulness.py --tuned runs/demo/full_s1/final [--docs 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sumcircuit.causal.attribution import AttributionConfig, attribution_losses, attribution_rows
from sumcircuit.causal.interventions import encode_examples
from sumcircuit.causal.patching import PatchConfig, patch_losses, summarize_patching
from sumcircuit.causal.validation import agreement
from sumcircuit.data import DataConfig
from sumcircuit.models import load_model
from sumcircuit.sites import Site

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4"
METHODS = ("linear", "ig", "relp")


def sign_errors(estimate: dict[str, float], exact: dict[str, float], k: int = 5) -> list[str]:
    """The components among the ``k`` largest |exact| effects whose estimate has the other sign."""
    top = sorted((n for n in exact if n in estimate), key=lambda n: -abs(exact[n]))[:k]
    return [n for n in top if estimate[n] * exact[n] < 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model spec")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ig-steps", type=int, default=4)
    parser.add_argument("--neurons", type=int, default=20, help="largest neurons per estimator (and as many random)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tuned = load_model(args.base), load_model(args.tuned)
    for p in (*base.model.parameters(), *tuned.model.parameters()):
        p.requires_grad_(False)
    encoded = encode_examples(base.tokenizer, DataConfig(args.data, split="val", n_docs=args.docs,
                                                         max_tokens=args.max_tokens))[0]
    estimates: dict[str, dict[tuple[str, str], float]] = {}
    kinds: dict[str, str] = {}
    for method in METHODS:
        cfg = AttributionConfig(granularity="all", method=method, ig_steps=args.ig_steps,  # type: ignore[arg-type]
                                batch_size=args.batch_size, n_bootstrap=10)
        rows, maps = attribution_rows(attribution_losses(base, tuned, encoded, cfg, progress=False), cfg,
                                      neuron_rows=args.neurons)
        estimates[method] = {(r["direction"], r["component"]): float(r["effect"]) for r in rows}
        kinds.update({r["component"]: r["kind"] for r in rows})
        for direction in cfg.directions:  # every neuron's estimate, for the sampled ones
            grid = maps[f"{direction}.effect"]
            for layer, neuron in np.ndindex(*grid.shape):
                estimates[method][(direction, f"L{layer}.N{neuron}")] = float(grid[layer, neuron])
        print(f"estimated with {method}", flush=True)
    rng = np.random.default_rng(0)
    n_layers, n_neurons = base.adapter.n_layers, base.adapter.n_neurons
    neurons = {n for n, k in kinds.items() if k == "mlp_neuron"}
    neurons |= {f"L{int(l)}.N{int(i)}" for l, i in zip(rng.integers(n_layers, size=args.neurons * len(METHODS)),
                                                       rng.integers(n_neurons, size=args.neurons * len(METHODS)))}
    sites = [Site.parse(n) for n, k in kinds.items() if k in ("attn", "mlp", "attn_head")]
    sites += [Site.parse(n) for n in sorted(neurons)]
    pcfg = PatchConfig(include_all=False, batch_size=args.batch_size, n_bootstrap=10)
    exact_rows = summarize_patching(patch_losses(base, tuned, encoded, pcfg, sites, progress=True), pcfg)["rows"]
    exact = {(r["direction"], r["component"]): float(r["effect"]) for r in exact_rows}
    table = []
    for direction in ("denoise", "noise"):
        for kind in ("attn", "mlp", "attn_head", "mlp_neuron"):
            names = [n for (d, n) in exact if d == direction and Site.parse(n).kind == kind]
            truth = {n: exact[(direction, n)] for n in names}
            for method in METHODS:
                est = {n: estimates[method][(direction, n)] for n in names if (direction, n) in estimates[method]}
                agree = agreement(est, truth, min(5, len(names)))
                wrong = sign_errors(est, truth)
                table.append({"direction": direction, "kind": kind, "method": method, "n": agree["n"],
                              "pearson": agree["pearson"], "spearman": agree["spearman"], "sign_errors_top5": wrong})
                print(f"{direction:8s} {kind:11s} {method:7s} n={agree['n']:4d} pearson {agree['pearson']:+.3f} "
                      f"spearman {agree['spearman']:+.3f} sign errors in the top 5: {wrong or 'none'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
