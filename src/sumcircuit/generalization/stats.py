"""The overlap rows of two runs: observed Jaccard and Spearman, their nulls and document-bootstrap intervals.

Intervals exist for the KL circuit, whose scores are token-weighted means of
the analysis's per-document statistics: each run's documents are resampled
independently and the circuit re-picked in every resample. They show how
much the overlap depends on which documents were analysed (a percentile
interval of a set statistic; its coverage is not checked, so verdicts use
the permutation p-values). The attribution circuit's exact confirmations are
not per document: its rows have the null but no interval. The analysis
reads one fine-tune per study, so no interval covers training seeds.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from sumcircuit.generalization.config import CompareConfig, Level
from sumcircuit.generalization.overlap import (
    depth_grid,
    jaccard,
    jaccard_rows,
    membership,
    p_at_least,
    percentile,
    random_jaccard,
    spearman,
    spearman_null,
)
from sumcircuit.generalization.profile import RunProfile
from sumcircuit.sites import Site
from sumcircuit.stats import resample_counts


class OverlapRow(TypedDict):
    """One (pair of runs, circuit, level) row of ``overlap.csv``."""

    run_a: str
    run_b: str
    circuit: str
    level: str
    basis: str
    size_a: int
    size_b: int
    n_items: int
    jaccard: float
    jaccard_ci_low: float
    jaccard_ci_high: float
    null_mean: float
    null_q95: float
    p_value: float
    spearman: float
    spearman_ci_low: float
    spearman_ci_high: float
    spearman_p: float
    note: str


def resampled_kl(run: RunProfile, counts: np.ndarray) -> np.ndarray:
    """Per-head KL(base || tuned) ``[B, L * H]``, token-weighted over each resample of the run's documents."""
    tokens, kl = run.per_doc["tokens"], run.per_doc["kl_base_tuned"].reshape(len(run.per_doc["tokens"]), -1)
    weighted: np.ndarray = (counts @ (tokens[:, None] * kl)) / (counts @ tokens)[:, None]
    return weighted


def _layer_kl(heads: np.ndarray, n_heads: int) -> np.ndarray:
    return np.asarray(heads.reshape(*heads.shape[:-1], -1, n_heads).mean(-1))


def _head_index(name: str, n_heads: int) -> int:
    site = Site.parse(name)
    return site.layer * n_heads + int(site.index or 0)


def pair_rows(a: RunProfile, b: RunProfile, circuit: str, level: Level, cfg: CompareConfig,
              rng: np.random.Generator) -> OverlapRow | None:
    """The overlap of ``circuit`` at ``level`` between two runs; None when the level does not apply (heads of
    different models)."""
    ca, cb = a.circuits[circuit], b.circuits[circuit]
    same_depth = a.n_layers == b.n_layers
    if level == "heads":
        if a.model_key != b.model_key:
            return None
        n_items = a.n_layers * a.n_heads
        picks_a = {_head_index(h, a.n_heads) for h in ca.heads}
        picks_b = {_head_index(h, b.n_heads) for h in cb.heads}
        xa, xb, basis = ca.head_scores, cb.head_scores, "heads"
    else:
        n_items = min(a.n_layers, b.n_layers)
        xa, xb = depth_grid(ca.layer_scores, n_items), depth_grid(cb.layer_scores, n_items)
        if same_depth:
            picks_a, picks_b, basis = set(ca.layers), set(cb.layers), "layers"
        else:
            picks_a = set(np.flatnonzero(membership(xa, len(ca.layers))).tolist())
            picks_b = set(np.flatnonzero(membership(xb, len(cb.layers))).tolist())
            basis = f"relative depth ({n_items} points)"
    size_a, size_b = len(picks_a), len(picks_b)
    observed = jaccard(picks_a, picks_b)
    null = random_jaccard(n_items, size_a, size_b, cfg.n_permutations, rng)
    rho = spearman(xa, xb) if xa is not None and xb is not None else float("nan")
    rho_null = spearman_null(xa, xb, cfg.n_permutations, rng) if xa is not None and xb is not None \
        else np.full(1, np.nan)
    row = OverlapRow(run_a=a.label, run_b=b.label, circuit=circuit, level=level, basis=basis, size_a=size_a,
                     size_b=size_b, n_items=n_items, jaccard=observed, jaccard_ci_low=float("nan"),
                     jaccard_ci_high=float("nan"), null_mean=float(np.nanmean(null)),
                     null_q95=float(np.nanquantile(null, 0.95)), p_value=p_at_least(observed, null), spearman=rho,
                     spearman_ci_low=float("nan"), spearman_ci_high=float("nan"),
                     spearman_p=p_at_least(rho, rho_null), note="")
    if circuit == "kl" and ca.head_scores is not None and cb.head_scores is not None:
        _bootstrap(row, a, b, level, n_items, cfg)
    else:
        row["note"] = ("no interval: the attribution circuit's exact confirmations are not per document"
                       if circuit == "attribution" else "no interval: the circuit's score is not per-head KL")
    if xa is None or xb is None:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "no per-head scores for the rank correlation"
    return row


def _bootstrap(row: OverlapRow, a: RunProfile, b: RunProfile, level: Level, n_items: int,
               cfg: CompareConfig) -> None:
    """Fill the row's document-bootstrap intervals (each run's documents resampled independently)."""
    samples: list[np.ndarray] = []
    for i, run in enumerate((a, b)):
        counts = resample_counts(len(run.per_doc["tokens"]), cfg.n_bootstrap, cfg.seed + 7919 * i)
        heads = resampled_kl(run, counts)
        samples.append(heads if level == "heads" else depth_grid(_layer_kl(heads, run.n_heads), n_items))
    ka, kb = row["size_a"], row["size_b"]
    jac = jaccard_rows(membership(samples[0], ka), membership(samples[1], kb))
    rho = np.array([spearman(x, y) for x, y in zip(*samples)])
    row["jaccard_ci_low"], row["jaccard_ci_high"] = percentile(jac, cfg.ci_level)
    row["spearman_ci_low"], row["spearman_ci_high"] = percentile(rho, cfg.ci_level)


def overlap_matrix(rows: list[OverlapRow], labels: list[str], circuit: str, level: str) -> list[list[Any]]:
    """Runs x runs Jaccard for one circuit and level (1 on the diagonal, NaN where not comparable)."""
    index = {name: i for i, name in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for r in rows:
        if r["circuit"] == circuit and r["level"] == level:
            i, j = index[r["run_a"]], index[r["run_b"]]
            matrix[i, j] = matrix[j, i] = r["jaccard"]
    return matrix.tolist()
