"""The statistics kernels: compiled (C++) and eager agree with an independent float64 statement, and a
missing C++ compiler falls back (auto) or fails in one line (compiled)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sumcircuit import kernels
from sumcircuit.kernels import (
    CHUNK_ROWS,
    WEIGHT_CHUNK,
    KernelError,
    causal_tile_stats_,
    column_moments,
    squared_norms,
    tile_kernel,
    tile_stats_,
)


def _reference(s_b: torch.Tensor, s_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_b, p_t, dots) in float64 from the definitions, masked keys dropped explicitly."""
    allowed = s_b > -1e30
    lp_b = s_b.double().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    lp_t = s_t.double().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    p_b, p_t = lp_b.exp(), lp_t.exp()

    def dot(p: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed, p * lp, 0.0).sum(-1)

    return p_b, p_t, torch.stack([dot(p_b, lp_b), dot(p_b, lp_t), dot(p_t, lp_t), dot(p_t, lp_b)])


def _tiles(seed: int, shape: tuple[int, int, int], masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Score tiles whose row i sees keys <= i + K - R (masked with the finite minimum, as capture does)."""
    g = torch.Generator().manual_seed(seed)
    s_b = torch.randn(shape, generator=g) * 4
    s_t = s_b + torch.randn(shape, generator=g)
    if not masked:
        return s_b, s_t
    future = _future(shape[1], shape[2], shape[2] - shape[1], 1)
    return _masked(s_b, future), _masked(s_t, future)


def _future(rows: int, keys: int, causal_from: int, n_rep: int) -> torch.Tensor:
    """[R, K] True where row i (position causal_from + i // n_rep) must not see key j."""
    return torch.tensor([[j > causal_from + i // n_rep for j in range(keys)] for i in range(rows)])


def _masked(scores: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(future, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize("shape", [(3, 8, 40), (2, 13, 13), (1, 1, 1), (2, 5, 37)])
def test_kernel_matches_float64_reference(kernel: str, shape: tuple[int, int, int]) -> None:
    s_b, s_t = _tiles(sum(shape), shape)
    p_b_ref, p_t_ref, dots_ref = _reference(s_b, s_t)
    dots, z = tile_kernel(kernel, torch.device("cpu"))(s_b, s_t, None, 1)  # type: ignore[arg-type]
    assert dots.shape == (4, shape[0], shape[1]) and dots.dtype == torch.float32 and z.shape == (2, *shape[:2])
    torch.testing.assert_close(dots.double(), dots_ref, atol=2e-6, rtol=0)
    # the tiles now hold exp(s - max): divided by z they are the probabilities (a few ulp of p <= 1)
    torch.testing.assert_close(s_b.double() / z[0, ..., None], p_b_ref, atol=3e-7, rtol=0)
    torch.testing.assert_close(s_t.double() / z[1, ..., None], p_t_ref, atol=3e-7, rtol=0)
    assert kernels.compiled_kernel_status() is None  # the compiled kernel really ran here (CI has g++)


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize(("rows", "keys", "causal_from", "n_rep"), [(12, 40, 30, 3), (8, 8, 0, 1), (6, 35, 3, 2)])
def test_kernel_applies_the_causal_limit(kernel: str, rows: int, keys: int, causal_from: int, n_rep: int) -> None:
    """Unmasked tiles plus a causal limit give what the same tiles masked beforehand give, and e = 0 past it."""
    s_b, s_t = _tiles(rows + keys, (2, rows, keys), masked=False)
    future = _future(rows, keys, causal_from, n_rep)
    p_b_ref, p_t_ref, dots_ref = _reference(_masked(s_b, future), _masked(s_t, future))
    dots, z = tile_kernel(kernel, torch.device("cpu"))(s_b, s_t, causal_from, n_rep)  # type: ignore[arg-type]
    torch.testing.assert_close(dots.double(), dots_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(s_b.double() / z[0, ..., None], p_b_ref, atol=3e-7, rtol=0)
    torch.testing.assert_close(s_t.double() / z[1, ..., None], p_t_ref, atol=3e-7, rtol=0)
    assert bool((s_b[:, future] == 0).all()) and bool((s_t[:, future] == 0).all())  # exactly 0 for the PV product
    assert kernels.compiled_kernel_status() is None


def test_compiled_and_eager_kernels_agree_on_a_real_sized_tile() -> None:
    s_b, s_t = _tiles(7, (12, 96, 700))
    s_b[..., :3] += 60  # attention-sink-sized scores: no cancellation against the log-normalizer
    s_t[..., :3] += 60
    _, _, reference = _reference(s_b, s_t)
    eager_b, eager_t = s_b.clone(), s_t.clone()
    eager, _ = tile_stats_(eager_b, eager_t)
    compiled, _ = tile_kernel("compiled", torch.device("cpu"))(s_b, s_t, None, 1)
    torch.testing.assert_close(compiled, eager, atol=2e-6, rtol=0)
    torch.testing.assert_close(compiled.double(), reference, atol=2e-6, rtol=0)
    torch.testing.assert_close(s_b, eager_b, atol=1e-7, rtol=1e-6)  # exp(s - max) as torch.exp gives it


def test_compiled_kernels_use_torchs_threads() -> None:
    """Built without -fopenmp, at::parallel_for runs serially: the kernels were silently single-threaded."""
    tile_kernel("compiled", torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernels._NATIVE["module"].parallel_threads(64) == 2
    finally:
        torch.set_num_threads(threads)


def test_auto_is_eager_off_the_cpu() -> None:
    assert tile_kernel("auto", torch.device("meta")) is causal_tile_stats_
    assert tile_kernel("eager", torch.device("cpu")) is causal_tile_stats_
    with pytest.raises(KernelError, match="one of auto, compiled, eager"):
        tile_kernel("fast", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(KernelError, match="CPU code; on meta use --kernels auto or eager"):
        tile_kernel("compiled", torch.device("meta"))  # the C++ kernels never see accelerator memory


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A machine without a C++ compiler: a fresh build (empty extensions folder) that cannot find g++."""
    monkeypatch.setattr(kernels, "_NATIVE", {})
    monkeypatch.setattr(kernels, "_UNAVAILABLE", None)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    yield


@pytest.mark.usefixtures("no_compiler")
def test_auto_falls_back_to_eager_without_a_compiler(caplog: pytest.LogCaptureFixture) -> None:
    s_b, s_t = _tiles(3, (2, 5, 9))
    expected, _ = tile_stats_(s_b.clone(), s_t.clone())
    with caplog.at_level(logging.WARNING, logger="sumcircuit.kernels"):
        got, _ = tile_kernel("auto", torch.device("cpu"))(s_b, s_t, None, 1)
        again, _ = tile_kernel("auto", torch.device("cpu"))(*_tiles(3, (2, 5, 9)), None, 1)
        moments = column_moments(s_b, s_t, "auto")
    assert torch.equal(got, expected) and torch.equal(again, expected)
    torch.testing.assert_close(moments, kernels.column_moments_eager(s_b, s_t))
    warnings = [r.getMessage() for r in caplog.records if r.name == "sumcircuit.kernels"]
    assert len(warnings) == 1 and "compiled statistics kernels cannot be built here" in warnings[0]
    assert "/nonexistent/g++" in warnings[0] and "\n" not in warnings[0]  # why, in one line
    assert "/nonexistent/g++" in str(kernels.compiled_kernel_status())


@pytest.mark.usefixtures("no_compiler")
def test_compiled_without_a_compiler_is_a_one_line_error() -> None:
    for _ in range(2):  # the first call fails to build, the second remembers why
        with pytest.raises(KernelError) as info:
            tile_kernel("compiled", torch.device("cpu"))
        message = str(info.value)
        assert "\n" not in message and "--kernels eager" in message and "C++ compiler" in message


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize("n_rows", [3 * CHUNK_ROWS + 17, CHUNK_ROWS, 5, 0])  # a tail, whole chunks, only a tail, none
def test_column_moments_match_float64_sums(kernel: str, n_rows: int) -> None:
    g = torch.Generator().manual_seed(n_rows)
    base = torch.randn(n_rows, 37, generator=g) * 2 + 3  # a large mean, as MLP inputs have
    tuned = base + torch.randn(n_rows, 37, generator=g) * 0.1
    b, t = base.double(), tuned.double()
    expected = torch.stack([b.sum(0), (b * b).sum(0), t.sum(0), (t * t).sum(0), (t - b).abs().sum(0)])
    got = column_moments(base, tuned, kernel)  # type: ignore[arg-type]
    assert got.dtype == torch.float64 and got.shape == (5, 37)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)  # fp32 rounding of 64-row chunks
    assert kernels.compiled_kernel_status() is None


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize("shape", [(3 * WEIGHT_CHUNK + 5,), (64, 128), (7, 3)])  # a tail, whole chunks, only a tail
def test_squared_norms_match_float64(kernel: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g)
    tuned = base + 1e-3 * torch.randn(shape, generator=g)  # a fine-tune moves weights by ~0.1%
    diff, norm = squared_norms(tuned, base, kernel)  # type: ignore[arg-type]
    assert diff == pytest.approx(float(((tuned.double() - base.double()) ** 2).sum()), rel=1e-6)
    assert norm == pytest.approx(float((base.double() ** 2).sum()), rel=1e-6)
