"""The built-in change scores, as numpy functions of the per-head ``[..., L, H]`` and per-layer ``[..., L]`` statistics.

Leading axes are bootstrap resamples, so the same function ranks the full
sample and every resample. Each function is registered by name in
:data:`sumcircuit.circuit.config.CIRCUIT_SCORES`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sumcircuit.circuit.config import CIRCUIT_SCORES, CircuitError
from sumcircuit.registry import resolve
from sumcircuit.stats import average_ranks

Stats = Mapping[str, np.ndarray]
COMBINED_PARTS = ("kl", "entropy", "activation", "weights")


def normalized_ranks(scores: np.ndarray) -> np.ndarray:
    """``(n-1-rank)/(n-1)`` along the last axis, rank 0 = largest, ties averaged; NaN stays NaN."""
    n = scores.shape[-1]
    filled = np.nan_to_num(scores, nan=-np.inf)
    ranks = np.apply_along_axis(average_ranks, -1, filled)
    return np.where(np.isnan(scores), np.nan, (n - 1 - ranks) / max(n - 1, 1))


def _flat(grid: np.ndarray) -> np.ndarray:
    return grid.reshape(*grid.shape[:-2], -1)


def kl_heads(heads: Stats) -> np.ndarray:
    """KL(base || tuned) per head, flattened ``[..., L*H]``."""
    return _flat(heads["kl_base_tuned"])


def kl_sym_heads(heads: Stats) -> np.ndarray:
    """Symmetric KL per head, flattened."""
    return _flat((heads["kl_base_tuned"] + heads["kl_tuned_base"]) / 2)


def entropy_heads(heads: Stats) -> np.ndarray:
    """|entropy change| per head, flattened."""
    return _flat(np.abs(heads["entropy_delta"]))


def _layer_mean(flat_heads: np.ndarray, heads: Stats) -> np.ndarray:
    n_heads = next(iter(heads.values())).shape[-1]
    return np.asarray(np.nanmean(flat_heads.reshape(*flat_heads.shape[:-1], -1, n_heads), axis=-1))


def kl_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """Mean over a layer's heads of KL(base || tuned)."""
    return _layer_mean(kl_heads(heads), heads)


def kl_sym_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """Mean over a layer's heads of the symmetric KL."""
    return _layer_mean(kl_sym_heads(heads), heads)


def entropy_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """Mean over a layer's heads of |entropy change|."""
    return _layer_mean(entropy_heads(heads), heads)


def activation_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """|relative change of the residual-stream norm|."""
    return np.abs(layers["actmag_rel_change"])


def weights_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """Relative weight change of attention plus MLP."""
    return layers["weight_change_attn"] + layers["weight_change_mlp"]


def combined_layers(heads: Stats, layers: Stats) -> np.ndarray:
    """Mean normalised rank over the available change scores."""
    parts = [layer_scores(p, heads, layers) for p in COMBINED_PARTS]
    parts = [p for p in parts if not np.all(np.isnan(p))]
    shape = np.broadcast_shapes(*(p.shape for p in parts))
    return np.asarray(np.nanmean(np.stack([normalized_ranks(np.broadcast_to(p, shape)) for p in parts]), axis=0))


def combined_heads(heads: Stats) -> np.ndarray:
    """Mean normalised rank of KL and |entropy change| per head."""
    parts = [head_scores(p, heads) for p in ("kl", "entropy")]
    return np.asarray(np.nanmean(np.stack([normalized_ranks(p) for p in parts]), axis=0))


def layer_scores(score: str, heads: Stats, layers: Stats) -> np.ndarray:
    """Per-layer score ``[..., L]`` of a registered change score (leading axes: bootstrap resamples)."""
    entry = CIRCUIT_SCORES.get(score)
    if entry.layer is None:
        raise CircuitError(f"score {score}: not a change score of an analysis")
    return np.asarray(resolve(entry.layer)(heads, layers), dtype=np.float64)


def head_scores(score: str, heads: Stats) -> np.ndarray:
    """Per-head score flattened to ``[..., L*H]`` (index = layer * H + head)."""
    entry = CIRCUIT_SCORES.get(score)
    if entry.head is None:
        per_head = [n for n, s in CIRCUIT_SCORES.items() if s.head is not None]
        raise CircuitError(f"top_heads needs a per-head score ({', '.join(per_head)}); '{score}' is defined per "
                           "layer only")
    return np.asarray(resolve(entry.head)(heads), dtype=np.float64)


def has_head_score(score: str) -> bool:
    """Whether ``score`` is defined per head."""
    return CIRCUIT_SCORES.get(score).head is not None


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest along the last axis (NaN last; ties: lower index first)."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=-1, kind="stable")
    return order[..., :k]
