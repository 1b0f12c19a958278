"""``sumcircuit data``: what the pipeline will eat, before hours are spent on it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from sumcircuit.data.config import DataConfig
from sumcircuit.data.encoding import encode_all
from sumcircuit.data.records import load_examples


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1]}


def preview(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> dict[str, Any]:
    """What the pipeline will eat: counts, fields, lengths, truncation, invalid records."""
    cfg_all = cfg.replace(skip_invalid=True)
    result = load_examples(cfg_all)
    examples = result.examples
    report: dict[str, Any] = {
        **result.source.provenance(), "records": len(examples) + len(result.invalid),
        "valid": len(examples), "invalid": len(result.invalid),
        "invalid_examples": [str(e) for e in result.invalid[:10]],
        "references_per_example": _stats([len(e.references) for e in examples]),
        "document_chars": _stats([len(e.text) for e in examples]),
        "summary_chars": _stats([len(e.summary) for e in examples]),
    }
    if tokenizer is not None:
        encoded = encode_all(tokenizer, examples, cfg)
        report.update({
            "template": cfg.template, "max_tokens": cfg.max_tokens,
            "document_tokens": _stats([e.document_tokens for e in encoded]),
            "summary_tokens": _stats([e.summary_span[1] - e.summary_span[0] for e in encoded]),
            "total_tokens": _stats([len(e.input_ids) for e in encoded]),
            "truncated_documents": sum(e.truncated for e in encoded),
            "truncated_summaries": sum(e.summary_truncated for e in encoded),
        })
    return report
