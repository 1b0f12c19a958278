"""The paper's claims, checked against a study folder with their evidence and uncertainty.

Each claim of arXiv 2505.17073 becomes a :class:`ClaimResult` marked
``supported`` (the 95% interval excludes the null in the paper's direction),
``contradicted`` (it excludes it in the other direction), ``inconclusive``
(otherwise: a non-rejection is not evidence against), ``not applicable``
(the claim cannot apply to this model, e.g. GPT-2 layer indices on another
architecture) or ``not run``. Paired differences are over a table of
training seeds x documents (scores paired by position and seed) with a
two-way studentized bootstrap; epochs use a t-interval over seeds (coverage
checked in ``tests/core/test_stats.py``). Every row states its n. A verdict
is never stronger than its evidence: a seed-level claim needs
:data:`MIN_SEEDS` training seeds (the interval's coverage is checked at 3, it
is 86% at 2), a zero-width interval (identical values) or one document is no
evidence, and a NaN is "not computed"; such rows are ``inconclusive`` and
say why in ``limited_by``.

Each claim is registered (:data:`CLAIMS`): a judge reads the study's
evidence (:class:`~sumcircuit.study.evidence.StudyEvidence`) and returns a
:class:`ClaimResult`. The claims table and the report list the registered
claims in order, so adding one is a function plus :func:`register_claim`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sumcircuit.registry import Registry
from sumcircuit.study.evidence import StudyEvidence, score_tables
from sumcircuit.study.verdicts import (
    CONTRADICTED,
    INCONCLUSIVE,
    MIN_RATIO_DOCS,
    MIN_SEEDS,
    NOT_APPLICABLE,
    NOT_RUN,
    PAPER_CIRCUIT_LAYERS,
    PAPER_HEAD_SHARE,
    PAPER_N_LAYERS,
    PAPER_PARAM_REDUCTION,
    SUPPORTED,
    ClaimResult,
    Table,
    ablation_claim,
    cause_vs_change_claim,
    circuit_layers_claim,
    epochs_claim,
    faithfulness_claim,
    head_share_claim,
    paired_table_diff,
    paired_verdict,
    params_claim,
    random_control_claim,
    rouge_claim,
    stopping_rule,
)

__all__ = [  # the verdict rules are re-exported: claims.rouge_claim(...) reads as before
    "CLAIMS", "Claim", "claim_rows", "evaluate_claims", "register_claim", "CONTRADICTED", "INCONCLUSIVE",
    "MIN_RATIO_DOCS", "MIN_SEEDS", "NOT_APPLICABLE", "NOT_RUN", "PAPER_CIRCUIT_LAYERS", "PAPER_HEAD_SHARE", "PAPER_N_LAYERS",
    "PAPER_PARAM_REDUCTION", "SUPPORTED", "ablation_claim", "cause_vs_change_claim", "circuit_layers_claim",
    "ClaimResult", "epochs_claim", "faithfulness_claim", "head_share_claim", "paired_table_diff",
    "paired_verdict", "params_claim", "random_control_claim", "rouge_claim", "stopping_rule", "Table"
]

# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Claim:
    """A registered claim: its name and the judge that reads a study's evidence.

    Args:
        name: a short name (``rouge``, ``epochs``).
        judge: ``fn(evidence) -> ClaimResult``.
    """

    name: str
    judge: Callable[[StudyEvidence], ClaimResult]


CLAIMS: Registry[Claim] = Registry("claim")


def register_claim(name: str, judge: Callable[[StudyEvidence], ClaimResult], *, replace: bool = False) -> Claim:
    """Add a row to every study's claims table (and report).

    Args:
        name: the claim's short name.
        judge: reads the study's evidence and returns the row.
        replace: replace a claim of that name.

    Returns:
        The registered :class:`Claim`.

    Example:
        >>> register_claim("zero-shot", lambda ev: ClaimResult("...", "-", "-", INCONCLUSIVE, "..."))  # doctest: +SKIP
    """
    return CLAIMS.register(name, Claim(name, judge), replace=replace)


def _paired_runs(ev: StudyEvidence) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]], list[int]]:
    targeted, lora = ev.summaries("targeted"), ev.summaries("lora_all")
    return targeted, lora, sorted(set(targeted) & set(lora))


def _targeted_params(ev: StudyEvidence) -> int | None:
    targeted, _, paired = _paired_runs(ev)
    return targeted[paired[0]].get("trainable_params") if paired else None


def _judge_head_share(ev: StudyEvidence) -> ClaimResult:
    summary = ev.analysis()
    share_ci = summary.get("share_heads_entropy_decreased_ci") or [None, None]
    return head_share_claim(summary.get("share_heads_entropy_decreased"), share_ci[0], share_ci[1],
                            summary.get("n_docs"),
                            (summary.get("n_layers") or 0) * (summary.get("n_heads") or 0) or None)


def _judge_circuit_layers(ev: StudyEvidence) -> ClaimResult:
    return circuit_layers_claim(ev.circuit().get("layers"), ev.analysis().get("n_layers"), ev.model_type())


def _judge_rouge(ev: StudyEvidence) -> ClaimResult:
    tables = score_tables(ev.scores("targeted"), ev.scores("lora_all"))
    return rouge_claim(*(tables or (None, None)))


def _judge_params(ev: StudyEvidence) -> ClaimResult:
    _, lora, paired = _paired_runs(ev)
    return params_claim(_targeted_params(ev), lora[paired[0]].get("trainable_params") if paired else None)


def _judge_epochs(ev: StudyEvidence) -> ClaimResult:
    targeted, lora, paired = _paired_runs(ev)
    return epochs_claim([targeted[s] for s in paired], [lora[s] for s in paired])


def _judge_random_control(ev: StudyEvidence) -> ClaimResult:
    randoms = score_tables(ev.scores("targeted"), *[ev.scores(m) for m in ev.layout.random_methods()])
    return random_control_claim(randoms[0] if randoms else None, randoms[1:] if randoms else [],
                                ev.random_note(_targeted_params(ev)))


def _judge_ablation(ev: StudyEvidence) -> ClaimResult:
    return ablation_claim(ev.ablation())


def _judge_cause_vs_change(ev: StudyEvidence) -> ClaimResult:
    cause = score_tables(ev.scores("targeted_attribution"), ev.scores("targeted"))
    return cause_vs_change_claim(ev.circuit_picks(ev.layout.circuit_file),
                                 ev.circuit_picks(ev.layout.attribution_circuit_file), *(cause or (None, None)))


def _judge_faithfulness(ev: StudyEvidence) -> ClaimResult:
    return faithfulness_claim(ev.faithfulness())


_CONTROL_CLAIMS = ("The circuit's change is specific to summarization (survives the control task)",
                   "Attention becomes more focused by summarization than by the control task")


def _control_judge(which: int) -> Callable[[StudyEvidence], ClaimResult]:
    """The control-task claims (arm ``control``): the KL circuit's change, then the entropy shift."""
    def judge(ev: StudyEvidence) -> ClaimResult:
        from sumcircuit.generalization.control import control_claims

        headline = ev.control_change
        if isinstance(headline, str):
            return ClaimResult(_CONTROL_CLAIMS[which], "not tested in the paper", "-", NOT_RUN, headline)
        row = control_claims("", headline)[which]
        return ClaimResult(_CONTROL_CLAIMS[which], row.paper, row.this_run, row.verdict, row.evidence, row.limited_by)
    return judge


for _name, _judge in (("head_share", _judge_head_share), ("circuit_layers", _judge_circuit_layers),
                      ("rouge", _judge_rouge), ("params", _judge_params), ("epochs", _judge_epochs),
                      ("random_control", _judge_random_control), ("ablation", _judge_ablation),
                      ("cause_vs_change", _judge_cause_vs_change), ("faithfulness", _judge_faithfulness),
                      ("control_circuit", _control_judge(0)), ("control_entropy", _control_judge(1))):
    register_claim(_name, _judge)


def evaluate_claims(run: str | Path) -> list[ClaimResult]:
    """Every registered claim judged on the study folder ``run``."""
    evidence = StudyEvidence(Path(run))
    return [claim.judge(evidence) for _, claim in CLAIMS.items()]


def claim_rows(run: str | Path) -> list[dict[str, Any]]:
    """The claims table of a study folder as rows (what the report shows)."""
    return [dict(vars(c)) for c in evaluate_claims(run)]
