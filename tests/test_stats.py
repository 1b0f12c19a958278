"""Intervals: the studentized bootstrap is computed right and covers at the sample sizes studies use."""

from __future__ import annotations

import numpy as np
import pytest

from sumcircuit.stats import bootstrap_ci, paired_diff, resample_counts, studentized_interval


def test_studentized_interval_matches_explicit_resamples() -> None:
    data = np.random.default_rng(4).gamma(2.0, 1.0, size=12)
    mean, low, high = studentized_interval(data, n_resamples=500, seed=7)
    counts = resample_counts(12, 500, 7).astype(int)
    se = data.std(ddof=1) / np.sqrt(12)
    t = []
    for row in counts:  # each resample spelled out as a sample of documents
        sample = np.repeat(data, row)
        t.append((sample.mean() - data.mean()) / (sample.std(ddof=1) / np.sqrt(12)))
    q_low, q_high = np.quantile(t, [0.025, 0.975])
    assert mean == pytest.approx(data.mean())
    assert (low, high) == pytest.approx((data.mean() - q_high * se, data.mean() - q_low * se), rel=1e-10)
    assert studentized_interval([0.3] * 5) == (0.3, 0.3, 0.3)


def _coverage(interval, truth: float, n: int, reps: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    hits = 0
    for rep in range(reps):
        scores = rng.gamma(2.0, 0.1, size=n)  # skewed per-document scores (skewness 1.4), mean 0.2
        low, high = interval(scores, rep)
        hits += low <= truth <= high
    return hits / reps


def test_coverage_at_16_documents() -> None:
    """>= 93% at n = 16 for a mean of skewed scores; the percentile interval used before does not reach it."""
    studentized = _coverage(lambda x, s: studentized_interval(x, 999, s)[1:], 0.2, 16, 1500, seed=11)
    percentile = _coverage(lambda x, s: bootstrap_ci(x, 999, s), 0.2, 16, 1500, seed=11)
    assert studentized >= 0.93
    assert percentile < 0.93  # the reason for the change: the same draws, too narrow
    print(f"coverage at n=16: studentized {studentized:.3f}, percentile {percentile:.3f}")


def test_paired_difference_pairs_by_position() -> None:
    a = [0.30, 0.20, 0.25, 0.40, 0.35, 0.22]
    b = [x - d for x, d in zip(a, [0.01, 0.03, 0.02, 0.02, 0.04, 0.01])]
    diff, low, high = paired_diff(a, b, seed=3)
    assert diff == pytest.approx(0.0216667, abs=1e-6) and 0 < low < diff < high
