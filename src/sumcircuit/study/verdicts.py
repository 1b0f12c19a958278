"""The verdict of each paper claim from its numbers: supported, contradicted, inconclusive, never overstated.

Pure functions of a claim's evidence (tables of scores, summaries), so each
rule is tested on constructed numbers; :mod:`sumcircuit.study.claims` reads a
study's evidence and registers the claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sumcircuit.stats import crossed_interval, t_interval

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
NOT_APPLICABLE, NOT_RUN = "not applicable", "not run"
PAPER_N_LAYERS = 12  # GPT-2 small

PAPER_CIRCUIT_LAYERS = (2, 3, 5)
PAPER_HEAD_SHARE = 0.62
PAPER_PARAM_REDUCTION = 0.75
MIN_SEEDS = 3  # seed-level verdicts need this many training seeds: coverage checked at 3, 86% at 2
MIN_RATIO_DOCS = 32  # a ratio-of-means interval (faithfulness areas) covers 94-95% at 32 documents, 92% at 16


@dataclass(frozen=True)
class ClaimResult:
    """One row of the claims table: the claim, the paper's figure, this run's, the verdict and its evidence."""

    claim: str
    paper: str
    this_run: str
    verdict: str
    evidence: str
    limited_by: str = ""  # what holds the verdict back (e.g. "1 training seed"); "" when nothing does


def _interval_verdict(low: float, high: float, threshold: float) -> str:
    if low > threshold:
        return SUPPORTED
    if high < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def head_share_claim(share: float | None, low: float | None, high: float | None,
                     n_docs: int | None = None, n_heads: int | None = None) -> ClaimResult:
    """The paper's own number: 62% of heads more focused.

    ``supported``: the interval contains 62% and lies above 50% (most heads);
    ``contradicted``: it excludes 62% (either way: the share this run finds is
    not the paper's); ``inconclusive`` otherwise.
    """
    claim = "62% of heads become more focused (lower attention entropy) after fine-tuning"
    if share is None or low is None or high is None:
        return ClaimResult(claim, "62% of heads", "-", NOT_RUN, "analysis stage missing")
    if not all(math.isfinite(float(v)) for v in (share, low, high)):
        return ClaimResult(claim, "62% of heads", "not computed", INCONCLUSIVE,
                           "the share of heads or its bounds are NaN in the analysis: not computed", "not computed")
    if high < PAPER_HEAD_SHARE or low > PAPER_HEAD_SHARE:
        verdict = CONTRADICTED
    else:
        verdict = SUPPORTED if low > 0.5 else INCONCLUSIVE
    most = "above" if low > 0.5 else ("below" if high < 0.5 else "not separable from")
    sizes = f" over n = {n_docs} documents and {n_heads} heads" if n_docs is not None and n_heads is not None else ""
    return ClaimResult(claim, "62% of heads", f"{share:.1%} [{low:.1%}, {high:.1%}]", verdict,
                       f"share of heads with entropy_delta < 0, 95% bounds from a simultaneous band over heads{sizes}; "
                       f"the interval is {most} 50% and {'contains' if low <= PAPER_HEAD_SHARE <= high else 'excludes'} "
                       "the paper's 62%")


def circuit_layers_claim(top_layers: Sequence[int] | None, n_layers: int | None,
                         model_type: str | None = None) -> ClaimResult:
    """The paper's circuit (GPT-2 layers 2, 3, 5) against this run's top layers by KL."""
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


Table = Sequence[Sequence[float]] | np.ndarray  # scores [training seeds, documents], paired by position


def _table(scores: Table | None) -> np.ndarray | None:
    """A seeds x documents score table, or None when there is none (a 1-D list is one seed)."""
    if scores is None:
        return None
    arr = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    return arr if arr.size else None


def _sizes(table: np.ndarray) -> str:
    n_seeds, n_docs = table.shape
    return f"n = {n_docs} documents x {n_seeds} training seed{'s' if n_seeds != 1 else ''}"


def paired_table_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``a - b`` over a seeds x documents table and its two-way studentized CI (:func:`crossed_interval`)."""
    return crossed_interval(a - b, 2000, 0)


def _difference_row(diff: float, low: float, high: float, table: np.ndarray) -> str:
    return (f"paired difference {diff:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] (two-way studentized bootstrap over "
            f"seeds and documents), {_sizes(table)}")


def paired_verdict(a: np.ndarray, b: np.ndarray,
                   interval: tuple[float, float, float] | None = None) -> tuple[str, str, str]:
    """(verdict, evidence, limited_by) for the paired difference ``a - b`` > 0 over seeds x documents.

    Never stronger than the evidence: one document, a NaN or zero-width
    interval, or fewer than :data:`MIN_SEEDS` training seeds give ``inconclusive``
    (saying what the interval alone would read). ``interval``: the
    :func:`paired_table_diff` of ``a, b`` when the caller already has it.
    """
    n_seeds, n_docs = a.shape
    if n_docs < 2:
        return INCONCLUSIVE, f"{_sizes(a)}: one document gives no interval", "1 document"
    diff, low, high = interval if interval is not None else paired_table_diff(a, b)
    row = _difference_row(diff, low, high, a)
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE, f"paired difference {diff:+.4f}, interval not computed, {_sizes(a)}", "not computed"
    if high - low <= 0:
        return INCONCLUSIVE, row + "; a zero-width interval (identical values) carries no evidence", \
            "zero-width interval"
    verdict = _interval_verdict(low, high, 0.0)
    if n_seeds < MIN_SEEDS:
        alone = f"; the interval alone reads {verdict}" if verdict != INCONCLUSIVE else ""
        return INCONCLUSIVE, (row + f"; with {n_seeds} training seed{'s' if n_seeds != 1 else ''} the interval "
                              f"does not cover the seed-to-seed variance (>= {MIN_SEEDS} seeds needed){alone}"), \
            f"{n_seeds} training seed{'s' if n_seeds != 1 else ''}"
    return verdict, row, ""


def rouge_claim(targeted: Table | None, lora_all: Table | None) -> ClaimResult:
    """Targeted LoRA against LoRA on every layer, paired over seeds and documents."""
    claim = "Targeted LoRA beats LoRA on all layers on ROUGE-1"
    t, a = _table(targeted), _table(lora_all)
    if t is None or a is None:
        return ClaimResult(claim, "0.182 vs 0.148", "-", NOT_RUN, "evaluation of both LoRA runs missing")
    verdict, evidence, limited = paired_verdict(t, a)
    return ClaimResult(claim, "0.182 vs 0.148", f"{t.mean():.3f} vs {a.mean():.3f}", verdict, evidence, limited)


def params_claim(targeted: int | None, lora_all: int | None) -> ClaimResult:
    """The share of trainable parameters targeted LoRA saves (the paper's 75%)."""
    claim = "Targeted LoRA trains 75% fewer parameters than LoRA on all layers"
    if not targeted or not lora_all:
        return ClaimResult(claim, "75% fewer", "-", NOT_RUN, "fine-tuning summaries missing")
    reduction = 1 - targeted / lora_all
    return ClaimResult(claim, "75% fewer", f"{reduction:.1%} fewer ({targeted:,} vs {lora_all:,})",
                       SUPPORTED if reduction >= PAPER_PARAM_REDUCTION - 1e-9 else CONTRADICTED,
                       "exact count of trainable parameters, tested against the paper's 75%; the reduction is "
                       "fixed by the share of adapted layers (3 of 12 in GPT-2 gives 75%)")


def _train_config(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fine-tuning config a ``train_summary.json`` recorded in its provenance."""
    return (summary.get("provenance") or {}).get("config") or {}


def stopping_rule(summary: Mapping[str, Any]) -> str:
    """The early-stopping rule a run was trained under, in words (from its recorded config)."""
    config = _train_config(summary)
    patience, delta, every = config.get("patience"), config.get("min_delta") or 0.0, config.get("eval_every")
    if not patience:
        return "no early stopping"
    gain = f"a validation-loss gain over {delta:g}" if delta else "any validation-loss gain"
    interval = f"every {every} steps" if every else "once per epoch"
    return f"stop after {patience} evaluations ({interval}) without {gain}"


def _not_converged(name: str, summary: Mapping[str, Any]) -> str | None:
    if not summary.get("best_step"):
        return f"{name} never improved on its starting point"
    if summary.get("best_step") == summary.get("steps") and not summary.get("stopped_early"):
        return f"{name} was still improving at its last step"
    return None


def epochs_claim(targeted: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
                 lora_all: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> ClaimResult:
    """Epochs to the best validation loss, paired by training seed.

    A run that never improved, or improved until its step cap, has not
    converged: epochs to converge are then not measured (inconclusive).
    Several seeds give a t-interval of the per-seed difference.
    """
    claim = "Targeted LoRA converges in fewer epochs"
    t_runs = [targeted] if isinstance(targeted, Mapping) else list(targeted or [])
    a_runs = [lora_all] if isinstance(lora_all, Mapping) else list(lora_all or [])
    if not t_runs or not a_runs or len(t_runs) != len(a_runs):
        return ClaimResult(claim, "fewer epochs", "-", NOT_RUN, "fine-tuning summaries missing (or unpaired seeds)")
    raw = [(t.get("epochs_to_best"), a.get("epochs_to_best")) for t, a in zip(t_runs, a_runs)]
    if any(t is None or a is None for t, a in raw):
        return ClaimResult(claim, "fewer epochs", "-", INCONCLUSIVE, "epochs to best not recorded")
    pairs = [(float(t), float(a)) for t, a in raw]  # type: ignore[arg-type]
    t_mean = sum(t for t, _ in pairs) / len(pairs)
    a_mean = sum(a for _, a in pairs) / len(pairs)
    seeds = f"{len(pairs)} training seed{'s' if len(pairs) != 1 else ''}"
    text = f"{t_mean:.2f} vs {a_mean:.2f} epochs to best validation loss ({seeds})"
    problems = [p for i, (t, a) in enumerate(zip(t_runs, a_runs), start=1)
                for p in (_not_converged(f"targeted (seed #{i})", t), _not_converged(f"LoRA-all (seed #{i})", a)) if p]
    if problems:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           "; ".join(problems) + ": not converged, so epochs to converge are not measured")
    rule = f"; {stopping_rule(t_runs[0])}"
    if _train_config(t_runs[0]).get("min_delta"):
        rule += " (a run that gains less per step reaches that point sooner: fewer epochs is not faster learning)"
    diffs = [t - a for t, a in pairs]
    if all(abs(d) < 1e-9 for d in diffs):
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           f"equal epochs to the best checkpoint ({seeds}){rule}")
    if len(diffs) < MIN_SEEDS:
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           f"per-seed differences {', '.join(f'{d:+.2f}' for d in diffs)} epochs: {seeds} give no "
                           f"interval with checked coverage (>= {MIN_SEEDS} seeds needed, e.g. --seeds 1,2,3){rule}",
                           seeds)
    diff, low, high = t_interval(diffs)
    evidence = f"difference {diff:+.2f} epochs, 95% t-interval over {seeds} [{low:+.2f}, {high:+.2f}]{rule}"
    if not high - low > 0:  # identical per-seed differences: no variance estimate, not certainty
        return ClaimResult(claim, "fewer epochs", text, INCONCLUSIVE,
                           evidence + "; a zero-width interval (identical per-seed differences) carries no evidence",
                           "zero-width interval")
    return ClaimResult(claim, "fewer epochs", text, _interval_verdict(-high, -low, 0.0), evidence)


def random_control_claim(targeted: Table | None, random_sets: Sequence[Table],
                         note: str = "") -> ClaimResult:
    """The circuit's targeted LoRA against random layer sets of the same size, each trained on the same seeds.

    Reports where the circuit falls among the random sets (by mean ROUGE-1)
    and the paired difference with the mean of the random sets, with an
    interval over seeds and documents.
    """
    claim = "(extension) The selected layers beat random layers of the same count on ROUGE-1"
    t = _table(targeted)
    tables = [x for x in (_table(r) for r in random_sets) if x is not None]
    if t is None or not tables:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "random-layer runs missing")
    pooled = np.mean(tables, axis=0)
    set_means = sorted(float(x.mean()) for x in tables)
    beaten = sum(m < float(t.mean()) for m in set_means)
    verdict, evidence, limited = paired_verdict(t, pooled)
    text = (f"{t.mean():.3f} vs {pooled.mean():.3f} (mean of {len(tables)} random sets, range "
            f"{set_means[0]:.3f}-{set_means[-1]:.3f}); the circuit beats {beaten} of {len(tables)}")
    return ClaimResult(claim, "not tested in the paper", text, verdict, evidence + (f"; {note}" if note else ""),
                       limited)


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
                          by_cause: Table | None, by_change: Table | None) -> ClaimResult:
    """Layers chosen by attribution (cause) against the paper's layers chosen by KL (change).

    ``kl`` and ``attribution`` are each circuit's (layers, head names); the
    tables are targeted LoRA's ROUGE-1 on each circuit, seeds x documents.
    """
    claim = "(extension) Layers chosen by cause (attribution patching) adapt better than layers chosen by change (KL)"
    if not kl or not attribution:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "circuit or attribution stage missing")
    (kl_layers, kl_heads), (attr_layers, attr_heads) = kl, attribution
    picks = (f"KL layers {', '.join(map(str, kl_layers))}; attribution layers {', '.join(map(str, attr_layers))} "
             f"(overlap {len(set(kl_layers) & set(attr_layers))}/{len(attr_layers)})")
    if attr_heads:
        picks += f"; heads in common {len(set(kl_heads) & set(attr_heads))}/{len(attr_heads)}"
    cause, change = _table(by_cause), _table(by_change)
    if cause is None or change is None:
        return ClaimResult(claim, "not tested in the paper", picks, NOT_RUN,
                           "targeted LoRA on one of the circuits was not evaluated")
    verdict, evidence, limited = paired_verdict(cause, change)
    return ClaimResult(claim, "not tested in the paper", picks + f"; ROUGE-1 {cause.mean():.3f} vs {change.mean():.3f}",
                       verdict, evidence, limited)


def ratio_verdict(low: float, high: float, n_docs: Any) -> tuple[str, str, str]:
    """(verdict, limited_by, what the interval alone reads) for a ratio-of-means interval whose claim is "above 0".

    A NaN or zero-width interval is no evidence; under :data:`MIN_RATIO_DOCS`
    documents the interval's coverage is unchecked, so the verdict is held back.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE, "not computed", INCONCLUSIVE
    if not high - low > 0:
        return INCONCLUSIVE, "zero-width interval", INCONCLUSIVE
    alone = _interval_verdict(low, high, 0.0)
    if not isinstance(n_docs, int) or n_docs < MIN_RATIO_DOCS:
        return INCONCLUSIVE, f"{n_docs} documents", alone
    return alone, "", alone


def faithfulness_claim(summary: Mapping[str, Any] | None, cause: str = "circuit_attribution",
                       change: str = "circuit") -> ClaimResult:
    """The circuit chosen by cause against the one chosen by change, by the area under their faithfulness curves.

    A document-level comparison on the first seed's fine-tune (paired bootstrap of
    the area difference); each circuit's standing among random layer sets is stated too.
    """
    claim = "(extension) The circuit chosen by cause recovers more of the fine-tuning's effect than the one chosen " \
            "by change (faithfulness curves)"
    areas = (summary or {}).get("auc") or {}
    if cause not in areas or change not in areas:
        return ClaimResult(claim, "not tested in the paper", "-", NOT_RUN, "faithfulness stage missing")
    diff = ((summary or {}).get("auc_differences") or {}).get(f"{change} - {cause}")
    versus = (summary or {}).get("against_random") or {}
    text = f"area {areas[cause]['auc']:.3f} (cause) vs {areas[change]['auc']:.3f} (change)"
    standing = "; ".join(f"{name} beats {v['beats']} of {v['n_random']} random sets (p = {v['p_value']:.3f})"
                         for name, v in versus.items())
    n_docs = (summary or {}).get("n_docs")
    if not diff or not all(math.isfinite(float(diff[k])) for k in ("ci_low", "ci_high")):
        return ClaimResult(claim, "not tested in the paper", text, INCONCLUSIVE,
                           "the difference of the areas has no interval: not computed", "not computed")
    low, high = -float(diff["ci_high"]), -float(diff["ci_low"])  # cause - change
    evidence = (f"paired difference of the areas {-float(diff['difference']):+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] "
                f"(studentized bootstrap of a ratio of means over n = {n_docs} documents, first training seed's "
                f"fine-tune); {standing}")
    verdict, limited, alone = ratio_verdict(low, high, n_docs)
    if limited == "zero-width interval":
        return ClaimResult(claim, "not tested in the paper", text, INCONCLUSIVE,
                           evidence + "; a zero-width interval carries no evidence", limited)
    if limited:
        return ClaimResult(claim, "not tested in the paper", text, INCONCLUSIVE,
                           evidence + f"; the interval covers 94% from {MIN_RATIO_DOCS} documents but 92% at 16 and "
                           f"89-92% at 8 in simulation; the interval alone reads {alone}", limited)
    return ClaimResult(claim, "not tested in the paper", text, verdict, evidence)
