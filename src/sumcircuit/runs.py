"""The run-folder schema: what each command's output folder holds, and reading any of them back.

One place names the files of every output kind and the stage folders of a
study, so ``reproduce`` (which writes them), ``report`` (which reads them)
and :func:`load_run` never disagree about a path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sumcircuit.artifacts import read_csv, read_json, read_jsonl
from sumcircuit.errors import SumcircuitError
from sumcircuit.outputs import require_complete
from sumcircuit.results import Result

# output kind -> the file whose presence marks a finished folder of that kind (checked in this order)
MARKERS: dict[str, str] = {
    "study": "reproduce.json",
    "analysis": "heads.csv",
    "finetune": "train_summary.json",
    "evaluation": "rouge.json",
    "ablation": "ablation.json",
    "patching": "patching.json",
    "attribution": "attribution.json",
    "circuit": "circuit.json",
}


class RunError(SumcircuitError):
    """A folder that is not (or not yet) a finished output of sumcircuit."""


@dataclass(frozen=True)
class StudyLayout:
    """Stage folders of a ``reproduce`` run (``root/<stage>/``).

    Every trained model is one stage per training seed, ``<method>_s<seed>``
    (``full_s1``, ``lora_all_s2``, ``random3_s1`` for the third random layer
    set); ``zeroshot`` is the untrained model.
    """

    root: Path
    METHODS: ClassVar[tuple[str, ...]] = ("full", "lora_all", "targeted", "targeted_attribution")
    ZERO_SHOT: ClassVar[str] = "zeroshot"

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def manifest(self) -> Path:
        return self.root / "reproduce.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def circuit_dir(self) -> Path:
        return self.root / "circuit"

    @property
    def circuit_file(self) -> Path:
        return self.circuit_dir / "circuit.json"

    @property
    def attribution(self) -> Path:
        return self.root / "attribution"

    @property
    def attribution_circuit_file(self) -> Path:
        """The circuit chosen by cause (attribution), beside the KL circuit of ``circuit_file``."""
        return self.root / "circuit_attribution" / "circuit.json"

    @property
    def ablate(self) -> Path:
        return self.root / "ablate"

    @property
    def patch(self) -> Path:
        return self.root / "patch"

    def final(self, run: str) -> Path:
        """The trained model of a fine-tuning stage (a model spec)."""
        return self.root / run / "final"

    def eval_dir(self, run: str) -> Path:
        return self.root / run / "eval"

    def train_summary(self, run: str) -> Path:
        return self.root / run / "train_summary.json"

    @staticmethod
    def run_name(method: str, seed: int) -> str:
        return f"{method}_s{seed}"

    @staticmethod
    def random_method(index: int) -> str:
        """The k-th random layer set (1-based) as a method name: ``random3``."""
        return f"random{index}"

    def runs_of(self, method: str) -> dict[int, str]:
        """Training seed -> stage name of every run of ``method`` in this folder."""
        if not self.root.is_dir():
            return {}
        pattern = re.compile(rf"{re.escape(method)}_s(\d+)")
        found = {int(m.group(1)): p.name for p in self.root.iterdir() if p.is_dir() and (m := pattern.fullmatch(p.name))}
        return dict(sorted(found.items()))

    def random_methods(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = {m.group(1) for p in self.root.iterdir() if (m := re.fullmatch(r"(random\d+)_s\d+", p.name))}
        return sorted(names, key=lambda n: int(n[len("random"):]))

    def model_runs(self) -> list[str]:
        """Every model this study evaluates: zero-shot, then each method's seeds, then the random sets'."""
        runs = [self.ZERO_SHOT] if (self.root / self.ZERO_SHOT).is_dir() else []
        for method in (*self.METHODS, *self.random_methods()):
            runs += list(self.runs_of(method).values())
        return runs


def detect_kind(path: str | Path) -> str:
    """Which command wrote ``path`` (a folder, or a circuit.json file)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        data = read_json(p)
        if isinstance(data, dict) and "layers" in data:
            return "circuit"
    if not p.is_dir():
        raise RunError(f"{p}: no such output folder")
    require_complete(p)
    for kind, marker in MARKERS.items():
        if (p / marker).is_file():
            return kind
    raise RunError(f"{p}: not a finished sumcircuit output (none of {', '.join(MARKERS.values())} found)")


@dataclass
class StudyResult(Result):
    """A ``reproduce`` run: the manifest, the claims table and each stage's result on demand."""

    kind: ClassVar[str] = "study"
    main_table: ClassVar[str] = "claims"
    summary: dict[str, Any]
    folder: Path
    claims: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.folder)

    def stage(self, name: str) -> Result:
        """One stage's result, read from its folder (``"analysis"``, ``"full"``, ``"targeted/eval"``...)."""
        return load_run(self.folder / name)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        timings = self.summary.get("wall_time_s", {})
        return {"claims": self.claims,
                "stages": [{"stage": k, "key": v, "wall_time_s": timings.get(k)}
                           for k, v in self.summary.get("stages", {}).items()]}

    def save(self, out: str | Path) -> Path:
        if Path(out).resolve() != self.folder.resolve():
            raise RunError("a study lives in its run folder; copy the folder to move it")
        return self.folder


def _tensors(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _doc_ids(path: Path) -> list[str]:
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(json.loads((fh.metadata() or {}).get("doc_ids", "[]")))


def load_run(path: str | Path) -> Result:
    """Read any output folder (or circuit.json) back into the result object the API returns."""
    p = Path(path)
    kind = detect_kind(p)
    if kind == "circuit":
        from sumcircuit.circuit import read_circuit

        return read_circuit(p if p.is_file() else p / "circuit.json")
    if kind == "analysis":
        from sumcircuit.analysis import AnalysisResult

        return AnalysisResult(read_csv(p / "heads.csv"), read_csv(p / "layers.csv"), read_csv(p / "neurons.csv"),
                              read_json(p / "summary.json"), _tensors(p / "stats.safetensors"),
                              _tensors(p / "per_doc.safetensors"), None, _doc_ids(p / "per_doc.safetensors"))
    if kind == "finetune":
        from sumcircuit.training import FinetuneResult

        return FinetuneResult(read_json(p / "train_summary.json"), read_jsonl(p / "train_log.jsonl"),
                              [dict(r) for r in read_csv(p / "tracking.csv")], p)
    if kind == "evaluation":
        from sumcircuit.evaluation import EvaluationResult

        return EvaluationResult(read_json(p / "rouge.json"),
                                sorted(read_jsonl(p / "predictions.jsonl"), key=lambda r: int(r["index"])))
    if kind == "ablation":
        from sumcircuit.causal import AblationResult
        from sumcircuit.sites import parse_sites

        rows = read_csv(p / "ablation.csv")
        return AblationResult(read_json(p / "ablation.json"), rows, read_csv(p / "ablation_per_doc.csv"),
                              [parse_sites(r["members"].split()) for r in rows])
    if kind == "patching":
        from sumcircuit.causal import PatchResult

        return PatchResult(read_json(p / "patching.json"), read_csv(p / "patching.csv"),
                           read_csv(p / "patching_per_doc.csv"))
    if kind == "attribution":
        from sumcircuit.causal.attribution import AttributionResult

        return AttributionResult.read(p)
    from sumcircuit.report import claim_rows

    return StudyResult(read_json(p / "reproduce.json"), p, claim_rows(p))
