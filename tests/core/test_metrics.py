"""Accumulators and intervals against direct computations on the pooled data."""

from __future__ import annotations

import math

import pytest
import torch

from sumcircuit import metrics
from sumcircuit.metrics import (
    CrossMoments,
    Moments,
    add_gram_upper,
    bootstrap_ratio_samples,
    linear_cka,
    neuron_change,
    ratio_ci,
    symmetric,
)


def _moments(x: torch.Tensor) -> Moments:
    m = Moments.zeros(x.shape[1])
    m.add(x.shape[0], x.sum(0), x.square().sum(0))
    return m


def test_moments_merge_equals_one_pass() -> None:
    x = torch.randn(500, 7, dtype=torch.float64) * 3 + 10
    merged = _moments(x[:123]).merge(_moments(x[123:]))
    torch.testing.assert_close(merged.mean, x.mean(0))
    torch.testing.assert_close(merged.var, x.var(0, unbiased=False))
    assert float(merged.count) == 500


def _numpy_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    import numpy as np

    a = x.double().numpy() - x.double().numpy().mean(0)
    b = y.double().numpy() - y.double().numpy().mean(0)
    return float(np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


@pytest.mark.parametrize("dim", [16, 70, 300])  # below and above one 4,096-element chunk; two product panels
def test_cka_streaming_matches_direct_even_with_large_mean(dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, dim, generator=g) + 300.0  # residual streams have large means
    y = 0.5 * x + torch.randn(900, dim, generator=g)
    acc = CrossMoments.zeros(1, dim)
    for start in range(0, 900, 128):
        acc.add(0, x[start:start + 128], y[start:start + 128])
    assert float(acc.cka()[0]) == pytest.approx(_numpy_cka(x, y), abs=1e-5)
    assert linear_cka(x, y) == pytest.approx(_numpy_cka(x, y), abs=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("panel", [1, 16, 24, 70, 100])
def test_upper_gram_panels_match_the_full_product(panel: int) -> None:
    z = torch.randn(50, 70, generator=torch.Generator().manual_seed(panel), dtype=torch.float64)
    acc = torch.full((70, 70), 2.0, dtype=torch.float64)
    add_gram_upper(acc, z, panel)
    full = z.T @ z + 2.0
    torch.testing.assert_close(torch.triu(acc), torch.triu(full))
    torch.testing.assert_close(symmetric(acc), full)


@pytest.mark.parametrize("panel", [3, 256])  # 3: the matrices' lower triangles hold stale values throughout
def test_cka_merge_equals_one_pass(monkeypatch: pytest.MonkeyPatch, panel: int) -> None:
    monkeypatch.setattr(metrics, "GRAM_PANEL", panel)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    one = CrossMoments.zeros(2, 8)
    a, b = CrossMoments.zeros(2, 8), CrossMoments.zeros(2, 8)
    for layer in range(2):
        one.add(layer, x, y + layer * x)
        a.add(layer, x[:150], (y + layer * x)[:150])
        b.add(layer, x[150:], (y + layer * x)[150:])
    merged = a.merge(b)
    torch.testing.assert_close(merged.cka(), one.cka(), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.mean_x, one.mean_x)
    torch.testing.assert_close(merged.cxy, one.cxy, atol=1e-3, rtol=1e-5)


def test_bootstrap_ratio_is_token_weighted_and_seeded() -> None:
    sums = torch.tensor([[2.0], [30.0], [1.0]], dtype=torch.float64)
    counts = torch.tensor([2.0, 10.0, 1.0], dtype=torch.float64)
    s1 = bootstrap_ratio_samples(sums, counts, 50, seed=3)
    s2 = bootstrap_ratio_samples(sums, counts, 50, seed=3)
    torch.testing.assert_close(s1, s2)
    # each replicate is sum(S)/sum(n) over a resample: bounded by the per-document means
    assert float(s1.min()) >= 1.0 - 1e-12 and float(s1.max()) <= 3.0 + 1e-12
    low, high = ratio_ci(sums, counts, "bootstrap", n_bootstrap=200, seed=0)
    assert float(low[0]) <= 33.0 / 13.0 <= float(high[0])


def test_normal_ci_matches_delta_method_by_hand() -> None:
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(5, 50, (20,), generator=g).double()
    sums = counts * (1.0 + 0.3 * torch.randn(20, generator=g, dtype=torch.float64))
    low, high = ratio_ci(sums[:, None], counts, "normal")
    r = float(sums.sum() / counts.sum())
    resid = sums - r * counts
    se = math.sqrt(20 / 19 * float(resid.pow(2).sum())) / float(counts.sum())
    assert float(low[0]) == pytest.approx(r - 1.959964 * se, rel=1e-6)
    assert float(high[0]) == pytest.approx(r + 1.959964 * se, rel=1e-6)


def test_ci_undefined_for_one_document() -> None:
    low, high = ratio_ci(torch.ones(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert torch.isnan(low).all() and torch.isnan(high).all()


def test_neuron_change_definitions() -> None:
    base = torch.tensor([[1.0, -0.01, 2.0], [3.0, 0.01, 2.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    tuned = torch.tensor([[-1.0, 0.02, 2.0], [-3.0, -0.01, 2.0], [-2.0, 0.02, 2.0]], dtype=torch.float64)
    mb, mt = Moments.zeros(1, 3), Moments.zeros(1, 3)
    mb.add(3, base.sum(0)[None], base.square().sum(0)[None])
    mt.add(3, tuned.sum(0)[None], tuned.square().sum(0)[None])
    abs_total = (tuned - base).abs().sum(0)[None]
    ch = neuron_change(mb, mt, abs_total, threshold=0.5, flip_eps=0.1)
    pooled = ((base.var(0, unbiased=False) + tuned.var(0, unbiased=False)) / 2).sqrt()
    expected_d = (tuned.mean(0) - base.mean(0)) / pooled
    torch.testing.assert_close(ch.standardized_change[0, :2], expected_d[:2])
    assert float(ch.standardized_change[0, 2]) == 0.0  # constant neuron: no change, not NaN
    torch.testing.assert_close(ch.mean_abs_change[0], (tuned - base).abs().mean(0))
    # neuron 0 flips (2 -> -2); neuron 1's means (0 -> 0.01) are too small to count as a flip
    assert ch.sign_flip[0].tolist() == [True, False, False]
    assert ch.changed[0].tolist() == [True, True, False]
