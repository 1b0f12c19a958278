"""The statistics kernels: written once, run eagerly or compiled by inductor.

Why a compiled variant: in eager PyTorch every step of the tile statistics
(max, exp, four products and sums per model) streams the whole score tile
through memory again. Inductor fuses them into two passes over the tile; on the 2-core AVX-512 CPU this
makes the step 2-4x faster (``benchmarks/analysis_speed.py``); the same holds
for the per-neuron column sums. Compiling needs a C++ compiler; ``"auto"``
falls back to the eager kernels, with one warning, where there is none.
Accelerators run the eager kernels under ``"auto"`` (inductor's GPU path has
not been checked against the references).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor

from sumcircuit.errors import SumcircuitError
from sumcircuit.options import KERNEL_MODES

KernelMode = Literal["auto", "compiled", "eager"]  # the same strings as options.KERNEL_MODES
TileKernel = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Fn = TypeVar("Fn", bound=Callable[..., Any])

logger = logging.getLogger(__name__)


class KernelError(SumcircuitError):
    """The compiled statistics kernels were asked for but cannot be built here."""


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


CHUNK_ROWS = 64  # rows summed in fp32 before the fp64 sum: error ~1e-7 relative, like eager's pairwise sums
WEIGHT_CHUNK = 4096  # weight elements per fp32 partial sum


def column_sums(base: Tensor, tuned: Tensor, dim: int) -> Tensor:
    """Sums over ``dim`` (the rows) of both models' activations: ``[5, ...]`` fp32.

    Rows 0-4: ``sum b``, ``sum b^2``, ``sum t``, ``sum t^2``, ``sum |t - b|``.
    Compiled it runs over ``[C, R, F]`` row chunks (``dim=1``); eagerly over
    ``[N, F]`` (``dim=0``), where torch's own reduction is 3x faster than over a middle axis.
    """
    return torch.stack([base.sum(dim), (base * base).sum(dim), tuned.sum(dim), (tuned * tuned).sum(dim),
                        (tuned - base).abs().sum(dim)])


def difference_sums(tuned: Tensor, base: Tensor) -> Tensor:
    """``[2, C]`` fp32 per chunk of ``[C, R]``: ``sum (t - b)^2`` and ``sum b^2``."""
    diff = tuned - base
    return torch.stack([(diff * diff).sum(1), (base * base).sum(1)])


_COMPILED: dict[str, Callable[..., Any]] = {}
_UNAVAILABLE: str | None = None  # why compiling failed in this process, once it has


def _compiled(fn: Fn) -> Fn:
    if fn.__name__ not in _COMPILED:
        # dynamic: tiles change length with every causal row block; one graph serves them all
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return cast(Fn, _COMPILED[fn.__name__])


def _unavailable(kernel: KernelMode) -> None:
    message = (f"the compiled statistics kernels cannot be built here ({_UNAVAILABLE}); "
               "use --kernels eager")
    if kernel == "compiled":
        raise KernelError(message)
    logger.warning("%s; using the eager kernel, which is slower", message.split(";")[0])


def _checked(fn: Fn, kernel: KernelMode) -> Fn:
    """``fn`` compiled, falling back (``auto``) or failing (``compiled``) where it cannot be built."""

    def run(*tensors: Tensor) -> Any:
        global _UNAVAILABLE
        if _UNAVAILABLE is None:
            try:
                return _compiled(fn)(*tensors)
            except Exception as exc:  # the eager kernel is the same math; anything else it raises again
                if not _is_compile_failure(exc):
                    raise
                _UNAVAILABLE = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                _unavailable(kernel)  # warns once (auto) or raises (compiled)
        elif kernel == "compiled":
            _unavailable(kernel)
        return fn(*tensors)

    return cast(Fn, run)


def _is_compile_failure(exc: Exception) -> bool:
    """Errors raised by dynamo or inductor (no compiler, no headers, no cache folder)."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or isinstance(exc, OSError)


def _resolve(fn: Fn, kernel: KernelMode, device: torch.device) -> Fn:
    if kernel not in KERNEL_MODES:
        raise KernelError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernel!r}")
    if kernel == "eager" or (kernel == "auto" and device.type != "cpu"):
        return fn
    return _checked(fn, kernel)


def tile_kernel(kernel: KernelMode, device: torch.device) -> TileKernel:
    """The statistics kernel that ``kernel`` means on ``device``."""
    return _resolve(tile_stats_, kernel, device)


def column_moments(base: Tensor, tuned: Tensor, kernel: KernelMode = "auto") -> Tensor:
    """``[5, F]`` fp64: per column ``sum b``, ``sum b^2``, ``sum t``, ``sum t^2``, ``sum |t - b|`` of ``[N, F]`` rows.

    Compiled: one pass over both inputs (the eager form writes ``N x F``
    temporaries), rows summed in chunks of :data:`CHUNK_ROWS` in fp32, then
    in fp64, so the rounding stays that of a pairwise sum.
    """
    run = _resolve(column_sums, kernel, base.device)
    if run is column_sums:  # eager: torch's pairwise sums are as accurate without chunks
        return column_sums(base, tuned, 0).double()
    return _chunk_sums(run, column_sums, base, tuned, CHUNK_ROWS, 1)


def squared_norms(tuned: Tensor, base: Tensor, kernel: KernelMode = "auto") -> tuple[float, float]:
    """``(||t - b||^2, ||b||^2)`` for two same-shaped tensors; compiled, in one pass without a ``t - b`` copy.

    Compiled, chunks of :data:`WEIGHT_CHUNK` elements are summed in fp32 and
    the chunk sums in fp64; eagerly, torch's norm kernel does it.
    """
    run = _resolve(difference_sums, kernel, tuned.device)
    if run is difference_sums:  # eager: torch's own norm kernel beats chunked sums 4x
        return float(torch.linalg.vector_norm(tuned - base)) ** 2, float(torch.linalg.vector_norm(base)) ** 2
    sums = _chunk_sums(run, difference_sums, tuned.reshape(-1), base.reshape(-1), WEIGHT_CHUNK)
    return float(sums[0]), float(sums[1])


def _chunk_sums(run: Callable[..., Tensor], eager: Callable[..., Tensor], a: Tensor, b: Tensor, chunk: int,
                *args: int) -> Tensor:
    """fp64 total of ``run`` (fp32 sums over axis 1) on ``chunk``-row pieces of ``a``, ``b``.

    The rows past the last whole piece go through ``eager`` as one short piece
    (possibly empty, which gives the zeros of the right shape).
    """
    main = a.shape[0] - a.shape[0] % chunk
    total = eager(a[None, main:], b[None, main:], *args).sum(1, dtype=torch.float64)
    if main:
        pieces = (x[:main].reshape(-1, chunk, *x.shape[1:]) for x in (a, b))
        total += run(*pieces, *args).sum(1, dtype=torch.float64)
    return total


def compiled_kernel_status() -> str | None:
    """Why compiling the kernels failed in this process, or None if it has not failed."""
    return _UNAVAILABLE
