"""Overlap of two circuits: Jaccard and rank correlation, their permutation nulls, relative depth (numpy only).

Why a null: two random 3-layer sets of a 30-layer model share a layer 28% of
the time, so a Jaccard of 0.2 says nothing until it is set against random
circuits of the same sizes. Layers of models of different depth are compared
on a grid of relative depth (linear interpolation of the per-layer score
profile); heads only within one model.
"""

from __future__ import annotations

import numpy as np

from sumcircuit.stats import average_ranks, empirical_p_value


def jaccard(a: set[int] | list[int], b: set[int] | list[int]) -> float:
    """``|a & b| / |a | b|`` (NaN for two empty sets)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else float("nan")


def membership(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[..., n]``: the ``k`` largest along the last axis (NaN last; ties: lower index first)."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=-1, kind="stable")[..., :k]
    out = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=-1)
    return out


def jaccard_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard of two boolean membership arrays ``[..., n]``."""
    union = (a | b).sum(-1)
    return np.where(union > 0, (a & b).sum(-1) / np.maximum(union, 1), np.nan)


def random_jaccard(n_items: int, size_a: int, size_b: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Jaccards of two independent uniformly random subsets of sizes ``size_a``, ``size_b`` of ``n_items``."""
    a = membership(rng.random((n, n_items)), size_a)
    b = membership(rng.random((n, n_items)), size_b)
    return jaccard_rows(a, b)


def spearman_null(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Spearman correlations of ``x`` with ``n`` random permutations of ``y`` (the null of no association)."""
    rx = average_ranks(np.asarray(x, dtype=np.float64))
    ry = average_ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    perms = np.argsort(rng.random((n, ry.size)), axis=1)
    return (ry[perms] @ rx) / denom if denom > 0 else np.full(n, np.nan)


def p_at_least(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value ``(1 + #{null >= observed}) / (1 + n)`` over the finite null draws, with a
    1e-12 tolerance so that a draw equal to ``observed`` up to rounding counts; NaN when ``observed`` is NaN."""
    if not np.isfinite(observed):
        return float("nan")
    return empirical_p_value(observed - 1e-12, null[np.isfinite(null)])


def relative_depth(n_layers: int) -> np.ndarray:
    """Layer ``l`` of ``L`` at relative depth ``l / (L - 1)`` (0 = first layer, 1 = last)."""
    return np.arange(n_layers) / max(n_layers - 1, 1)


def depth_grid(scores: np.ndarray, points: int) -> np.ndarray:
    """Per-layer scores ``[..., L]`` linearly interpolated at ``points`` evenly spaced relative depths.

    With ``points == L`` this is the identity, so models of one depth are compared layer by layer.
    """
    n_layers = scores.shape[-1]
    if points == n_layers:
        return scores
    x, grid = relative_depth(n_layers), np.linspace(0.0, 1.0, points)
    weights = np.stack([np.interp(grid, x, np.eye(n_layers)[i]) for i in range(n_layers)])  # [L, points]
    return np.asarray(scores @ weights)
