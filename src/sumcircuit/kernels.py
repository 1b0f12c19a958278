"""The statistics kernels: stated once in torch (the eager kernels), and compiled for this CPU.

Why compiled kernels: in eager PyTorch every step of the tile statistics (max,
exp, four products and sums per model) streams the whole score tile through
memory again, and the per-neuron column sums write ``N x F`` temporaries.
Compiled, each is one pass: a small C++ module (``csrc/statistics.cpp``) built
once per machine by ``torch.utils.cpp_extension`` for the vector ISA torch
itself uses here, with ATen's vectorized ``exp``. The tile kernel reads each
row of both tiles while it sits in L1 and applies the causal limit itself;
inductor's fusion of the same torch code made five passes over the tile and
was 2-3x slower (``benchmarks/analysis_speed.md``).

Building needs a C++ compiler; ``"auto"`` falls back to the eager kernels, with
one warning, where there is none, and ``"compiled"`` fails in one line.

``"fused"`` (what ``"auto"`` means on CUDA) takes the attention statistics from
the attention kernel itself: one call per model returns the output and the
log-sum-exp (:func:`attention_lse`; PyTorch's memory-efficient kernel on CUDA,
its explicit statement elsewhere), with the keys appended to the values, so
``p @ K`` gives ``sum p s`` without the score matrix ever being written out.
The per-neuron sums and norms are the eager ones there.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from sumcircuit.analysis.config import KernelMode
from sumcircuit.errors import SumcircuitError

KERNEL_MODES: tuple[KernelMode, ...] = get_args(KernelMode)
AttentionPath = Literal["tiles", "fused"]
TileKernel = Callable[[Tensor, Tensor, "int | None", int], tuple[Tensor, Tensor]]

logger = logging.getLogger(__name__)

CHUNK_ROWS = 64  # rows summed in fp32 before the fp64 sum: error ~1e-7 relative, like eager's pairwise sums
WEIGHT_CHUNK = 4096  # weight elements per fp32 partial sum
_SOURCE = Path(__file__).with_name("csrc") / "statistics.cpp"
# ATen's vector ISA that torch itself runs here (torch.backends.cpu.get_cpu_capability) -> compiler flags
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"),
    "AVX2": ("-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"),
}
LSE_REFERENCE_ROWS = 256  # query rows per explicit score chunk in attention_lse_reference
MASKED = -1e30  # an additive mask's "never": finite after any scaling a kernel applies, and exp() of it is 0
_NATIVE: dict[str, Any] = {}  # "module": the built C++ module, once per process
_UNAVAILABLE: str | None = None  # why building it failed in this process, once it has
_FUSED_FAILED: dict[str, str] = {}  # "reason": why the fused attention kernel failed in this process


class KernelError(SumcircuitError):
    """The compiled statistics kernels were asked for but cannot be built here."""


def _check_mode(kernel: KernelMode) -> None:
    if kernel not in KERNEL_MODES:
        raise KernelError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernel!r}")


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for one-line errors."""
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _future_keys(first: int, rows: int, keys: int, n_rep: int, device: torch.device) -> Tensor:
    """``[rows, keys]``: True where row ``r`` (position ``first + r // n_rep``) must not see key ``j``."""
    limit = first + torch.arange(rows, device=device) // n_rep
    return torch.arange(keys, device=device) > limit[:, None]


# ---------------------------------------------------------------- the eager statements

def tile_stats_(scores_base: Tensor, scores_tuned: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row statistics of two masked score tiles ``[N, R, K]``; the tiles are overwritten with ``exp(s - max)``.

    Returns ``dots`` ``[4, N, R]``: ``sum p_b lp_b``, ``sum p_b lp_t``,
    ``sum p_t lp_t``, ``sum p_t lp_b`` (``p = softmax(s)``, ``lp = log p``),
    and the normalizers ``z`` ``[2, N, R]`` (base, tuned). Written as
    ``lp = d - log z`` with ``d = s - max(s) <= 0``, so ``sum p lp = sum e d / z - log z``
    with ``e = exp(d)``: one ``exp`` per score, and no cancellation between
    large scores and a large log-normalizer. The caller divides ``e @ V`` by
    ``z`` (a ``[R, Dv]`` division instead of an ``[R, K]`` one). Masked keys
    carry a finite very negative score, so ``e = 0`` and ``e * d = 0`` there.
    """
    d_b = scores_base - scores_base.amax(-1, keepdim=True)
    d_t = scores_tuned - scores_tuned.amax(-1, keepdim=True)
    e_b = torch.exp(d_b, out=scores_base)
    e_t = torch.exp(d_t, out=scores_tuned)
    z_b, z_t = e_b.sum(-1), e_t.sum(-1)
    log_b, log_t = z_b.log(), z_t.log()
    dots = torch.stack([(e_b * d_b).sum(-1) / z_b - log_b, (e_b * d_t).sum(-1) / z_b - log_t,
                        (e_t * d_t).sum(-1) / z_t - log_t, (e_t * d_b).sum(-1) / z_t - log_b])
    return dots, torch.stack([z_b, z_t])


def causal_tile_stats_(scores_base: Tensor, scores_tuned: Tensor, causal_from: int | None,
                       n_rep: int) -> tuple[Tensor, Tensor]:
    """:func:`tile_stats_` after the causal limit: row ``r`` sees keys ``[0, causal_from + r // n_rep]``.

    ``causal_from=None``: the tiles are already masked. Rows are ordered
    (position, head of the group), ``n_rep`` heads per position; this is the
    eager statement of what the compiled kernel does in its row loop.
    """
    if causal_from is not None:
        rows, keys = scores_base.shape[-2:]
        future = _future_keys(causal_from, rows, keys, n_rep, scores_base.device)
        for scores in (scores_base, scores_tuned):
            scores.masked_fill_(future, torch.finfo(torch.float32).min)
    return tile_stats_(scores_base, scores_tuned)


def column_moments_eager(base: Tensor, tuned: Tensor) -> Tensor:
    """``[5, F]`` fp64 column sums of ``b``, ``b^2``, ``t``, ``t^2``, ``|t - b|`` over ``[N, F]`` rows (torch's pairwise sums)."""
    sums = torch.stack([base.sum(0), (base * base).sum(0), tuned.sum(0), (tuned * tuned).sum(0),
                        (tuned - base).abs().sum(0)])
    return sums.double()


def squared_norms_eager(tuned: Tensor, base: Tensor) -> tuple[float, float]:
    """``(||t - b||^2, ||b||^2)`` by torch's norm kernel."""
    return float(torch.linalg.vector_norm(tuned - base)) ** 2, float(torch.linalg.vector_norm(base)) ** 2


# ---------------------------------------------------------------- choosing and building

def _build_native() -> Any:
    """The C++ module, built for this CPU's vector ISA (cached on disk by ``cpp_extension``)."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    if shutil.which("ninja") is None:  # the pip wheel's binary, when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    name = "sumcircuit_statistics_" + "".join(c if c.isalnum() else "_" for c in capability.lower())
    # -fopenmp: at::parallel_for is OpenMP inline code, serial without it; the library it links is the
    # libgomp.so.1 torch has already loaded, so both share one thread team
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], verbose=False,
                              extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, ())],
                              extra_ldflags=["-fopenmp"])


def _unavailable(kernel: KernelMode) -> None:
    reason = f"the compiled statistics kernels cannot be built here (they need a C++ compiler: {_UNAVAILABLE})"
    if kernel == "compiled":
        raise KernelError(f"{reason}; set `kernels` to eager")
    logger.warning("%s; using the eager kernels, which are slower", reason)


def _native(kernel: KernelMode, device: torch.device) -> Any:
    """The C++ module if ``kernel`` asks for it on ``device`` and it builds; else None (the eager kernels).

    A failed build warns once (``auto``) or raises :class:`KernelError` every time (``compiled``);
    so does ``compiled`` off the CPU.
    """
    global _UNAVAILABLE
    _check_mode(kernel)
    if kernel == "compiled" and device.type != "cpu":
        raise KernelError(f"the compiled statistics kernels are CPU code; on {device.type} set `kernels` to auto or eager")
    if kernel in ("eager", "fused") or device.type != "cpu":
        return None
    if "module" not in _NATIVE and _UNAVAILABLE is None:
        try:
            _NATIVE["module"] = _build_native()
        except Exception as exc:  # no compiler, headers or ninja: the eager kernels are the same math
            _UNAVAILABLE = f"{type(exc).__name__}: {_first_line(exc)}"
            _unavailable(kernel)
    if "module" not in _NATIVE and kernel == "compiled":
        _unavailable(kernel)
    return _NATIVE.get("module")


def compiled_kernel_status() -> str | None:
    """Why building the compiled kernels failed in this process, or None if it has not failed."""
    return _UNAVAILABLE


# ---------------------------------------------------------------- the kernels

def attention_path(kernel: KernelMode, device: torch.device) -> AttentionPath:
    """How ``kernel`` computes attention statistics on ``device``: score tiles, or the fused kernel's LSE.

    ``auto`` means fused on CUDA until the fused kernel has failed there (:func:`fused_failed`).
    """
    _check_mode(kernel)
    if kernel == "fused" or (kernel == "auto" and device.type == "cuda" and not _FUSED_FAILED):
        return "fused"
    return "tiles"


def fused_failed(error: KernelError) -> None:
    """Under ``auto``: warn once and use the score tiles from now on in this process."""
    if not _FUSED_FAILED:
        _FUSED_FAILED["reason"] = str(error)
        logger.warning("%s; using the score tiles, which are exact too", error)


def attention_lse_reference(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None,
                            causal: bool) -> tuple[Tensor, Tensor]:
    """:func:`attention_lse` stated with explicit scores, :data:`LSE_REFERENCE_ROWS` query rows at a time.

    ``causal``: query ``i`` sees keys up to ``i + Tk - Tq``. This is what
    :func:`attention_lse` runs off CUDA, so the fused statistics path is the
    same code on a CPU, down to this one call.
    """
    b, h, t_q, _ = query.shape
    t_k = key.shape[2]
    out = query.new_empty(b, h, t_q, value.shape[-1])
    lse = query.new_empty(b, h, t_q)
    for r0 in range(0, t_q, LSE_REFERENCE_ROWS):
        rows = slice(r0, min(t_q, r0 + LSE_REFERENCE_ROWS))
        scores = torch.matmul(query[:, :, rows], key.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias[..., rows, :]
        if causal:
            future = _future_keys(rows.start + t_k - t_q, rows.stop - rows.start, t_k, 1, query.device)
            scores.masked_fill_(future, float("-inf"))
        lse[:, :, rows] = torch.logsumexp(scores, -1)
        out[:, :, rows] = torch.matmul(torch.exp(scores - lse[:, :, rows, None]), value)
    return out, lse


def attention_lse_efficient(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None,
                            causal: bool) -> tuple[Tensor, Tensor]:
    """:func:`attention_lse` by PyTorch's memory-efficient attention kernel (CUDA; fp32 in, fp32 out).

    The kernel takes a value width other than the key width, and an additive
    bias whose rows are dense and 8-element aligned: the bias is copied into
    such a buffer, broadcast over heads. Its own causal mask is aligned
    top-left, so with cached keys (``Tq < Tk``) the causal limit goes into the bias.
    fp32 runs as 3xTF32 on tensor cores from Ampere on (CUTLASS's
    ``OpMultiplyAddFastF32``): fp32 accuracy, not TF32's.
    """
    b, h, t_q, _ = query.shape
    t_k = key.shape[2]
    if causal and t_q != t_k:
        future = torch.zeros(1, 1, t_q, t_k, device=query.device).masked_fill_(
            _future_keys(t_k - t_q, t_q, t_k, 1, query.device), MASKED)
        bias, causal = (future if bias is None else bias + future), False
    if bias is not None:
        aligned = torch.empty(*bias.shape[:-1], -(-t_k // 8) * 8, dtype=torch.float32, device=bias.device)
        aligned = aligned[..., :t_k]
        torch.clamp(bias, min=MASKED, out=aligned)
        bias = aligned.expand(b, h, t_q, t_k)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, causal,
                                                                           scale=1.0)[:2]
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:  # a shape or device this build's kernel does not take
        raise KernelError(f"the fused attention kernel failed on {query.device.type} ({_first_line(exc)}); "
                          "set `kernels` to eager") from exc
    return out, lse[..., :t_q]  # the kernel pads the log-sum-exp to a multiple of 32 rows


def attention_lse(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None,
                  causal: bool) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T + bias) @ v`` ``[B, H, Tq, Dv]`` and its log-sum-exp ``[B, H, Tq]``, fp32, scale 1.

    Queries come scaled. ``bias``: additive, ``[B or 1, 1, Tq, Tk]`` (0 or very
    negative); ``causal``: query ``i`` sees keys up to ``i + Tk - Tq``. On
    CUDA one fused kernel call (no score matrix in memory); elsewhere
    :func:`attention_lse_reference`.
    """
    if query.device.type == "cuda":
        return attention_lse_efficient(query, key, value, bias, causal)
    return attention_lse_reference(query, key, value, bias, causal)


def tile_kernel(kernel: KernelMode, device: torch.device) -> TileKernel:
    """The tile statistics kernel that ``kernel`` means on ``device``: C++, or :func:`causal_tile_stats_`."""
    native = _native(kernel, device)
    if native is None:
        return causal_tile_stats_
    run = native.tile_stats

    def compiled(scores_base: Tensor, scores_tuned: Tensor, causal_from: int | None,
                 n_rep: int) -> tuple[Tensor, Tensor]:
        dots, z = run(scores_base, scores_tuned, -1 if causal_from is None else causal_from, n_rep)
        return dots, z

    return compiled


def column_moments(base: Tensor, tuned: Tensor, kernel: KernelMode = "auto") -> Tensor:
    """``[5, F]`` fp64: per column ``sum b``, ``sum b^2``, ``sum t``, ``sum t^2``, ``sum |t - b|`` of ``[N, F]`` rows.

    Compiled: one pass over both inputs (the eager form writes ``N x F``
    temporaries), rows summed in chunks of :data:`CHUNK_ROWS` in fp32, then
    in fp64, so the rounding stays that of a pairwise sum.
    """
    native = _native(kernel, base.device)
    if native is None:
        return column_moments_eager(base, tuned)
    moments: Tensor = native.column_moments(base.float().contiguous(), tuned.float().contiguous(), CHUNK_ROWS)
    return moments


def squared_norms(tuned: Tensor, base: Tensor, kernel: KernelMode = "auto") -> tuple[float, float]:
    """``(||t - b||^2, ||b||^2)`` for two same-shaped tensors; compiled, in one pass without a ``t - b`` copy.

    Compiled, chunks of :data:`WEIGHT_CHUNK` elements are summed in fp32 and
    the chunk sums in fp64; eagerly, torch's norm kernel does it.
    """
    native = _native(kernel, tuned.device)
    if native is None:
        return squared_norms_eager(tuned, base)
    sums = native.squared_norms(tuned.float().contiguous(), base.float().contiguous(), WEIGHT_CHUNK)
    return float(sums[0]), float(sums[1])
