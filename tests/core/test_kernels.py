"""The statistics kernels: compiled (C++) and eager agree with an independent float64 statement, and a
missing C++ compiler falls back (auto) or fails in one line (compiled)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sumcircuit import kernels
from sumcircuit.kernels import (
    CHUNK_ROWS,
    LSE_REFERENCE_ROWS,
    MASKED,
    WEIGHT_CHUNK,
    KernelError,
    attention_lse,
    attention_lse_efficient,
    attention_path,
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
    with pytest.raises(KernelError, match="one of auto, compiled, eager, fused"):
        tile_kernel("fast", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(KernelError, match="CPU code; on meta set `kernels` to auto or eager"):
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
        assert "\n" not in message and "set `kernels` to eager" in message and "C++ compiler" in message


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


# ---------------------------------------------------------------- the fused path's attention call

def _lse_inputs(t_q: int, t_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t_q * 1000 + t_k)
    return (torch.randn(2, 3, t_q, 8, generator=g) * 2, torch.randn(2, 3, t_k, 8, generator=g),
            torch.randn(2, 3, t_k, 24, generator=g))  # values wider than keys, as [V | K | K' - K]


@pytest.mark.parametrize(("t_q", "t_k", "kind"), [(37, 37, "causal"), (LSE_REFERENCE_ROWS + 9, LSE_REFERENCE_ROWS + 9,
                                                  "causal"), (21, 30, "causal"), (21, 21, "bias")])
def test_attention_lse_matches_float64(t_q: int, t_k: int, kind: str) -> None:
    """Off CUDA, attention_lse is the explicit statement: output and log-sum-exp against float64."""
    q, k, v = _lse_inputs(t_q, t_k)
    allowed = torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)
    bias = None
    if kind == "bias":  # a window of 5 and document 1 padded from key 15 on
        allowed = allowed & (torch.arange(t_k)[None, :] > torch.arange(t_q)[:, None] - 5)
        allowed = allowed[None, None].repeat(2, 1, 1, 1)
        allowed[1, :, :, 15:] = False
        allowed[1, :, 15:] = True  # rows past the padding see everything (they are never counted)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, lse = attention_lse(q, k, v, bias, kind == "causal")
    scores = (q.double() @ k.double().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ v.double(), atol=1e-5, rtol=0)


class _Calls(TorchDispatchMode):
    """Records the efficient-attention calls; ``fail`` makes them raise as a kernel that refuses a shape."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._scaled_dot_product_efficient_attention.default:
            named = {a.name: a.default_value for a in func._schema.arguments}  # arguments left at their defaults
            named.update(zip(named, args), **(kwargs or {}))  # arrive dropped
            self.calls.append(named)
            if self.fail:
                raise RuntimeError("No available kernel. Aborting execution.\nmore lines")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("t_q", "t_k", "with_bias"), [(37, 37, False), (37, 37, True), (21, 30, False)])
def test_efficient_kernel_call_is_well_formed(t_q: int, t_k: int, with_bias: bool) -> None:
    """The CUDA call, on meta tensors: dense 8-aligned bias rows, no softmax scale, log-sum-exp cut to Tq."""
    q, k, v = (x.to("meta") for x in _lse_inputs(t_q, t_k))
    bias = torch.zeros(2, 1, t_q, t_k, device="meta") if with_bias else None
    with _Calls() as calls:
        out, lse = attention_lse_efficient(q, k, v, bias, causal=True)
    assert out.shape == (2, 3, t_q, 24) and lse.shape == (2, 3, t_q)
    call = calls.calls[0]
    passed, causal = call["attn_bias"], call["is_causal"]
    assert call["compute_log_sumexp"] is True and call["dropout_p"] == 0.0 and call["scale"] == 1.0
    if t_q == t_k and not with_bias:
        assert passed is None and causal is True  # the kernel's own (top-left) causal mask
    else:  # cached keys: the causal limit goes into the bias, the kernel's top-left one would be wrong
        assert causal is (t_q == t_k) and passed.shape == (2, 3, t_q, t_k)
        assert passed.stride(-1) == 1 and passed.stride(-2) % 8 == 0 and passed.stride(1) == 0


def test_efficient_kernel_values_and_causal_bias() -> None:
    """The bias handed to the kernel, computed (CPU tensors through the same code up to the call)."""
    q, k, v = _lse_inputs(4, 6)
    with _Calls(fail=True) as calls, pytest.raises(KernelError) as info:
        attention_lse_efficient(q, k, v, None, causal=True)
    bias = calls.calls[0]["attn_bias"]
    expected = torch.zeros(4, 6).masked_fill(torch.arange(6)[None, :] > torch.arange(2, 6)[:, None], MASKED)
    assert torch.equal(bias[0, 0], expected) and torch.equal(bias[1, 2], expected)
    message = str(info.value)  # a kernel refusing the shape: one line, the way out named
    assert "\n" not in message and "No available kernel" in message and "set `kernels` to eager" in message


def test_attention_path_by_mode_and_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "_FUSED_FAILED", {})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_path("auto", cpu) == "tiles" and attention_path("auto", cuda) == "fused"
    assert attention_path("fused", cpu) == "fused" and attention_path("eager", cuda) == "tiles"
    with caplog.at_level(logging.WARNING, logger="sumcircuit.kernels"):
        for _ in range(2):
            kernels.fused_failed(KernelError("the fused attention kernel failed on cuda (x); use --kernels eager"))
    assert len([r for r in caplog.records if r.name == "sumcircuit.kernels"]) == 1
    assert attention_path("auto", cuda) == "tiles" and attention_path("fused", cuda) == "fused"
