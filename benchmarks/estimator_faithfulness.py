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

from sumcircuit.causal.attribution import AttributionLosses, attribution_losses, attribution_rows
from sumcircuit.causal.config import AttributionConfig, PatchConfig
from sumcircuit.causal.interventions import encode_examples
from sumcircuit.causal.patching import patch_losses, summarize_patching
from sumcircuit.causal.validation import agreement
from sumcircuit.data import DataConfig
from sumcircuit.models import load_model
from sumcircuit.sites import Site
from sumcircuit.stats import spearman

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
    parser.add_argument("--reuse", help="print the confirmation table from the values a previous --json wrote")
    args = parser.parse_args()
    if args.reuse:
        print_confirmed(json.loads(Path(args.reuse).read_text())["values"])
        return
    torch.set_num_threads(args.threads)
    base, tuned = load_model(args.base), load_model(args.tuned)
    for p in (*base.model.parameters(), *tuned.model.parameters()):
        p.requires_grad_(False)
    encoded = encode_examples(base.tokenizer, DataConfig(args.data, split="val", n_docs=args.docs,
                                                         max_tokens=args.max_tokens))[0]
    estimates: dict[str, dict[tuple[str, str], float]] = {}
    kinds: dict[str, str] = {}
    scores: dict[tuple[str, str], float] = {}  # GradDrop (AtP*): a magnitude for ranking
    for method in (*METHODS, "atpstar"):
        cfg = AttributionConfig(granularity="all", method=method, ig_steps=args.ig_steps,  # type: ignore[arg-type]
                                batch_size=args.batch_size, n_bootstrap=10)
        losses = attribution_losses(base, tuned, encoded, cfg, progress=False)
        if method == "atpstar":
            scores = graddrop_by_site(losses)
            print(f"GradDrop scores in {losses.wall_s:.0f} s", flush=True)
            continue
        variants = {method: losses}
        if method == "linear":  # the trapezoid rule along the weights: both endpoints' gradients, no extra pass
            variants["trapezoid"] = trapezoid(losses)
        for name, result in variants.items():
            rows, maps = attribution_rows(result, cfg, neuron_rows=args.neurons)
            estimates[name] = {(r["direction"], r["component"]): float(r["effect"]) for r in rows}
            kinds.update({r["component"]: r["kind"] for r in rows})
            for direction in cfg.directions:  # every neuron's estimate, for the sampled ones
                grid = maps[f"{direction}.effect"]
                for layer, neuron in np.ndindex(*grid.shape):
                    estimates[name][(direction, f"L{layer}.N{neuron}")] = float(grid[layer, neuron])
        print(f"estimated with {method} in {losses.wall_s:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    n_layers, n_neurons = base.adapter.n_layers, base.adapter.n_neurons
    neurons = {n for n, k in kinds.items() if k == "mlp_neuron"}
    for direction in ("denoise", "noise"):  # GradDrop's top neurons too, so its recall can be read
        ranked = sorted((n for (d, n) in scores if d == direction and ".N" in n), key=lambda n: -scores[(direction, n)])
        neurons |= set(ranked[:args.neurons])
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
            for method in (*METHODS, "trapezoid"):
                est = {n: estimates[method][(direction, n)] for n in names if (direction, n) in estimates[method]}
                agree = agreement(est, truth, min(5, len(names)))
                wrong = sign_errors(est, truth)
                recall = top_recall({n: abs(v) for n, v in est.items()}, truth)
                table.append({"direction": direction, "kind": kind, "method": method, "n": agree["n"],
                              "pearson": agree["pearson"], "spearman": agree["spearman"], "sign_errors_top5": wrong,
                              "recall_top5_in_top10": recall})
                print(f"{direction:8s} {kind:11s} {method:9s} n={agree['n']:4d} pearson {agree['pearson']:+.3f} "
                      f"spearman {agree['spearman']:+.3f} top-5 in top-10 {recall:.2f} "
                      f"sign errors in the top 5: {wrong or 'none'}", flush=True)
            by_score = {n: scores[(direction, n)] for n in names}
            recall = top_recall(by_score, truth)
            rho = spearman(np.array([by_score[n] for n in names]), np.array([abs(truth[n]) for n in names]))
            table.append({"direction": direction, "kind": kind, "method": "graddrop", "n": len(names),
                          "spearman_abs": rho, "recall_top5_in_top10": recall})
            print(f"{direction:8s} {kind:11s} graddrop  n={len(names):4d} spearman(|exact|) {rho:+.3f} "
                  f"top-5 in top-10 {recall:.2f}", flush=True)
    values = {m: {f"{d}|{n}": v for (d, n), v in est.items() if (d, n) in exact} for m, est in estimates.items()}
    values["graddrop"] = {f"{d}|{n}": v for (d, n), v in scores.items() if (d, n) in exact}
    values["exact"] = {f"{d}|{n}": v for (d, n), v in exact.items()}
    print_confirmed(values)
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "values": values}, indent=1))


def print_confirmed(values: dict[str, dict[str, float]], ks: tuple[int, ...] = (5, 10)) -> None:
    """What `attribute --confirm K` reports against exact patching: the linear estimate, with the K heads and K
    neurons of largest |estimate| (or GradDrop score: atpstar) per direction patched exactly (blocks are exact
    anyway). Pearson over the same sites as the table above."""
    exact = values["exact"]
    for direction in ("denoise", "noise"):
        for kind in ("attn_head", "mlp_neuron"):
            names = [k for k in exact if k.startswith(f"{direction}|") and Site.parse(k.split("|")[1]).kind == kind]
            truth = np.array([exact[n] for n in names])
            cells = []
            rankings = {"linear": {n: abs(values["linear"][n]) for n in names},
                        "atpstar": {n: values["graddrop"].get(n, 0.0) for n in names}}
            for k in ks:
                for label, rank in rankings.items():
                    top = set(sorted(names, key=lambda n: -rank[n])[:k])
                    got = np.array([exact[n] if n in top else values["linear"][n] for n in names])
                    cells.append(f"{label} confirm {k}: r {np.corrcoef(got, truth)[0, 1]:.3f}")
            print(f"{direction:8s} {kind:11s} n={len(names):4d} " + ", ".join(cells), flush=True)


def trapezoid(linear: AttributionLosses) -> AttributionLosses:
    """The trapezoid rule along the weight path from the linear run of both directions.

    denoise: (a_t - a_b) . (g_b + g_t) / 2 = (delta_denoise - delta_noise) / 2, and the reverse for noise.
    """
    d, n = linear.deltas["denoise"], linear.deltas["noise"]
    deltas = {"denoise": {k: (d[k] - n[k]) / 2 for k in d}, "noise": {k: (n[k] - d[k]) / 2 for k in n}}
    return AttributionLosses(linear.doc_ids, linear.base, linear.tuned, deltas, linear.cost, linear.wall_s)


def graddrop_by_site(losses: AttributionLosses) -> dict[tuple[str, str], float]:
    """(direction, component) -> GradDrop score, every head, block and neuron."""
    out: dict[tuple[str, str], float] = {}
    for direction, per_key in losses.graddrop.items():
        for (kind, layer), values in per_key.items():
            for i, v in enumerate(values):
                name = {"attn_heads": f"L{layer}.H{i}", "mlp_neurons": f"L{layer}.N{i}"}.get(kind, f"L{layer}.{kind}")
                out[(direction, name)] = float(v)
    return out


def top_recall(ranking: dict[str, float], exact: dict[str, float], k: int = 5) -> float:
    """Share of the ``k`` largest |exact| effects among the ``2k`` first by ``ranking`` (false negatives' mirror)."""
    names = [n for n in exact if n in ranking and np.isfinite(ranking[n])]
    top = set(sorted(names, key=lambda n: -abs(exact[n]))[:k])
    first = set(sorted(names, key=lambda n: -ranking[n])[:2 * k])
    return len(top & first) / max(len(top), 1)


if __name__ == "__main__":
    main()
