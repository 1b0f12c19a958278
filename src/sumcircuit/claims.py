"""The paper's claims, checked against a run with their evidence and uncertainty.

Each claim of arXiv 2505.17073 becomes a :class:`ClaimResult` marked
``supported`` (the 95% interval excludes the null in the paper's direction),
``contradicted`` (it excludes it in the other direction), ``inconclusive``
(otherwise: a non-rejection is not evidence against), ``not applicable``
(the claim cannot apply to this model, e.g. GPT-2 layer indices on another
architecture) or ``not run``. Paired differences use the studentized
bootstrap over documents (coverage checked in ``tests/test_stats.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sumcircuit.stats import paired_diff

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
NOT_APPLICABLE, NOT_RUN = "not applicable", "not run"
PAPER_N_LAYERS = 12  # GPT-2 small

PAPER_CIRCUIT_LAYERS = (2, 3, 5)
PAPER_HEAD_SHARE = 0.62
PAPER_PARAM_REDUCTION = 0.75


@dataclass(frozen=True)
class ClaimResult:
    claim: str
    paper: str
    this_run: str
    verdict: str
    evidence: str


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000,
                          seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired examples and its studentized bootstrap CI (:func:`sumcircuit.stats.paired_diff`)."""
    return paired_diff(a, b, n_resamples, seed, level)


def _interval_verdict(low: float, high: float, threshold: float) -> str:
    if low > threshold:
        return SUPPORTED
    if high < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def head_share_claim(share: float | None, low: float | None, high: float | None) -> ClaimResult:
    claim = "Most heads become more focused (lower attention entropy) after fine-tuning"
    if share is None or low is None or high is None:
        return ClaimResult(claim, "62% of heads", "-", NOT_RUN, "analysis stage missing")
    inside = "inside" if low <= PAPER_HEAD_SHARE <= high else "outside"
    return ClaimResult(claim, "62% of heads", f"{share:.1%} [{low:.1%}, {high:.1%}]",
                       _interval_verdict(low, high, 0.5),
                       f"share of heads with entropy_delta < 0 and its 95% CI over documents: supported above 50%, "
                       f"contradicted below; the paper's 62% is {inside} the interval")


def circuit_layers_claim(top_layers: Sequence[int] | None, n_layers: int | None,
                         model_type: str | None = None) -> ClaimResult:
    claim = "The most-changed layers (by attention KL) are 2, 3 and 5"
    if top_layers is None:
        return ClaimResult(claim, "layers 2, 3, 5 (GPT-2)", "-", NOT_RUN, "circuit stage missing")
    depth = ", ".join(f"{l} ({l / max(1, (n_layers or 1) - 1):.0%} deep)" for l in top_layers)
    if n_layers != PAPER_N_LAYERS or (model_type not in (None, "gpt2")):
        return ClaimResult(claim, "layers 2, 3, 5 (GPT-2)", depth, NOT_APPLICABLE,
                           f"layer indices are GPT-2 (12 layers) specific; this model ({model_type or '?'}, "
                           f"{n_layers} layers) picks the layers shown, with their relative depth")
    same = set(top_layers) == set(PAPER_CIRCUIT_LAYERS)
    overlap = sorted(set(top_layers) & set(PAPER_CIRCUIT_LAYERS))
    return ClaimResult(claim, "layers 2, 3, 5 (GPT-2)", ", ".join(map(str, top_layers)),
                       SUPPORTED if same else CONTRADICTED,
                       f"top-{len(top_layers)} layers by KL of {n_layers}; overlap with 2, 3, 5: {overlap or 'none'}")


def rouge_claim(targeted: Sequence[float] | None, lora_all: Sequence[float] | None) -> ClaimResult:
    claim = "Targeted LoRA beats LoRA on all layers on ROUGE-1"
    if not targeted or not lora_all:
        return ClaimResult(claim, "0.182 vs 0.148", "-", NOT_RUN, "evaluation of both LoRA runs missing")
    mean_t, mean_a = sum(targeted) / len(targeted), sum(lora_all) / len(lora_all)
    diff, low, high = paired_bootstrap_diff(targeted, lora_all)
    return ClaimResult(claim, "0.182 vs 0.148", f"{mean_t:.3f} vs {mean_a:.3f}",
                       _interval_verdict(low, high, 0.0),
                       f"paired difference {diff:+.4f}, 95% studentized bootstrap CI [{low:+.4f}, {high:+.4f}] "
                       f"over n = {len(targeted)} documents, one training seed per method")


def params_claim(targeted: int | None, lora_all: int | None) -> ClaimResult:
    claim = "Targeted LoRA trains 75% fewer parameters than LoRA on all layers"
    if not targeted or not lora_all:
        return ClaimResult(claim, "75% fewer", "-", NOT_RUN, "fine-tuning summaries missing")
    reduction = 1 - targeted / lora_all
    return ClaimResult(claim, "75% fewer", f"{reduction:.1%} fewer ({targeted:,} vs {lora_all:,})",
                       SUPPORTED if reduction >= PAPER_PARAM_REDUCTION - 1e-9 else CONTRADICTED,
                       "exact count of trainable parameters; the reduction is fixed by the number of "
                       "adapted layers (3 of 12 in GPT-2 gives 75%)")


def epochs_claim(targeted: Mapping[str, Any] | None, lora_all: Mapping[str, Any] | None) -> ClaimResult:
    """Epochs to the best validation loss; a run that never improved, or improved until the cap, has not converged."""
    claim = "Targeted LoRA converges in fewer epochs"
    if not targeted or not lora_all:
        return ClaimResult(claim, "fewer epochs", "-", NOT_RUN, "fine-tuning summaries missing")
    t, a = targeted.get("epochs_to_best"), lora_all.get("epochs_to_best")
    text = f"{t:.2f} vs {a:.2f} epochs to best validation loss" if t is not None and a is not None else "-"
    if t is None or a is None:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE, "epochs to best not recorded")
    never = [name for name, s in (("targeted", targeted), ("LoRA-all", lora_all)) if not s.get("best_step")]
    if never:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           f"{', '.join(never)} never improved on its starting point: not converged, so "
                           "epochs to converge are not measured")
    at_end = [name for name, s in (("targeted", targeted), ("LoRA-all", lora_all))
              if s.get("best_step") == s.get("steps") and not s.get("stopped_early")]
    if at_end:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           f"best checkpoint at the last step for {', '.join(at_end)}: not converged "
                           "within the budget, so epochs to converge are not measured")
    if abs(float(t) - float(a)) < 1e-9:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE, "equal epochs to the best checkpoint")
    return ClaimResult(claim, "fewer epochs", text, SUPPORTED if t < a else CONTRADICTED,
                       "one training seed per method: no interval over seeds")


def random_control_claim(targeted: Sequence[float] | None,
                         random_runs: Sequence[Sequence[float]]) -> ClaimResult:
    claim = "(extension) The selected layers beat random layers of the same count on ROUGE-1"
    if not targeted or not random_runs:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "random-layer runs missing")
    n = len(targeted)
    pooled = [sum(run[i] for run in random_runs) / len(random_runs) for i in range(n)]
    diff, low, high = paired_bootstrap_diff(targeted, pooled)
    return ClaimResult(claim, "not tested in the paper", f"{sum(targeted) / n:.3f} vs "
                       f"{sum(pooled) / n:.3f} (mean of {len(random_runs)} random sets)",
                       _interval_verdict(low, high, 0.0),
                       f"paired difference {diff:+.4f}, 95% studentized CI [{low:+.4f}, {high:+.4f}] over n = {n} "
                       f"documents; random layer sets drawn independently of the circuit")


def ablation_claim(ablation: Mapping[str, Any] | None) -> ClaimResult:
    """From ``ablation.json``: the circuit's effect and the p-value against its random controls."""
    claim = "(extension) Ablating the circuit hurts more than ablating random layers"
    if not ablation:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "ablation stage missing")
    effect = (ablation.get("circuit") or {}).get("effect")
    controls = ablation.get("random_controls") or {}
    p = controls.get("p_value")
    n_docs = ablation.get("n_docs")
    if p is None or effect is None:
        text = f"loss change {effect:+.4f}" if effect is not None else "-"
        return ClaimResult(claim, "not tested in the paper", text, INCONCLUSIVE, "no random controls were run")
    text = (f"loss change {effect:+.4f} vs random {controls.get('effect_mean', float('nan')):+.4f}, "
            f"p = {p:.3f}")
    return ClaimResult(claim, "not tested in the paper", text, SUPPORTED if p < 0.05 else INCONCLUSIVE,
                       f"one-sided empirical p-value against {controls.get('n')} random layer sets of the same "
                       f"size over n = {n_docs} documents; p >= 0.05 does not reject the null and is not "
                       "evidence against the claim")


def cause_vs_change_claim(kl: tuple[list[int], list[str]] | None, attribution: tuple[list[int], list[str]] | None,
                          by_cause: Sequence[float], by_change: Sequence[float]) -> ClaimResult:
    """Layers chosen by attribution (cause) against the paper's layers chosen by KL (change).

    ``kl`` and ``attribution`` are each circuit's (layers, head names).
    """
    claim = "(extension) Layers chosen by cause (attribution patching) adapt better than layers chosen by change (KL)"
    if not kl or not attribution:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "circuit or attribution stage missing")
    (kl_layers, kl_heads), (attr_layers, attr_heads) = kl, attribution
    picks = (f"KL layers {', '.join(map(str, kl_layers))}; attribution layers {', '.join(map(str, attr_layers))} "
             f"(overlap {len(set(kl_layers) & set(attr_layers))}/{len(attr_layers)})")
    if attr_heads:
        picks += f"; heads in common {len(set(kl_heads) & set(attr_heads))}/{len(attr_heads)}"
    if not by_cause or not by_change:
        return ClaimResult(claim, "not tested in the paper", picks, NOT_RUN,
                           "targeted LoRA on one of the circuits was not evaluated")
    diff, low, high = paired_bootstrap_diff(by_cause, by_change)
    return ClaimResult(claim, "not tested in the paper", picks + f"; ROUGE-1 {sum(by_cause) / len(by_cause):.3f} "
                       f"vs {sum(by_change) / len(by_change):.3f}", _interval_verdict(low, high, 0.0),
                       f"paired difference {diff:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] over {len(by_cause)} documents")
