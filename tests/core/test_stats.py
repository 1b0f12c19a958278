"""Intervals: the studentized bootstrap is computed right and covers at the sample sizes studies use."""

from __future__ import annotations

import numpy as np
import pytest

from sumcircuit.stats import (
    StatsError,
    bootstrap_ci,
    crossed_interval,
    paired_diff,
    resample_counts,
    sign_share_bounds,
    studentized_interval,
    t_interval,
)


def test_studentized_interval_matches_explicit_resamples() -> None:
    data = np.random.default_rng(4).gamma(2.0, 1.0, size=12)
    mean, low, high = studentized_interval(data, n_bootstrap=500, seed=7)
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


def _crossed_coverage(n_seeds: int, n_docs: int, seed_sd: float, reps: int) -> tuple[float, float]:
    """Coverage of the two-way interval, and of a documents-only interval on seed-averaged scores."""
    rng = np.random.default_rng(21)
    crossed = docs_only = 0
    for rep in range(reps):
        table = (0.02 + rng.normal(0, seed_sd, size=(n_seeds, 1))  # a training-seed effect shared by all documents
                 + rng.gamma(2.0, 0.05, size=(1, n_docs)) - 0.1  # skewed document effects, mean 0
                 + rng.normal(0, 0.03, size=(n_seeds, n_docs)))
        _, low, high = crossed_interval(table, 999, rep)
        crossed += low <= 0.02 <= high
        _, low, high = studentized_interval(table.mean(0), 999, rep)
        docs_only += low <= 0.02 <= high
    return crossed / reps, docs_only / reps


def test_seed_by_document_interval_covers() -> None:
    """3 seeds x 16 documents (the cpu preset): >= 93%; ignoring seed variance does not reach it."""
    crossed, docs_only = _crossed_coverage(3, 16, 0.03, 600)
    print(f"coverage 3 seeds x 16 docs: two-way {crossed:.3f}, documents only {docs_only:.3f}")
    assert crossed >= 0.93
    assert docs_only < 0.90


def test_seed_by_document_interval_reduces_to_documents_with_one_seed() -> None:
    row = np.random.default_rng(2).gamma(2.0, 0.1, size=(1, 10))
    assert crossed_interval(row, 500, 4) == studentized_interval(row[0], 500, 4)
    flat = np.full((3, 5), 0.25)
    assert crossed_interval(flat) == (0.25, 0.25, 0.25)
    table = np.random.default_rng(1).normal(size=(3, 8))
    mean, low, high = crossed_interval(table, 500, 0)
    assert mean == pytest.approx(table.mean()) and low < mean < high
    with pytest.raises(StatsError):
        crossed_interval(np.ones((2, 1)))


def test_t_interval_matches_scipy() -> None:
    from scipy import stats as st

    values = [0.5, 0.75, 1.5]
    mean, low, high = t_interval(values)
    expected = st.t.interval(0.95, 2, loc=np.mean(values), scale=st.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(expected)


def test_share_of_negative_components_bounds_cover() -> None:
    """Many heads near zero: the band's bounds cover the true share; the resampled share's percentile does not."""
    rng = np.random.default_rng(8)
    truth_delta = np.concatenate([np.full(30, -0.002), np.full(10, 0.002), np.full(20, -0.2)])
    truth_share = float((truth_delta < 0).mean())  # 50 of 60
    band = percentile = 0
    reps = 200
    for rep in range(reps):
        per_doc = truth_delta + rng.normal(0, 0.1, size=(16, 60))  # 16 documents
        counts = resample_counts(16, 400, rep)
        samples = counts @ per_doc / 16
        low, high, n_neg, n_not = sign_share_bounds(per_doc.mean(0), samples)
        band += low <= truth_share <= high
        q_low, q_high = np.quantile((samples < 0).mean(1), [0.025, 0.975])
        percentile += q_low <= truth_share <= q_high
        assert n_neg <= 50 and low == n_neg / 60 and high == 1 - n_not / 60
    print(f"share coverage: band {band / reps:.3f}, percentile {percentile / reps:.3f}")
    assert band / reps >= 0.95
    assert percentile / reps < 0.5


def test_share_bounds_are_exact_without_spread() -> None:
    est = np.array([0.0, -1.0, 2.0])
    assert sign_share_bounds(est, np.tile(est, (50, 1))) == pytest.approx((1 / 3, 1 / 3, 1, 2))


def test_constant_differences_with_rounding_noise_give_a_point_interval() -> None:
    """0.3 + 0.02 - 0.3 is not exactly 0.02: no resample has spread, so there is nothing to studentize."""
    base = np.random.default_rng(0).gamma(2.0, 0.05, size=(3, 16)) + 0.2
    diff = (base + 0.02) - base
    assert np.ptp(diff) > 0  # the rounding noise this is about
    mean, low, high = crossed_interval(diff)
    assert low == mean == high == pytest.approx(0.02)
    mean, low, high = studentized_interval(diff[0])
    assert low == mean == high == pytest.approx(0.02)


def test_ratio_interval_covers_a_share_of_the_gap_at_32_documents() -> None:
    """A share of the loss gap (skewed gaps, noisy patched losses): the studentized ratio interval covers >= 93%
    at n = 32 (94.5% in 1500 runs; 93.4% at 24, 92.5% at 16: why verdicts on it need 32 documents), at least as
    often as the percentile interval of the same ratio."""
    from sumcircuit.stats import ratio_interval

    rng = np.random.default_rng(5)
    truth, reps, n = 0.4, 1000, 32
    hits = {"studentized": 0, "percentile": 0}
    for rep in range(reps):
        gap = rng.gamma(2.0, 0.15, n)
        recovered = truth * gap + rng.normal(0, 0.08, n)
        counts = resample_counts(n, 999, rep)
        _, low, high = ratio_interval(recovered, gap, counts)
        hits["studentized"] += low <= truth <= high
        lo, hi = np.quantile((counts @ recovered) / (counts @ gap), [0.025, 0.975])
        hits["percentile"] += lo <= truth <= hi
    assert hits["studentized"] / reps >= 0.93, hits
    assert hits["percentile"] <= hits["studentized"], hits
    with pytest.raises(StatsError):
        ratio_interval(np.ones(1), np.ones(1), resample_counts(1, 10, 0))


def test_ratio_interval_without_a_gap_is_nan_without_a_numpy_warning() -> None:
    """The same model as base and tuned: a share of a zero gap is undefined, and said so as NaN, not 0/0."""
    import warnings

    from sumcircuit.stats import ratio_interval

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in scalar divide" fails the test
        result = ratio_interval(np.array([0.0, 0.0, 0.0]), np.zeros(3), resample_counts(3, 50, 0))
    assert all(np.isnan(x) for x in result)

