"""Streaming, mergeable accumulators and the confidence intervals built from them.

Everything the analysis reports is a function of sums: counts, sums and sums
of squares per head / neuron, centered cross-products for CKA, and per-document
sums for confidence intervals. Sums can be added batch by batch (memory does
not grow with the number of tokens) and merged across shards or processes:
``merge(a, b)`` gives the same numbers as one pass over both halves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from sumcircuit.stats import resample_counts

CIMethod = Literal["bootstrap", "normal"]
_F64 = torch.float64


# ---------------------------------------------------------------- moments

@dataclass
class Moments:
    """Count, sum and sum of squares per cell (fp64: sums over millions of tokens)."""

    count: Tensor  # scalar: every cell sees the same observations
    total: Tensor
    total_sq: Tensor

    @classmethod
    def zeros(cls, *shape: int) -> Moments:
        return cls(torch.zeros((), dtype=_F64), torch.zeros(shape, dtype=_F64),
                   torch.zeros(shape, dtype=_F64))

    def add(self, n: float | Tensor, total: Tensor, total_sq: Tensor) -> None:
        """Add ``n`` values given by their sum and sum of squares."""
        self.count += n
        self.total += total.to(_F64)
        self.total_sq += total_sq.to(_F64)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets together."""
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> Tensor:
        """Mean (NaN where nothing was added)."""
        return self.total / self.count

    @property
    def var(self) -> Tensor:
        """Population variance (clamped at 0 against rounding)."""
        return (self.total_sq / self.count - self.mean ** 2).clamp_min(0.0)

    @property
    def std(self) -> Tensor:
        """Standard deviation."""
        return self.var.sqrt()

    def state(self, prefix: str) -> dict[str, Tensor]:
        """The sums as named tensors (for resume files and all-reduces)."""
        return {f"{prefix}.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> Moments:
        return cls(*(state[f"{prefix}.{f.name}"].clone() for f in fields(cls)))


# ---------------------------------------------------------------- CKA

GRAM_PANEL = 128  # columns per panel; a whole add() measured 0.80-0.84x of full GEMMs (256: 0.82-0.86x, 384: 0.84-0.91x)


def add_gram_upper(acc: Tensor, z: Tensor, panel: int | None = None) -> None:
    """``acc += z^T z`` on and above the diagonal, one column panel at a time (``acc`` ``[d, d]``, ``z`` ``[N, d]``).

    A symmetric product needs only its upper triangle: panel ``i`` multiplies
    its columns with the columns from ``i`` on, so ``d / panel`` GEMMs do
    ``(1 + panel / d) / 2`` of the full product's work (torch has no ``syrk``).
    Entries below the diagonal blocks are left as they were: read the result
    through :func:`symmetric`.
    """
    d, panel = z.shape[1], panel or GRAM_PANEL
    for i in range(0, d, panel):
        acc[i:i + panel, i:].addmm_(z[:, i:i + panel].T, z[:, i:])


def _sq_norms(m: Tensor) -> Tensor:
    """``[L]`` sums of squares of ``[L, ...]``: fp32 norms of 4,096-element chunks, fp64 beyond.

    (fp64 casts per element, or a squared copy, are 5-10x slower.)
    """
    flat = m.reshape(m.shape[0], -1)
    whole = flat.shape[1] - flat.shape[1] % 4096
    chunks = torch.linalg.vector_norm(flat[:, :whole].reshape(m.shape[0], -1, 4096), dim=-1)
    norms: Tensor = chunks.double().square().sum(-1) + torch.linalg.vector_norm(flat[:, whole:], dim=-1).double().square()
    return norms


def symmetric(m: Tensor) -> Tensor:
    """Symmetric ``[..., d, d]`` matrices given by their upper triangles, whole."""
    return torch.triu(m) + torch.triu(m, diagonal=1).mT


@dataclass
class CrossMoments:
    """Per-layer centered second moments of paired features ``x`` (base) and ``y`` (tuned).

    Each batch is centered on its own mean in fp32 (no catastrophic
    cancellation from the residual stream's large mean), then merged with Chan
    et al.'s pairwise update; the d x d matrices are fp32 to keep memory at
    3 * L * d^2 * 4 bytes, means and counts fp64. ``cxx`` and ``cyy`` are
    symmetric and only their upper triangles are kept up to date
    (:func:`add_gram_upper`); their lower triangles mean nothing.
    """

    n: Tensor  # [L], on the host
    mean_x: Tensor  # [L, d]
    mean_y: Tensor  # [L, d]
    cxx: Tensor  # [L, d, d]
    cyy: Tensor
    cxy: Tensor  # sum (x - mx)^T (y - my)

    @classmethod
    def zeros(cls, n_layers: int, dim: int, device: torch.device | str = "cpu") -> CrossMoments:
        def vec() -> Tensor:
            return torch.zeros(n_layers, dim, dtype=_F64, device=device)

        def mat() -> Tensor:
            return torch.zeros(n_layers, dim, dim, dtype=torch.float32, device=device)

        # the counts stay on the host: reading one must not make the host wait for the device
        return cls(torch.zeros(n_layers, dtype=_F64), vec(), vec(), mat(), mat(), mat())

    def add(self, layer: int, x: Tensor, y: Tensor) -> None:
        """Add paired rows ``x``, ``y`` ([N, d], same tokens) to ``layer``."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        x, y = x.float(), y.float()
        mx, my = x.mean(0), y.mean(0)
        w, dx, dy = self._move_means(layer, n_b, mx.double(), my.double())
        # The batch centered on its own mean, plus one row sqrt(w) * (batch mean - pool mean): one
        # GEMM then adds both the centered products and Chan's correction w dx dx^T, in place,
        # with no d x d temporary and no separate rank-1 pass over the d x d accumulator.
        xc = torch.empty(n_b + 1, x.shape[1], device=x.device)
        yc = torch.empty(n_b + 1, y.shape[1], device=y.device)
        torch.sub(x, mx, out=xc[:n_b])
        torch.sub(y, my, out=yc[:n_b])
        xc[n_b], yc[n_b] = dx * math.sqrt(w), dy * math.sqrt(w)
        add_gram_upper(self.cxx[layer], xc)
        add_gram_upper(self.cyy[layer], yc)
        self.cxy[layer].addmm_(xc.T, yc)

    def _move_means(self, layer: int, n_b: float, mx: Tensor, my: Tensor) -> tuple[float, Tensor, Tensor]:
        """Chan et al.'s pairwise step for the means and count of ``layer``, given ``n_b`` new rows.

        Returns the weight ``n_a n_b / n`` and the mean differences (new batch
        minus old pool) that the caller's centered products need as correction.
        """
        n_a = float(self.n[layer])
        n = n_a + n_b
        dx, dy = mx - self.mean_x[layer], my - self.mean_y[layer]
        self.mean_x[layer] += dx * (n_b / n)
        self.mean_y[layer] += dy * (n_b / n)
        self.n[layer] = n
        return n_a * n_b / n, dx, dy

    def _merge_layer(self, layer: int, n_b: float, mx: Tensor, my: Tensor, cxx: Tensor, cyy: Tensor,
                     cxy: Tensor) -> None:
        w, dx, dy = self._move_means(layer, n_b, mx, my)
        self.cxx[layer] += cxx + (w * torch.outer(dx, dx)).float()
        self.cyy[layer] += cyy + (w * torch.outer(dy, dy)).float()
        self.cxy[layer] += cxy + (w * torch.outer(dx, dy)).float()

    def merge(self, other: CrossMoments) -> CrossMoments:
        """The cross moments of both sets together (Chan's update, per layer)."""
        out = CrossMoments(*(getattr(self, f.name).clone() for f in fields(self)))
        for layer in range(int(self.n.shape[0])):
            if float(other.n[layer]) > 0:
                out._merge_layer(layer, float(other.n[layer]), other.mean_x[layer], other.mean_y[layer],
                                 other.cxx[layer], other.cyy[layer], other.cxy[layer])
        return out

    def pooled(self, all_sum: Callable[[Tensor], Tensor]) -> CrossMoments:
        """The moments of every process's rows together, given ``all_sum`` (a sum over processes).

        Centered matrices are not additive, but re-centred on the pooled mean
        they are: ``C = sum_r [C_r + n_r (m_r - m)(m_r - m)^T]`` with
        ``m = sum_r n_r m_r / sum_r n_r`` -- the same identity as :meth:`merge`,
        applied to all processes at once so that one all-reduce per tensor
        suffices. Layer by layer in fp64, so the extra memory is one ``d x d``.
        """
        n = all_sum(self.n.to(_F64))  # on the host, like self.n
        weights = self.n.to(self.mean_x.device, _F64)[:, None]
        safe_n = n.to(self.mean_x.device).clamp_min(1.0)[:, None]
        mean_x = all_sum(self.mean_x * weights) / safe_n
        mean_y = all_sum(self.mean_y * weights) / safe_n
        out = CrossMoments(n, mean_x, mean_y, torch.empty_like(self.cxx), torch.empty_like(self.cyy),
                           torch.empty_like(self.cxy))
        for layer in range(int(n.shape[0])):
            dx, dy = self.mean_x[layer] - mean_x[layer], self.mean_y[layer] - mean_y[layer]
            w = float(self.n[layer])
            for name, a, b in (("cxx", dx, dx), ("cyy", dy, dy), ("cxy", dx, dy)):
                local = getattr(self, name)[layer].to(_F64) + w * torch.outer(a, b)
                getattr(out, name)[layer] = all_sum(local).to(torch.float32)
        return out

    def cka(self) -> Tensor:
        """Linear CKA per layer: ||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F) (Kornblith et al. 2019)."""
        # cxx and cyy made whole (a layer at a time: one d x d copy), not their triangles' norms doubled:
        # summed over the same chunks as cxy, their rounding errors largely cancel in the ratio
        # (1 - CKA is ~1e-5 for a light fine-tune; the doubled triangles were 2-3x further from fp64)
        def whole(m: Tensor) -> Tensor:
            return torch.cat([_sq_norms(symmetric(m[i:i + 1])) for i in range(m.shape[0])])

        return _sq_norms(self.cxy) / (whole(self.cxx).sqrt() * whole(self.cyy).sqrt())

    def state(self, prefix: str) -> dict[str, Tensor]:
        """The sums as named tensors."""
        return {f"{prefix}.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> CrossMoments:
        return cls(*(state[f"{prefix}.{f.name}"].clone() for f in fields(cls)))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Direct linear CKA of two [N, d] matrices (the reference the accumulator must match)."""
    x = x.to(_F64) - x.to(_F64).mean(0)
    y = y.to(_F64) - y.to(_F64).mean(0)
    return float((y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


# ---------------------------------------------------------------- confidence intervals

def bootstrap_ratio_samples(sums: Tensor, counts: Tensor, n_bootstrap: int, seed: int) -> Tensor:
    """Token-weighted means ``sum(S_d) / sum(n_d)`` over documents resampled with replacement.

    ``sums`` is [D, ...] (per-document sums), ``counts`` [D]. Returns
    [n_bootstrap, ...]. Resampling documents (not tokens) respects the
    correlation of tokens within a document; the resamples are
    :func:`sumcircuit.stats.resample_counts`, as everywhere else.
    """
    weights = torch.from_numpy(resample_counts(sums.shape[0], n_bootstrap, seed))
    flat = sums.reshape(sums.shape[0], -1).to(_F64)
    num = weights @ flat
    den = weights @ counts.to(_F64)
    return (num / den[:, None]).reshape(n_bootstrap, *sums.shape[1:])


def ratio_ci(sums: Tensor, counts: Tensor, method: CIMethod = "bootstrap", ci_level: float = 0.95,
             n_bootstrap: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Confidence interval of a token-weighted mean from per-document sums.

    ``bootstrap``: percentile interval over documents resampled with
    replacement (seeded). ``normal``: ratio estimator with the delta-method
    standard error, ``R +- z * sqrt(D/(D-1) * sum_d (S_d - R n_d)^2) / sum_d n_d``.
    NaN when there is fewer than two documents.
    """
    n_docs = sums.shape[0]
    shape = sums.shape[1:]
    if n_docs < 2:
        nan = torch.full(shape, math.nan, dtype=_F64)
        return nan, nan.clone()
    alpha = (1.0 - ci_level) / 2.0
    if method == "bootstrap":
        samples = bootstrap_ratio_samples(sums, counts, n_bootstrap, seed)
        q = torch.tensor([alpha, 1.0 - alpha], dtype=_F64)
        low, high = torch.quantile(samples.reshape(n_bootstrap, -1), q, dim=0)
        return low.reshape(shape), high.reshape(shape)
    if method == "normal":
        s, n = sums.to(_F64), counts.to(_F64)
        total = n.sum()
        ratio = s.sum(0) / total
        resid = s - ratio * n.reshape(-1, *([1] * len(shape)))
        se = (n_docs / (n_docs - 1) * resid.pow(2).sum(0)).sqrt() / total
        z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - alpha)))
        return ratio - z * se, ratio + z * se
    raise ValueError(f"unknown CI method {method!r}")


# ---------------------------------------------------------------- neurons

@dataclass(frozen=True)
class NeuronChange:
    """Per-neuron change statistics, [L, N] each. Definitions in :func:`neuron_change`."""

    mean_base: Tensor
    mean_tuned: Tensor
    std_base: Tensor
    std_tuned: Tensor
    mean_change: Tensor
    mean_abs_change: Tensor
    standardized_change: Tensor
    sign_flip: Tensor  # bool
    changed: Tensor  # bool: |standardized_change| > threshold


def neuron_change(base: Moments, tuned: Moments, abs_change_total: Tensor, threshold: float,
                  flip_eps: float) -> NeuronChange:
    """Per-neuron statistics from accumulated sums.

    - ``mean_abs_change``: token-weighted mean of ``|a_tuned - a_base|`` at the same token.
    - ``standardized_change``: ``(mean_tuned - mean_base) / pooled_sd`` with
      ``pooled_sd = sqrt((var_base + var_tuned) / 2)`` over tokens (Cohen's d);
      0 where both variances are 0.
    - ``sign_flip``: the mean changes sign and both ``|mean| >= flip_eps * pooled_sd``,
      so means that only wobble around zero do not count as polarity reversals.
    - ``changed``: ``|standardized_change| > threshold``.
    """
    mb, mt = base.mean, tuned.mean
    pooled = ((base.var + tuned.var) / 2).sqrt()
    delta = mt - mb
    std_change = torch.where(pooled > 0, delta / pooled.clamp_min(1e-300), torch.zeros_like(delta))
    big = (mb.abs() >= flip_eps * pooled) & (mt.abs() >= flip_eps * pooled) & (pooled > 0)
    flip = (torch.sign(mb) * torch.sign(mt) < 0) & big
    return NeuronChange(mb, mt, base.std, tuned.std, delta, abs_change_total / base.count, std_change,
                        flip, std_change.abs() > threshold)
