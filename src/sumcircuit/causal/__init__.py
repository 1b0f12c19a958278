"""Causal tests: ablation, activation patching and attribution, all on :class:`~sumcircuit.sites.Site` s.

``interventions`` reads and edits activations through the adapter table and
defines the loss; ``ablation``, ``patching`` and ``attribution`` build on it.
"""

from sumcircuit.causal.ablation import AblationConfig, AblationResult, ablate
from sumcircuit.causal.attribution import AttributionConfig, AttributionResult, attribute
from sumcircuit.causal.interventions import CausalError, Interventions
from sumcircuit.causal.patching import PatchConfig, PatchResult, patch
from sumcircuit.options import DIRECTIONS, GRANULARITIES

__all__ = ["DIRECTIONS", "GRANULARITIES", "AblationConfig", "AblationResult", "AttributionConfig",
           "AttributionResult", "CausalError", "Interventions", "PatchConfig", "PatchResult", "ablate", "attribute",
           "patch"]
