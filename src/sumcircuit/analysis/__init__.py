"""What changed inside the model: attention entropy/KL per head, activations per layer and neuron.

``config`` (:class:`AnalysisConfig`; no torch), ``state`` (the mergeable sums
and how a batch adds to them), ``weights`` (weight change per module),
``summarize`` (tables, intervals, headline), ``result`` (:class:`AnalysisResult`)
and ``run`` (:func:`analyze`). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.analysis.config import AnalysisConfig, AnalysisError, IncompatibleModelsError, KernelMode
from sumcircuit.lazy import lazy_getattr

_LAZY = {"AnalysisResult": "result", "HeadRow": "result", "LayerRow": "result", "NeuronRow": "result",
         "HEAD_COLUMNS": "result", "LAYER_COLUMNS": "result", "NEURON_COLUMNS": "result", "HEAD_STATS": "result",
         "AnalysisState": "state", "STATE_FILE": "state", "ROW_STATS": "state", "load_state": "state",
         "save_state": "state", "check_compatible": "state", "check_same_tokenizer": "state",
         "relative_weight_change": "weights", "weight_changes": "weights", "finalize": "summarize",
         "DEFINITIONS": "summarize", "analyze": "run", "analyze_models": "run", "analyze_to_folder": "run"}

__all__ = ["AnalysisConfig", "AnalysisError", "IncompatibleModelsError", "KernelMode", "AnalysisResult", "HeadRow",
           "LayerRow", "NeuronRow", "HEAD_COLUMNS", "LAYER_COLUMNS", "NEURON_COLUMNS", "HEAD_STATS", "AnalysisState",
           "STATE_FILE", "ROW_STATS", "load_state", "save_state", "check_compatible", "check_same_tokenizer",
           "relative_weight_change", "weight_changes", "finalize", "DEFINITIONS", "analyze", "analyze_models",
           "analyze_to_folder"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.analysis.result import (
        HEAD_COLUMNS,
        HEAD_STATS,
        LAYER_COLUMNS,
        NEURON_COLUMNS,
        AnalysisResult,
        HeadRow,
        LayerRow,
        NeuronRow,
    )
    from sumcircuit.analysis.run import analyze, analyze_models, analyze_to_folder
    from sumcircuit.analysis.state import (
        ROW_STATS,
        STATE_FILE,
        AnalysisState,
        check_compatible,
        check_same_tokenizer,
        load_state,
        save_state,
    )
    from sumcircuit.analysis.summarize import DEFINITIONS, finalize
    from sumcircuit.analysis.weights import relative_weight_change, weight_changes
