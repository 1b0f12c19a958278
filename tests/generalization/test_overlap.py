"""Overlap statistics and their nulls against independent computations (scipy, exact enumeration)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from sumcircuit.generalization.overlap import (
    depth_grid,
    jaccard,
    jaccard_rows,
    membership,
    p_at_least,
    random_jaccard,
    spearman_null,
)
from sumcircuit.stats import spearman


@pytest.mark.parametrize("n_items,ka,kb", [(30, 3, 3), (12, 3, 4), (270, 8, 8)])
def test_random_jaccard_null_is_the_hypergeometric_law(n_items: int, ka: int, kb: int) -> None:
    """The Monte Carlo null of two random circuits matches the exact law of their intersection."""
    null = random_jaccard(n_items, ka, kb, 200_000, np.random.default_rng(0))
    law = scipy_stats.hypergeom(n_items, ka, kb)
    for i in range(min(ka, kb) + 1):
        exact = law.pmf(i)
        freq = float(np.mean(np.isclose(null, i / (ka + kb - i))))
        assert freq == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 200_000) + 1e-4)
    # the p-value of one shared layer: P(intersection >= 1) exactly
    observed = 1 / (ka + kb - 1)
    assert p_at_least(observed, null) == pytest.approx(law.sf(0), abs=0.004)


def test_jaccard_and_membership() -> None:
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and math.isnan(jaccard([], []))
    scores = np.array([[0.1, 0.9, np.nan, 0.5], [3.0, 3.0, 1.0, 0.0]])
    picks = membership(scores, 2)
    assert picks.tolist() == [[False, True, False, True], [True, True, False, False]]  # NaN last, ties by index
    assert jaccard_rows(picks[:1], picks[1:]).tolist() == [1 / 3]


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_spearman_permutation_null_matches_exact_enumeration() -> None:
    x, y = np.array([0.3, 1.2, 0.1, 2.0, 0.7, 1.1]), np.array([0.2, 0.9, 0.4, 1.5, 0.3, 1.6])
    observed = spearman(x, y)
    exact = [spearman(x, y[list(p)]) for p in itertools.permutations(range(6))]
    p_exact = float(np.mean(np.array(exact) >= observed - 1e-12))
    null = spearman_null(x, y, 40_000, np.random.default_rng(1))
    assert p_at_least(observed, null) == pytest.approx(p_exact, abs=0.006)
    assert null.mean() == pytest.approx(0.0, abs=0.01)


def test_depth_grid_interpolates_at_relative_depth() -> None:
    scores = np.array([[0.0, 1.0, 4.0, 9.0, 16.0], [1, 1, 2, 2, 3]], dtype=float)
    assert np.array_equal(depth_grid(scores, 5), scores)  # one depth: layer by layer
    grid = depth_grid(scores, 3)
    for row, out in zip(scores, grid):
        assert np.allclose(out, np.interp(np.linspace(0, 1, 3), np.arange(5) / 4, row))


def test_permutation_test_has_its_size_under_the_null() -> None:
    """Two independent random circuits: the p-value is at most alpha about alpha of the time (it is conservative
    on a discrete statistic)."""
    rng = np.random.default_rng(5)
    null = random_jaccard(30, 3, 3, 20_000, rng)
    draws = random_jaccard(30, 3, 3, 2_000, rng)
    p = np.array([p_at_least(j, null) for j in draws])
    for alpha in (0.05, 0.3, 0.8):
        assert np.mean(p <= alpha) <= alpha + 0.02
