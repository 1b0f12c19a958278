"""The overlap rows of two runs: observed Jaccard and Spearman, their nulls and document-bootstrap intervals.

Each run's documents are resampled independently and its circuit re-picked
in every resample: the KL circuit from the analysis's per-document KL, the
attribution circuit from the exact per-document loss deltas of its blocks
and confirmed heads. The intervals show how much the overlap depends on
which documents were analysed (a percentile interval of a set statistic;
its coverage is not checked, so verdicts use the permutation p-values). The
analysis reads one fine-tune per study, so no interval covers training seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np

from sumcircuit.circuit.scores import kl_heads, kl_layers
from sumcircuit.generalization.config import CompareConfig, Level
from sumcircuit.generalization.overlap import (
    depth_grid,
    jaccard,
    jaccard_rows,
    membership,
    p_at_least,
    random_jaccard,
    spearman_null,
)
from sumcircuit.generalization.profile import RunProfile, head_index
from sumcircuit.stats import resample_counts, resampled_means, resampled_ratios, scalar_interval, spearman


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
    """Per-head KL(base || tuned) ``[B, L, H]``, token-weighted over each resample of the run's documents."""
    tokens = run.per_doc["tokens"]
    return resampled_ratios(tokens[:, None, None] * run.per_doc["kl_base_tuned"], tokens, counts)


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
        picks_a = {head_index(h, a.n_heads) for h in ca.heads}
        picks_b = {head_index(h, b.n_heads) for h in cb.heads}
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
    resamplers = [_resampler(run, circuit, level, n_items) for run in (a, b)]
    if resamplers[0] is not None and resamplers[1] is not None:
        _bootstrap(row, [resamplers[0], resamplers[1]], cfg)
    else:
        row["note"] = ("no interval: the attribution stage kept no exact per-document deltas"
                       if circuit == "attribution" else "no interval: the circuit's score is not per-head KL")
    if xa is None or xb is None:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "no per-head scores for the rank correlation"
    return row


Resampler = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # counts -> (pick scores, profile scores)


def _resampler(run: RunProfile, circuit: str, level: Level, n_items: int) -> tuple[int, Resampler] | None:
    """(documents, how one run's circuit is re-scored on a resample of them); None when it cannot be.

    KL circuit: token-weighted per-head KL of the analysis. Attribution circuit: the exact per-document loss
    deltas of the blocks (layer score |attn| + |mlp|; the gap, one positive number per run, does not change
    a ranking) and of the heads, which are picked only among the heads patched exactly.
    """
    if circuit == "kl":
        if run.circuits["kl"].head_scores is None:
            return None

        def kl(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            stats = {"kl_base_tuned": resampled_kl(run, counts)}  # the circuit's own score, `kl`
            scores = kl_heads(stats) if level == "heads" else depth_grid(kl_layers(stats, {}), n_items)
            return scores, scores
        return len(run.per_doc["tokens"]), kl
    deltas = run.attribution
    if deltas is None:
        return None

    def attribution(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def mean(x: np.ndarray) -> np.ndarray:  # [D, K] -> |mean| per resample [B, K]
            return np.asarray(np.abs(resampled_means(x.T, counts).T))
        if level == "heads":
            scores = mean(deltas["heads"])
            picks = np.full_like(scores, np.nan)
            picks[:, run.confirmed] = scores[:, run.confirmed]
            return picks, scores
        layers = depth_grid(mean(deltas["attn"]) + mean(deltas["mlp"]), n_items)
        return layers, layers
    return len(deltas["attn"]), attribution


def _bootstrap(row: OverlapRow, resamplers: list[tuple[int, Resampler]], cfg: CompareConfig) -> None:
    """Fill the row's document-bootstrap intervals (each run's documents resampled independently)."""
    picks, profiles = [], []
    for i, (n, resample) in enumerate(resamplers):
        chosen, profile = resample(resample_counts(n, cfg.n_bootstrap, cfg.seed + 7919 * i))
        picks.append(chosen)
        profiles.append(profile)
    jac = jaccard_rows(membership(picks[0], row["size_a"]), membership(picks[1], row["size_b"]))
    rho = np.array([spearman(x, y) for x, y in zip(*profiles)])
    row["jaccard_ci_low"], row["jaccard_ci_high"] = scalar_interval(jac, cfg.ci_level)
    row["spearman_ci_low"], row["spearman_ci_high"] = scalar_interval(rho, cfg.ci_level)


def overlap_matrix(rows: list[OverlapRow], labels: list[str], circuit: str, level: str,
                   value: str = "jaccard") -> list[list[Any]]:
    """Runs x runs ``value`` (a column of the rows) for one circuit and level (1 on the diagonal, NaN where not
    comparable)."""
    index = {name: i for i, name in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for r in rows:
        if r["circuit"] == circuit and r["level"] == level:
            i, j = index[r["run_a"]], index[r["run_b"]]
            matrix[i, j] = matrix[j, i] = r[value]  # type: ignore[literal-required]
    return matrix.tolist()
