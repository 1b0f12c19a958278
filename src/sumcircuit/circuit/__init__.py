"""Circuits: rank layers (and heads) by a registered score and measure how stable the choice is.

``config`` (:class:`CircuitConfig`, the score registry; no numpy), ``scores``
(the built-in change scores), ``select`` (:func:`select_circuit` from an
analysis or an attribution) and ``result`` (:class:`Circuit`, strict
:func:`read_circuit`). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.circuit.config import (
    CIRCUIT_SCORES,
    CircuitConfig,
    CircuitError,
    CircuitScore,
    register_circuit_score,
)
from sumcircuit.lazy import lazy_getattr

_LAZY = {"Circuit": "result", "read_circuit": "result", "circuit_file": "result", "select_circuit": "select",
         "read_analysis": "select", "layer_scores": "scores", "head_scores": "scores", "top_k": "scores",
         "normalized_ranks": "scores"}

__all__ = ["CIRCUIT_SCORES", "CircuitConfig", "CircuitError", "CircuitScore", "register_circuit_score", "Circuit",
           "read_circuit", "circuit_file", "select_circuit", "read_analysis", "layer_scores", "head_scores", "top_k",
           "normalized_ranks"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.circuit.result import Circuit, circuit_file, read_circuit
    from sumcircuit.circuit.scores import head_scores, layer_scores, normalized_ranks, top_k
    from sumcircuit.circuit.select import read_analysis, select_circuit
