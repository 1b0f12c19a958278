"""Evaluation: generate summaries and score them with the standard ROUGE.

``config`` (:class:`GenerationConfig`, :class:`EvaluationConfig`; no torch),
``rouge`` (scores, sentence splitting, intervals), ``generation``,
``result`` (:class:`EvaluationResult`) and ``run`` (:func:`evaluate`).
Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.evaluation.config import ROUGE_TYPES, EvaluationConfig, EvaluationError, GenerationConfig
from sumcircuit.lazy import lazy_getattr

_LAZY = {"EvaluationResult": "result", "PREDICTIONS_FILE": "result", "ROUGE_FILE": "result",
         "evaluate": "run", "rouge_scores": "rouge", "aggregate": "rouge", "split_sentences": "rouge",
         "sentence_lines": "rouge", "generate_summaries": "generation", "eos_token_ids": "generation",
         "cut_at_stop": "generation", "Generated": "generation"}

__all__ = ["ROUGE_TYPES", "EvaluationConfig", "EvaluationError", "GenerationConfig", "EvaluationResult",
           "PREDICTIONS_FILE", "ROUGE_FILE", "evaluate", "rouge_scores", "aggregate", "split_sentences",
           "sentence_lines", "generate_summaries", "eos_token_ids", "cut_at_stop", "Generated"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.evaluation.generation import Generated, cut_at_stop, eos_token_ids, generate_summaries
    from sumcircuit.evaluation.result import PREDICTIONS_FILE, ROUGE_FILE, EvaluationResult
    from sumcircuit.evaluation.rouge import aggregate, rouge_scores, sentence_lines, split_sentences
    from sumcircuit.evaluation.run import evaluate
