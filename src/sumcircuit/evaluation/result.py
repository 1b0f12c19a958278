"""What ``evaluate`` returns and writes: ``rouge.json`` and one record per document (``predictions.jsonl``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from sumcircuit.artifacts import atomic_write_json, atomic_write_text, read_json, to_json_line
from sumcircuit.evaluation.config import ROUGE_TYPES, EvaluationError
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.results import Result

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
ROUGE_FILE = "rouge.json"


class Prediction(TypedDict):
    """One line of ``predictions.jsonl``."""

    index: int
    doc_id: str
    prediction: str
    references: list[str]
    scores: dict[str, float]
    stop_reason: str
    new_tokens: int
    prompt_tokens: int
    document_truncated: bool
    generation_s: float
    run_id: str


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records written so far; a line cut by a kill is dropped (and the file repaired)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise EvaluationError(f"{path}:{i + 1}: corrupt line; delete the file or start over with "
                                      "resume=False (--overwrite)") from None
            logger.warning("%s: dropping a partial last line from an interrupted run", path)
            atomic_write_text(path, "".join(ln + "\n" for ln in lines[:-1]))
    return records


@dataclass(repr=False)
class EvaluationResult(Result):
    """ROUGE of generated summaries: ``summary`` (rouge.json) and one record per document.

    Example:
        >>> result = sc.evaluate("runs/full/final", data, out="runs/full/eval")  # doctest: +SKIP
        >>> result.rouge("rouge1")  # doctest: +SKIP
    """

    kind: ClassVar[str] = "evaluation"
    main_table: ClassVar[str] = "predictions"
    files: ClassVar[tuple[str, ...]] = (ROUGE_FILE, PREDICTIONS_FILE)
    summary: dict[str, Any]
    predictions: list[Prediction] = field(default_factory=list)

    def describe(self) -> str:
        scores = ", ".join(f"{k} {self.summary[k]['f1']:.4f}" for k in ROUGE_TYPES if k in self.summary)
        return f"ROUGE F1 over {self.summary.get('n')} documents: {scores}"

    def tables(self) -> dict[str, list[Any]]:
        rows = [{"index": r["index"], "doc_id": r["doc_id"], "prediction": r["prediction"],
                 "references": r["references"], **r["scores"], "stop_reason": r["stop_reason"],
                 "new_tokens": r["new_tokens"]} for r in self.predictions]
        return {"predictions": rows}

    def rouge(self, metric: str = "rouge1") -> float:
        """Mean F1 of one ROUGE variant."""
        return float(self.summary[metric]["f1"])

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``predictions.jsonl`` and ``rouge.json``."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / PREDICTIONS_FILE, "".join(to_json_line(r) for r in self.predictions))
        atomic_write_json(folder / ROUGE_FILE, self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> EvaluationResult:
        """An evaluation folder back as a result."""
        p = require_complete(folder)
        records = sorted(read_predictions(p / PREDICTIONS_FILE), key=lambda r: int(r["index"]))
        return cls(read_json(p / ROUGE_FILE), records)  # type: ignore[arg-type]
