"""Causal tests: ablation, activation patching, attribution and faithfulness curves, on :class:`~sumcircuit.sites.Site` s.

``config`` (the configs; no torch), ``registry`` (causal methods by
name: :func:`register_causal_method`, :func:`run_causal`), ``inputs`` (what
every method does first), ``interventions`` (read and edit activations
through the adapter table, the loss, batching), and one module per method.
Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.causal.config import (
    DIRECTIONS,
    AblationConfig,
    AttributionConfig,
    CausalError,
    Direction,
    FaithfulnessConfig,
    PatchConfig,
)
from sumcircuit.causal.registry import CAUSAL_METHODS, CausalMethod, register_causal_method, run_causal
from sumcircuit.lazy import lazy_getattr

_LAZY = {"AblationResult": "ablation", "ablate": "ablation", "AttributionResult": "attribution",
         "attribute": "attribution", "PatchResult": "patching", "patch": "patching", "GRANULARITIES": "patching",
         "Interventions": "interventions", "FaithfulnessResult": "faithfulness"}

__all__ = ["CAUSAL_METHODS", "DIRECTIONS", "AblationConfig", "AttributionConfig", "CausalError", "CausalMethod",
           "Direction", "PatchConfig", "register_causal_method", "run_causal", "AblationResult", "ablate",
           "AttributionResult", "attribute", "PatchResult", "patch", "GRANULARITIES", "Interventions",
           "FaithfulnessConfig", "FaithfulnessResult"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.causal.ablation import AblationResult, ablate
    from sumcircuit.causal.attribution import AttributionResult, attribute
    from sumcircuit.causal.faithfulness import FaithfulnessResult
    from sumcircuit.causal.interventions import Interventions
    from sumcircuit.causal.patching import GRANULARITIES, PatchResult, patch
