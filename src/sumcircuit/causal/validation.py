"""Checking attribution against exact patching: the top-K and K random components, per direction and kind.

Attribution is a first-order estimate; before anything is chosen by it, the
components it ranks first (and a random sample, so that its misses show too)
are patched exactly and the two compared (Pearson, Spearman, top-K overlap,
largest misses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sumcircuit.causal.config import AttributionConfig, PatchConfig
from sumcircuit.causal.patching import ALL, PatchRow, patch_losses, summarize_patching
from sumcircuit.data.encoding import Encoded
from sumcircuit.models import LoadedModel
from sumcircuit.sites import Site
from sumcircuit.stats import pearson, spearman


def agreement(attributed: dict[str, float], exact: dict[str, float], k: int) -> dict[str, Any]:
    """Correlation of estimated and exact effects on the same components, top-K overlap, largest misses."""
    names = [n for n in attributed if n in exact and math.isfinite(exact[n]) and math.isfinite(attributed[n])]
    a = np.array([attributed[n] for n in names])
    e = np.array([exact[n] for n in names])
    top_a = set(sorted(names, key=lambda n: -abs(attributed[n]))[:k])
    top_e = set(sorted(names, key=lambda n: -abs(exact[n]))[:k])
    misses = sorted(names, key=lambda n: -abs(attributed[n] - exact[n]))[:5]
    return {"n": len(names), "pearson": pearson(a, e), "spearman": spearman(a, e),
            "top_k": k, "top_k_overlap": len(top_a & top_e) / k if k else math.nan,
            "largest_misses": [{"component": n, "attribution": attributed[n], "exact": exact[n]} for n in misses]}


def validate(base: LoadedModel, tuned: LoadedModel, encoded: Sequence[Encoded], rows: Sequence[PatchRow],
             cfg: AttributionConfig, *, progress: bool = False) -> dict[str, Any]:
    """Exact patching of the top-K and K random components (per direction and kind); agreement with attribution."""
    rng = np.random.default_rng(cfg.seed)
    report: dict[str, Any] = {}
    for direction in cfg.directions:
        mine = [r for r in rows if r["direction"] == direction and r["kind"] != ALL]
        for kind in sorted({r["kind"] for r in mine}):
            pool = [r for r in mine if r["kind"] == kind and math.isfinite(r["effect"])]
            k = min(cfg.validate, len(pool))
            top = sorted(pool, key=lambda r: -abs(r["effect"]))[:k]
            rest = [r for r in pool if r not in top]
            rand = [rest[i] for i in rng.choice(len(rest), size=min(k, len(rest)), replace=False)] if rest else []
            chosen = top + rand
            sites = [Site.parse(r["component"]) for r in chosen]
            pcfg = PatchConfig(directions=(direction,), include_all=False, batch_size=cfg.batch_size,
                               n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
            exact = summarize_patching(patch_losses(base, tuned, encoded, pcfg, sites=sites, progress=progress),
                                       pcfg)["rows"]
            report[f"{direction}.{kind}"] = {
                **agreement({r["component"]: r["effect"] for r in chosen},
                            {r["component"]: r["effect"] for r in exact}, k),
                "components": [{"component": r["component"], "attribution": r["effect"],
                                "exact": next(e["effect"] for e in exact if e["component"] == r["component"]),
                                "chosen_as": "top" if i < len(top) else "random"} for i, r in enumerate(chosen)]}
    return report
