"""The study: the paper's pipeline as a declarative graph of resumable stages, its claims and its report.

``presets`` (:class:`StudyPreset`, registered by name; no torch), ``config``
(:class:`StudyConfig`), ``arms`` (the fine-tuning arms, registered by name),
``graph`` (:class:`Stage`, keys, the runner), ``layout`` (stage folders),
``run`` (:func:`run_study`), ``evidence`` (reading a study folder),
``claims`` (verdicts, registered by name), ``report`` (HTML) and ``result``
(:class:`StudyResult`). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.lazy import lazy_getattr
from sumcircuit.study.arms import ARMS, Arm, StudyContext, Variant, random_control_sets, register_arm
from sumcircuit.study.config import StudyConfig
from sumcircuit.study.layout import StudyLayout
from sumcircuit.study.presets import STUDY_PRESETS, StudyPreset, register_study_preset

_LAZY = {"Stage": "graph", "StageRunner": "graph", "stage_key": "graph", "run_study": "run",
         "StudyGraph": "run", "check_disjoint_test_data": "run", "StudyResult": "result", "CLAIMS": "claims",
         "Claim": "claims", "ClaimResult": "claims", "register_claim": "claims", "evaluate_claims": "claims",
         "claim_rows": "claims", "build_report": "report", "StudyEvidence": "evidence"}

__all__ = ["ARMS", "STUDY_PRESETS", "Arm", "StudyConfig", "StudyContext", "StudyLayout", "StudyPreset", "Variant",
           "random_control_sets", "register_arm", "register_study_preset", "Stage", "StageRunner", "stage_key",
           "run_study", "StudyGraph", "check_disjoint_test_data", "StudyResult", "CLAIMS", "Claim", "ClaimResult",
           "register_claim", "evaluate_claims", "claim_rows", "build_report", "StudyEvidence"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.study.claims import CLAIMS, Claim, ClaimResult, claim_rows, evaluate_claims, register_claim
    from sumcircuit.study.evidence import StudyEvidence
    from sumcircuit.study.graph import Stage, StageRunner, stage_key
    from sumcircuit.study.report import build_report
    from sumcircuit.study.result import StudyResult
    from sumcircuit.study.run import StudyGraph, check_disjoint_test_data, run_study
