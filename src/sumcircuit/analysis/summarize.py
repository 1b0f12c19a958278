"""From accumulated sums to the tables: means, intervals over documents, rankings, the headline numbers.

Statistics are token-weighted means over *counted* query positions (real
tokens in the configured region); intervals resample documents, never tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from typing import Any, cast

import torch
from torch import Tensor

from sumcircuit.analysis.config import AnalysisConfig, AnalysisError
from sumcircuit.analysis.result import HEAD_COLUMNS, HEAD_STATS, NEURON_COLUMNS, AnalysisResult, HeadRow, LayerRow, NeuronRow
from sumcircuit.analysis.state import ROW_STATS, AnalysisState
from sumcircuit.metrics import bootstrap_ratio_samples, neuron_change, ratio_ci
from sumcircuit.stats import sign_share_bounds

log = logging.getLogger(__name__)

DEFINITIONS = {
    "entropy": "per query row, -sum_j p_j log p_j in nats over the keys the row may attend to",
    "kl": "per query row, KL(p||q) = sum_j p_j (log p_j - log q_j) in nats; base = p for kl_base_tuned",
    "row_weighting": "token-weighted mean over counted query positions (real tokens in the region); "
                     "every head of a layer sees the same rows",
    "actmag": "token-weighted mean L2 norm of the block output (residual stream); "
              "actmag_rel_change = (tuned - base) / base",
    "cka": "linear CKA between base and tuned block outputs over all counted tokens",
    "weight_change": "||W_tuned - W_base||_F / ||W_base||_F over all parameters of the attention "
                     "(resp. MLP) module of the block; LoRA layers count with their merged weight",
    "neuron_activation": "input of the MLP output projection (adapter.mlp_output)",
    "mean_abs_change": "token-weighted mean of |a_tuned - a_base| at the same token",
    "standardized_change": "(mean_tuned - mean_base) / sqrt((var_base + var_tuned) / 2), "
                           "variances over tokens (Cohen's d)",
    "sign_flip": "mean activation changes sign and both |means| >= sign_flip_eps * pooled sd",
    "neuron_frac_changed": "fraction of the layer's neurons with |standardized_change| > neuron_threshold",
}




def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def finalize(state: AnalysisState, config: AnalysisConfig, weights: dict[str, Tensor]) -> AnalysisResult:
    """Means, confidence intervals, rankings and tables from accumulated sums."""
    if state.n_docs == 0 or float(state.heads["entropy_base"].count) == 0:
        raise AnalysisError("no counted tokens: every document is empty in region "
                            f"'{config.region}' (a '{{text}}' template has no summary region)")
    L, H = state.n_layers, state.n_heads
    tokens = state.tokens()
    sums = {s: state.doc_sums(s) for s in ROW_STATS}
    sums["entropy_delta"] = sums["entropy_tuned"] - sums["entropy_base"]
    n_total = tokens.sum()
    means = {s: sums[s].sum(0) / n_total for s in HEAD_STATS}
    ci = {s: ratio_ci(sums[s], tokens, config.ci_method, config.ci_level, config.n_bootstrap, config.seed)
          for s in HEAD_STATS}
    columns = {}  # one tolist() per column: a float() per cell costs ~5 us, 4,000 cells for 270 heads
    for s in HEAD_STATS:
        columns.update({s: means[s].tolist(), f"{s}_ci_low": ci[s][0].tolist(), f"{s}_ci_high": ci[s][1].tolist()})
    columns["rows"] = [[int(n_total)] * H] * L
    heads = [cast(HeadRow, {"layer": layer, "head": head, **{k: columns[k][layer][head] for k in HEAD_COLUMNS[2:]}})
             for layer in range(L) for head in range(H)]  # in the CSV's column order: a table reads back the same

    change = neuron_change(state.neurons["base"], state.neurons["tuned"], state.neuron_abs_change,  # type: ignore[arg-type]
                           config.neuron_threshold, config.sign_flip_eps)
    act_b, act_t = state.actmag["base"].mean, state.actmag["tuned"].mean
    act_rel = (act_t - act_b) / act_b
    cka = state.cross.cka() if state.cross is not None else torch.full((L,), math.nan, dtype=torch.float64)
    layer_values = {
        "kl_base_tuned": means["kl_base_tuned"].mean(1), "kl_tuned_base": means["kl_tuned_base"].mean(1),
        "entropy_delta": means["entropy_delta"].mean(1), "actmag_base": act_b, "actmag_tuned": act_t,
        "actmag_rel_change": act_rel, "cka": cka.cpu(), "weight_change_attn": weights["attn"],
        "weight_change_mlp": weights["mlp"], "neuron_abs_change_mean": change.mean_abs_change.mean(1),
        "neuron_frac_changed": change.changed.double().mean(1),
        "neuron_sign_flips": change.sign_flip.sum(1).double(),
    }
    layers = [cast(LayerRow, {"layer": i, **{k: float(v[i]) for k, v in layer_values.items()},
                              "neuron_sign_flips": int(layer_values["neuron_sign_flips"][i])}) for i in range(L)]

    score = (change.standardized_change.abs() if config.neuron_rank_by == "standardized"
             else change.mean_abs_change)
    flat = torch.nan_to_num(score.flatten(), nan=-1.0)
    if config.top_k > flat.numel():  # said, not silently clamped
        log.warning("`top_k` %d is more than the model's %d MLP neurons: neurons.csv lists all of them",
                    config.top_k, flat.numel())
    top = torch.argsort(flat, descending=True, stable=True)[:config.top_k]
    n_neurons = state.n_neurons
    neurons: list[NeuronRow] = []
    for rank, index in enumerate(top.tolist(), start=1):
        layer, neuron = divmod(index, n_neurons)
        neurons.append(cast(NeuronRow, {"rank": rank, "layer": layer, "neuron": neuron,
                                        **{k: float(getattr(change, k)[layer, neuron]) for k in NEURON_COLUMNS[3:-1]},
                                        "sign_flip": int(change.sign_flip[layer, neuron])}))

    per_doc_tok = tokens.clamp_min(1)[:, None, None]
    per_doc = {s: (sums[s] / per_doc_tok).float() for s in ("kl_base_tuned", "kl_tuned_base",
                                                              "entropy_base", "entropy_tuned")}
    ab, at = state.doc_sums("actmag_base"), state.doc_sums("actmag_tuned")
    per_doc["actmag_rel_change"] = _safe_div(at - ab, ab).float()
    per_doc["tokens"] = tokens.to(torch.int64)
    per_doc = {k: torch.where(tokens.reshape(-1, *([1] * (v.dim() - 1))) > 0, v,
                              torch.full_like(v, math.nan) if v.is_floating_point() else v)
               for k, v in per_doc.items()}

    stats = {f"heads.{s}": means[s].float() for s in HEAD_STATS}
    stats.update({f"heads.{s}_ci_low": ci[s][0].float() for s in HEAD_STATS})
    stats.update({f"heads.{s}_ci_high": ci[s][1].float() for s in HEAD_STATS})
    stats.update({f"heads.{s}_std": state.heads[s].std.float() for s in ROW_STATS})
    stats.update({f"layers.{k}": v.float() for k, v in layer_values.items()})
    stats.update({f"neurons.{f.name}": getattr(change, f.name).float() if f.name not in ("sign_flip", "changed")
                  else getattr(change, f.name).to(torch.uint8) for f in fields(change)})

    summary = _headline(state, config, sums, tokens, means, layer_values)
    return AnalysisResult(heads, layers, neurons, summary, stats, per_doc, state, list(state.doc_ids))


def _rank(values: Tensor, absolute: bool = False) -> list[int]:
    v = torch.nan_to_num(values.abs() if absolute else values, nan=-math.inf)
    return torch.argsort(v, descending=True, stable=True).tolist()


def _headline(state: AnalysisState, config: AnalysisConfig, sums: dict[str, Tensor], tokens: Tensor,
              means: dict[str, Tensor], layer_values: dict[str, Tensor]) -> dict[str, Any]:
    delta = means["entropy_delta"]
    share = float((delta < 0).double().mean())
    n_lower = n_not_lower = None
    if state.n_docs >= 2:  # a simultaneous band over heads: see stats.sign_share_bounds for why
        samples = bootstrap_ratio_samples(sums["entropy_delta"], tokens, config.n_bootstrap, config.seed)
        low, high, n_lower, n_not_lower = sign_share_bounds(delta.numpy(), samples.numpy(), config.ci_level)
        share_ci: tuple[float, float] = (low, high)
    else:
        share_ci = (math.nan, math.nan)
    return {
        "n_docs": state.n_docs, "n_tokens": int(tokens.sum()), "region": config.region,
        "n_layers": state.n_layers, "n_heads": state.n_heads, "n_neurons": state.n_neurons,
        "share_heads_entropy_decreased": share,
        "share_heads_entropy_decreased_ci": list(share_ci),
        "heads_entropy_surely_lower": n_lower, "heads_entropy_surely_not_lower": n_not_lower,
        "mean_entropy_base": float(means["entropy_base"].mean()),
        "mean_entropy_tuned": float(means["entropy_tuned"].mean()),
        "mean_kl_base_tuned": float(means["kl_base_tuned"].mean()),
        "mean_kl_tuned_base": float(means["kl_tuned_base"].mean()),
        "layers_by_kl": _rank(layer_values["kl_base_tuned"]),
        "layers_by_activation_change": _rank(layer_values["actmag_rel_change"], absolute=True),
        "layers_by_neuron_change": _rank(layer_values["neuron_abs_change_mean"]),
        "neuron_frac_changed": float(layer_values["neuron_frac_changed"].mean()),
        "neuron_sign_flips": int(layer_values["neuron_sign_flips"].sum()),
        "ci": {"method": config.ci_method, "ci_level": config.ci_level,
               "detail": ("percentile bootstrap over documents (resampled with replacement), "
                          f"{config.n_bootstrap} replicates, seed {config.seed}, of the token-weighted mean"
                          if config.ci_method == "bootstrap" else
                          "normal approximation of the token-weighted mean (ratio estimator, delta method "
                          "over documents)"),
               "share_heads": ("bounds from a simultaneous bootstrap max-|t| band over all heads (documents "
                               "resampled): [share of heads surely lower, 1 - share surely not lower]")},
        "definitions": {**DEFINITIONS, "neuron_threshold": config.neuron_threshold,
                        "sign_flip_eps": config.sign_flip_eps, "neuron_rank_by": config.neuron_rank_by},
    }


