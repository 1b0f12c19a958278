"""The folders of a study (``RUN/<stage>/``): one place names every stage folder and file, for writer and readers.

Every trained model is one stage per training seed, ``<arm>_s<seed>``
(``full_s1``, ``lora_all_s2``, ``random3_s1`` for the third random layer
set) with its evaluation in ``<arm>_s<seed>/eval``; ``zeroshot`` is the
untrained model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class StudyLayout:
    """Stage folders of a ``reproduce`` run (``root/<stage>/``)."""

    root: Path
    ZERO_SHOT: ClassVar[str] = "zeroshot"

    def stage(self, name: str) -> Path:
        """The folder of stage ``name``."""
        return self.root / name

    @property
    def manifest(self) -> Path:
        """``reproduce.json``: the study's config, stage keys, timings and provenance."""
        return self.root / "reproduce.json"

    @property
    def report(self) -> Path:
        """``report.html``."""
        return self.root / "report.html"

    @property
    def analysis(self) -> Path:
        """The differential analysis (base vs the first seed's full fine-tune)."""
        return self.root / "analysis"

    @property
    def circuit_dir(self) -> Path:
        """The stage folder of the KL circuit."""
        return self.root / "circuit"

    @property
    def circuit_file(self) -> Path:
        """The circuit chosen by change (KL), the paper's way."""
        return self.circuit_dir / "circuit.json"

    @property
    def attribution(self) -> Path:
        """Attribution patching (base vs the first seed's full fine-tune)."""
        return self.root / "attribution"

    @property
    def attribution_circuit_file(self) -> Path:
        """The circuit chosen by cause (attribution), beside the KL circuit of ``circuit_file``."""
        return self.root / "circuit_attribution" / "circuit.json"

    @property
    def ablate(self) -> Path:
        """The ablation of the KL circuit against random sets."""
        return self.root / "ablate"

    @property
    def patch(self) -> Path:
        """Activation patching per layer."""
        return self.root / "patch"

    @property
    def faithfulness(self) -> Path:
        """Faithfulness curves of both circuits against random layer sets."""
        return self.root / "faithfulness"

    def analysis_of(self, arm: str) -> Path:
        """The analysis of an analysed arm's first-seed model against the base (``analysis_control``)."""
        return self.root / f"analysis_{arm}"

    def final(self, run: str) -> Path:
        """The trained model of a fine-tuning stage (a model spec)."""
        return self.root / run / "final"

    def eval_dir(self, run: str) -> Path:
        """The evaluation of a model stage."""
        return self.root / run / "eval"

    def train_summary(self, run: str) -> Path:
        """``train_summary.json`` of a fine-tuning stage."""
        return self.root / run / "train_summary.json"

    @staticmethod
    def run_name(arm: str, seed: int) -> str:
        """The stage of ``arm`` trained with ``seed``: ``lora_all_s2``."""
        return f"{arm}_s{seed}"

    @staticmethod
    def random_method(index: int) -> str:
        """The k-th random layer set (1-based) as an arm variant: ``random3``."""
        return f"random{index}"

    def runs_of(self, arm: str) -> dict[int, str]:
        """Training seed -> stage name of every run of ``arm`` in this folder."""
        if not self.root.is_dir():
            return {}
        pattern = re.compile(rf"{re.escape(arm)}_s(\d+)")
        found = {int(m.group(1)): p.name for p in self.root.iterdir() if p.is_dir() and (m := pattern.fullmatch(p.name))}
        return dict(sorted(found.items()))

    def random_methods(self) -> list[str]:
        """The random layer sets present (``random1``, ``random2``, ...)."""
        if not self.root.is_dir():
            return []
        names = {m.group(1) for p in self.root.iterdir() if (m := re.fullmatch(r"(random\d+)_s\d+", p.name))}
        return sorted(names, key=lambda n: int(n[len("random"):]))

    def arm_names(self) -> list[str]:
        """Arms with stage folders here, registered arms first in registry order, random sets last."""
        from sumcircuit.study.arms import ARMS

        found = {m.group(1) for p in self.root.iterdir() if p.is_dir() and (m := re.fullmatch(r"(.+)_s\d+", p.name))} \
            if self.root.is_dir() else set()
        ordered = [a for a in ARMS.names() if a in found]
        rest = sorted(a for a in found if a not in ordered and not re.fullmatch(r"random\d+", a))
        return ordered + rest + self.random_methods()

    def model_runs(self) -> list[str]:
        """Every model this study evaluates: zero-shot, then each arm's seeds, then the random sets'."""
        runs = [self.ZERO_SHOT] if (self.root / self.ZERO_SHOT).is_dir() else []
        for arm in self.arm_names():
            runs += list(self.runs_of(arm).values())
        return runs
