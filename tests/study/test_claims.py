"""Claim verdicts follow their intervals; the paired bootstrap is correct."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sumcircuit.stats import paired_diff
from sumcircuit.study import claims


def test_paired_bootstrap_matches_mean_and_brackets_it() -> None:
    rng = random.Random(3)
    a = [rng.random() for _ in range(200)]
    b = [x - 0.05 + rng.gauss(0, 0.01) for x in a]
    diff, low, high = claims.paired_table_diff(np.array([a]), np.array([b]))
    assert diff == pytest.approx(sum(x - y for x, y in zip(a, b)) / 200)
    assert low < diff < high
    assert 0.045 < low and high < 0.055  # noise sd 0.01 / sqrt(200) ~ 0.0007
    assert claims.paired_table_diff(np.array([a]), np.array([b])) == (diff, low, high)
    assert (diff, low, high) == paired_diff(a, b, 2000, 0)  # one seed: the studentized interval over documents


def test_interval_verdicts() -> None:
    assert claims.head_share_claim(0.7, 0.6, 0.8).verdict == claims.SUPPORTED
    assert claims.head_share_claim(0.3, 0.2, 0.4).verdict == claims.CONTRADICTED
    assert claims.head_share_claim(0.55, 0.45, 0.65).verdict == claims.INCONCLUSIVE
    more = claims.head_share_claim(0.85, 0.8, 0.9, n_docs=16, n_heads=270)  # most heads, but not the paper's 62%
    assert more.verdict == claims.CONTRADICTED and "n = 16 documents and 270 heads" in more.evidence
    assert claims.head_share_claim(None, None, None).verdict == claims.NOT_RUN


def _seeds(row: list[float], n: int = 3) -> np.ndarray:
    """``row`` on ``n`` training seeds, each shifted a little (seed effects, no identical seeds)."""
    return np.stack([np.asarray(row) + 0.003 * k for k in range(n)])


def test_rouge_claim_uses_paired_difference() -> None:
    rng = np.random.default_rng(1)
    better = _seeds([0.30 + 0.001 * i for i in range(50)])
    worse = better - 0.02 + rng.normal(0, 0.002, better.shape)
    assert claims.rouge_claim(better, worse).verdict == claims.SUPPORTED
    assert claims.rouge_claim(worse, better).verdict == claims.CONTRADICTED
    noisy = better + np.array([0.02 if i % 2 else -0.02 for i in range(50)])
    assert claims.rouge_claim(noisy, better).verdict == claims.INCONCLUSIVE


def test_verdicts_never_overstate() -> None:
    """One seed, one document, identical values or NaN: inconclusive, saying why (and what the interval reads)."""
    rng = np.random.default_rng(2)
    better = [0.30 + 0.001 * i for i in range(50)]
    worse = [x - 0.02 + rng.normal(0, 0.002) for x in better]
    one_seed = claims.rouge_claim(better, worse)  # the quick preset: documents only
    assert (one_seed.verdict, one_seed.limited_by) == (claims.INCONCLUSIVE, "1 training seed")
    assert "the interval alone reads supported" in one_seed.evidence and ">= 3 seeds needed" in one_seed.evidence
    two = claims.rouge_claim(_seeds(better, 2), _seeds(worse, 2))  # 86% coverage at 2 seeds
    assert (two.verdict, two.limited_by) == (claims.INCONCLUSIVE, "2 training seeds")
    single_doc = claims.rouge_claim(_seeds([0.3]), _seeds([0.2]))
    assert (single_doc.verdict, single_doc.limited_by) == (claims.INCONCLUSIVE, "1 document")
    shifted = _seeds(better)
    identical = claims.rouge_claim(shifted + 0.02, shifted)  # the same difference everywhere: zero width
    assert (identical.verdict, identical.limited_by) == (claims.INCONCLUSIVE, "zero-width interval")
    nan = claims.head_share_claim(0.6, float("nan"), float("nan"))
    assert (nan.verdict, nan.this_run, nan.limited_by) == (claims.INCONCLUSIVE, "not computed", "not computed")
    assert "excludes" not in nan.evidence

    def run(epochs: float) -> dict[str, float]:
        return {"epochs_to_best": epochs, "best_step": 10, "steps": 40, "stopped_early": True}

    one = claims.epochs_claim([run(0.99)], [run(1.00)])  # 0.99 vs 1.00 epochs, no interval at all
    assert (one.verdict, one.limited_by) == (claims.INCONCLUSIVE, "1 training seed")
    same = claims.epochs_claim([run(1.0), run(1.5), run(2.0)], [run(2.0), run(2.5), run(3.0)])  # all -1.00
    assert (same.verdict, same.limited_by) == (claims.INCONCLUSIVE, "zero-width interval")


def test_params_and_layers_and_epochs() -> None:
    assert claims.params_claim(73_728, 294_912).verdict == claims.SUPPORTED  # 3 of 12 GPT-2 layers
    assert "75.0%" in claims.params_claim(73_728, 294_912).this_run
    assert claims.params_claim(200_000, 294_912).verdict == claims.CONTRADICTED
    assert claims.circuit_layers_claim([5, 2, 3], 12).verdict == claims.SUPPORTED
    assert claims.circuit_layers_claim([0, 1, 2], 12).verdict == claims.CONTRADICTED
    other = claims.circuit_layers_claim([20, 25, 29], 30, "llama")
    assert other.verdict == claims.NOT_APPLICABLE and "29 (100% deep)" in other.this_run
    converged = {"epochs_to_best": 1.0, "best_step": 10, "steps": 30}
    slower = {"epochs_to_best": 2.0, "best_step": 20, "steps": 30}
    three = [dict(converged, epochs_to_best=e) for e in (1.0, 1.1, 0.9)]
    assert claims.epochs_claim(three, [slower, dict(slower, epochs_to_best=2.2), slower]).verdict == claims.SUPPORTED
    assert claims.epochs_claim([slower, dict(slower, epochs_to_best=2.2), slower], three).verdict == \
        claims.CONTRADICTED
    at_end = {"epochs_to_best": 1.0, "best_step": 30, "steps": 30}
    assert claims.epochs_claim(at_end, slower).verdict == claims.INCONCLUSIVE

    never = {"epochs_to_best": 0.0, "best_step": 0, "steps": 30, "stopped_early": True}
    assert claims.epochs_claim(never, slower).verdict == claims.INCONCLUSIVE  # never improved: not "faster"
    assert claims.epochs_claim(converged, dict(converged)).verdict == claims.INCONCLUSIVE  # equal


def test_ablation_claim_reads_ablation_json() -> None:
    saved = {"n_docs": 24, "circuit": {"effect": 0.31}, "random_controls": {"n": 20, "p_value": 0.02,
                                                                            "effect_mean": 0.05}}
    result = claims.ablation_claim(saved)
    assert result.verdict == claims.SUPPORTED and "p = 0.020" in result.this_run and "n = 24" in result.evidence
    saved["random_controls"]["p_value"] = 0.4
    assert claims.ablation_claim(saved).verdict == claims.INCONCLUSIVE  # a non-rejection, not "not supported"
    assert claims.ablation_claim({"circuit": {"effect": 0.3}}).verdict == claims.INCONCLUSIVE


def test_claims_over_seeds_and_documents() -> None:
    """Tables of training seeds x documents: the seed variance widens the interval; rows state n and seeds."""
    rng = np.random.default_rng(0)
    docs = rng.gamma(2.0, 0.05, size=16) + 0.2
    lora_all = np.stack([docs + rng.normal(0, 0.005, 16) for _ in range(3)])
    consistent = lora_all + 0.02 + rng.normal(0, 0.003, lora_all.shape)  # better on every seed and document
    result = claims.rouge_claim(consistent, lora_all)
    assert result.verdict == claims.SUPPORTED and "n = 16 documents x 3 training seeds" in result.evidence
    # one seed much better, two worse: a single-seed interval would call it, three seeds do not
    seed_luck = lora_all + np.array([[0.06], [-0.01], [-0.01]]) + rng.normal(0, 0.003, lora_all.shape)
    assert "the interval alone reads supported" in claims.rouge_claim(seed_luck[:1], lora_all[:1]).evidence
    assert claims.rouge_claim(seed_luck, lora_all).verdict == claims.INCONCLUSIVE

    randoms = [lora_all + shift + rng.normal(0, 0.002, lora_all.shape) for shift in (-0.01, 0.0, 0.01, 0.03, 0.04)]
    placed = claims.random_control_claim(consistent, randoms, note="parameter-matched: yes")
    assert "beats 3 of 5" in placed.this_run and "mean of 5 random sets" in placed.this_run
    assert placed.verdict == claims.SUPPORTED and placed.evidence.endswith("parameter-matched: yes")  # +0.008 everywhere


def test_epochs_claim_pairs_seeds_with_a_t_interval() -> None:
    def run(epochs: float) -> dict[str, float]:
        return {"epochs_to_best": epochs, "best_step": 10, "steps": 40, "stopped_early": True}

    faster = claims.epochs_claim([run(1.0), run(1.1), run(0.9)], [run(2.0), run(2.2), run(1.9)])
    assert faster.verdict == claims.SUPPORTED and "3 training seeds" in faster.evidence
    mixed = claims.epochs_claim([run(1.0), run(2.5), run(0.9)], [run(2.0), run(1.0), run(1.9)])
    assert mixed.verdict == claims.INCONCLUSIVE
    capped = dict(run(1.0), best_step=40, stopped_early=False)
    late = claims.epochs_claim([run(1.0), capped], [run(2.0), run(2.0)])
    assert late.verdict == claims.INCONCLUSIVE and "targeted (seed #2) was still improving" in late.evidence


def test_epochs_claim_states_the_stopping_rule() -> None:
    def run(epochs: float, **config: object) -> dict[str, object]:
        return {"epochs_to_best": epochs, "best_step": 10, "steps": 40, "stopped_early": True,
                "provenance": {"config": {"patience": 2, "eval_every": 5, **config}}}

    plain = claims.epochs_claim([run(1.0)], [run(2.0)])
    assert plain.evidence.endswith("stop after 2 evaluations (every 5 steps) without any validation-loss gain")
    delta = claims.epochs_claim([run(1.0, min_delta=0.01)], [run(2.0, min_delta=0.01)])
    assert "without a validation-loss gain over 0.01 (a run that gains less per step" in delta.evidence
    assert claims.stopping_rule({"provenance": {"config": {"patience": 0}}}) == "no early stopping"
    assert claims.stopping_rule({"provenance": {"config": {"patience": 3}}}).endswith(
        "(once per epoch) without any validation-loss gain")


def test_faithfulness_claim_reads_the_paired_area_difference() -> None:
    def summary(diff: float, low: float, high: float, n_docs: int = 32) -> dict[str, object]:
        return {"n_docs": n_docs, "auc": {"circuit": {"auc": 0.3}, "circuit_attribution": {"auc": 0.3 - diff}},
                "auc_differences": {"circuit - circuit_attribution": {"difference": diff, "ci_low": low,
                                                                       "ci_high": high}},
                "against_random": {"circuit": {"beats": 4, "n_random": 5, "p_value": 0.33}}}

    better = claims.faithfulness_claim(summary(-0.2, -0.3, -0.1))  # change - cause < 0: cause recovers more
    assert better.verdict == claims.SUPPORTED and "+0.200" in better.evidence and "n = 32" in better.evidence
    few = claims.faithfulness_claim(summary(-0.2, -0.3, -0.1, n_docs=8))  # coverage not checked at 8 documents
    assert (few.verdict, few.limited_by) == (claims.INCONCLUSIVE, "8 documents")
    assert "the interval alone reads supported" in few.evidence
    assert "circuit beats 4 of 5 random sets" in better.evidence
    assert claims.faithfulness_claim(summary(0.2, 0.1, 0.3)).verdict == claims.CONTRADICTED
    assert claims.faithfulness_claim(summary(0.05, -0.1, 0.2)).verdict == claims.INCONCLUSIVE
    nan = claims.faithfulness_claim(summary(0.0, float("nan"), float("nan")))
    assert (nan.verdict, nan.limited_by) == (claims.INCONCLUSIVE, "not computed")
    assert claims.faithfulness_claim(None).verdict == claims.NOT_RUN
