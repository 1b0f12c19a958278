"""What a study folder holds, read as evidence: only files of finished stages, paired per document and seed.

Every reader here returns "nothing" for a stage that did not finish
(``INCOMPLETE.json`` in its folder), so the claims and the report of a
partial study show what is there and say what is missing, never mixing a
half-written file into a number.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sumcircuit.artifacts import read_csv, read_jsonl
from sumcircuit.errors import SumcircuitError
from sumcircuit.outputs import is_complete
from sumcircuit.study.layout import StudyLayout

SeedScores = dict[int, dict[int, float]]  # training seed -> position in the evaluation set -> ROUGE-1


def finished(path: Path) -> bool:
    """A file is evidence only if the run that writes its folder finished (no INCOMPLETE.json there).

    A study building its own report reads its own root (``reproduce.json``) while it still holds it.
    """
    return path.is_file() and is_complete(path.parent)


class EvidenceError(SumcircuitError):
    """A file of a finished stage that cannot be read as what that stage writes (damaged, or edited by hand)."""


def read_json_if_finished(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file, or None when its stage did not finish (or the file is missing).

    A damaged file is a one-line error naming it: evidence is never guessed around.
    """
    if not finished(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # garbage, empty, nested past any sense, not UTF-8
        raise EvidenceError(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:120]}); rerun the command "
                            "that wrote it") from None
    if not isinstance(data, dict):
        raise EvidenceError(f"{path}: expected a JSON object, found {type(data).__name__}; rerun the command "
                            "that wrote it")
    return data


def _number(value: str | None) -> Any:
    if value is None or value == "":
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def read_csv_if_finished(path: Path, columns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The CSV rows with numbers as numbers, or [] when the stage did not finish; ``columns`` must be there."""
    if not finished(path):
        return []
    try:
        rows = [{k: _number(v) for k, v in row.items()} for row in read_csv(path)]
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvidenceError(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise EvidenceError(f"{path}: column(s) {', '.join(missing)} missing; rerun the command that wrote it")
    return rows


def per_example_rouge1(eval_dir: Path) -> dict[int, float]:
    """Position in the evaluation set -> ROUGE-1 F1 from predictions.jsonl, for paired comparisons.

    Keyed by position, not by document id: ids may repeat in a data set, and
    pairing by id would silently drop (or mismatch) those documents.
    """
    out: dict[int, float] = {}
    if not finished(eval_dir / "predictions.jsonl"):
        return out
    for row in read_jsonl(eval_dir / "predictions.jsonl"):
        scores = row.get("scores", {})
        value = scores.get("rouge1")
        out[int(row["index"])] = float(value["f1"] if isinstance(value, Mapping) else value)
    return out


def score_tables(*methods: SeedScores) -> list[np.ndarray] | None:
    """Seeds x documents tables of several methods over the seeds and documents they all have (paired)."""
    seeds = sorted(set.intersection(*[set(m) for m in methods])) if methods else []
    if not seeds:
        return None
    docs = sorted(set.intersection(*[set(m[s]) for m in methods for s in seeds]))
    if len(docs) < 2:
        return None
    return [np.array([[m[s][d] for d in docs] for s in seeds]) for m in methods]


@dataclass(frozen=True)
class StudyEvidence:
    """The finished outputs of one study folder, as the claims and the report read them."""

    root: Path

    @property
    def layout(self) -> StudyLayout:
        """The study's stage folders."""
        return StudyLayout(self.root)

    def manifest(self) -> dict[str, Any]:
        """``reproduce.json`` (empty while the study has not finished)."""
        return read_json_if_finished(self.layout.manifest) or {}

    def analysis(self) -> dict[str, Any]:
        """The analysis's ``summary.json``."""
        return read_json_if_finished(self.layout.analysis / "summary.json") or {}

    def circuit(self) -> dict[str, Any]:
        """The KL circuit's ``circuit.json``."""
        return read_json_if_finished(self.layout.circuit_file) or {}

    def circuit_picks(self, path: Path) -> tuple[list[int], list[str]] | None:
        """(layers, head names) of a circuit file, or None when that stage has not run."""
        from sumcircuit.circuit.result import read_circuit

        if not finished(path):
            return None
        chosen = read_circuit(path)
        return chosen.layers, [h.name for h in chosen.heads]

    def model_type(self) -> str | None:
        """The analysed model's ``model_type`` (from the analysis's provenance)."""
        models = (self.analysis().get("provenance") or {}).get("models") or [{}]
        return models[0].get("model_type") if isinstance(models[0], dict) else None

    def scores(self, arm: str) -> SeedScores:
        """Per-document ROUGE-1 of every finished, evaluated seed of ``arm``."""
        layout = self.layout
        return {seed: scores for seed, name in layout.runs_of(arm).items()
                if (scores := per_example_rouge1(layout.eval_dir(name)))}

    def summaries(self, arm: str) -> dict[int, dict[str, Any]]:
        """``train_summary.json`` of every finished seed of ``arm``."""
        layout = self.layout
        return {seed: summary for seed, name in layout.runs_of(arm).items()
                if (summary := read_json_if_finished(layout.train_summary(name)))}

    def ablation(self) -> dict[str, Any] | None:
        """``ablation.json`` of the ablate stage."""
        result: dict[str, Any] | None = read_json_if_finished(self.layout.ablate / "ablation.json")
        return result

    @functools.cached_property
    def control_change(self) -> dict[str, Any] | str:
        """The change specific to summarization (KL circuit, entropy shift) against the control task, or why there
        is none; computed once per evidence object, which both control claims share."""
        from sumcircuit.generalization.control import specific_change
        from sumcircuit.generalization.profile import read_per_doc

        folder = self.layout.analysis_of("control")
        circuit = self.circuit().get("layers")
        if not (finished(folder / "per_doc.safetensors") and finished(self.layout.analysis / "per_doc.safetensors")
                and circuit):
            return "the control task (arm `control`, e.g. preset generalize-cpu) did not run"
        (summary, ids), (control, control_ids) = read_per_doc(self.layout.analysis), read_per_doc(folder)
        if ids != control_ids:
            return f"{folder} is not on the analysis's documents; rerun both stages"
        return specific_change(summary, control, circuit, n_bootstrap=2000, seed=0, ci_level=0.95)[2]

    def faithfulness(self) -> dict[str, Any] | None:
        """``faithfulness.json`` of the faithfulness stage."""
        return read_json_if_finished(self.layout.faithfulness / "faithfulness.json")

    def random_note(self, targeted_params: int | None) -> str:
        """Where the random sets were drawn, and whether they train as many parameters as the circuit."""
        controls = self.manifest().get("random_controls") or {}
        params = sorted({int(s["trainable_params"]) for m in self.layout.random_methods()
                         for s in self.summaries(m).values() if s.get("trainable_params") is not None})
        parts = []
        if controls.get("excluded") is not None:
            where = "outside" if controls.get("outside_circuits") else "NOT outside (the model has too few layers)"
            parts.append(f"random sets drawn {where} the circuits' layers {controls['excluded']}")
        if params and targeted_params:
            matched = params == [targeted_params]
            parts.append(f"parameter-matched: {'yes' if matched else 'no'} ({', '.join(f'{p:,}' for p in params)} "
                         f"vs {targeted_params:,} trainable)")
        return "; ".join(parts)
