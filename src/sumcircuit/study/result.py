"""What ``run_study`` returns: the manifest, the claims table, and each stage's result on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sumcircuit.artifacts import read_json
from sumcircuit.outputs import require_complete
from sumcircuit.results import Result, RunError, load_run
from sumcircuit.study.layout import StudyLayout


@dataclass(repr=False)
class StudyResult(Result):
    """A ``reproduce`` run: the manifest, the claims table and each stage's result on demand.

    Example:
        >>> study = sc.load_run("runs/demo")  # doctest: +SKIP
        >>> study.to_pandas()[["claim", "verdict"]]  # doctest: +SKIP
        >>> study.stage("analysis").to_pandas()  # doctest: +SKIP
    """

    kind: ClassVar[str] = "study"
    main_table: ClassVar[str] = "claims"
    files: ClassVar[tuple[str, ...]] = ("reproduce.json", "report.html")
    summary: dict[str, Any]
    folder: Path
    claims: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        study = self.summary.get("study") or {}
        verdicts = [c.get("verdict") for c in self.claims]
        counts = ", ".join(f"{v} {verdicts.count(v)}" for v in dict.fromkeys(verdicts))
        return (f"{study.get('model')} on {study.get('data')}, preset {(self.summary.get('preset') or {}).get('name')}, "
                f"{len(self.summary.get('stages') or {})} stages; claims: {counts or 'none'}")

    @property
    def layout(self) -> StudyLayout:
        """The study's stage folders."""
        return StudyLayout(self.folder)

    def stage(self, name: str) -> Result:
        """One stage's result, read from its folder (``"analysis"``, ``"full_s1"``, ``"targeted_s1/eval"``...)."""
        return load_run(self.folder / name)

    def tables(self) -> dict[str, list[Any]]:
        timings = self.summary.get("wall_time_s", {})
        return {"claims": self.claims,
                "stages": [{"stage": k, "key": v, "wall_time_s": timings.get(k)}
                           for k, v in self.summary.get("stages", {}).items()]}

    def save(self, out: str | Path) -> Path:
        """A study lives in its run folder: saving it anywhere else is refused (copy the folder instead)."""
        if Path(out).resolve() != self.folder.resolve():
            raise RunError("a study lives in its run folder; copy the folder to move it")
        return self.folder

    @classmethod
    def read(cls, folder: str | Path) -> StudyResult:
        """A study folder back as a result (its claims judged from the folder)."""
        from sumcircuit.study.claims import claim_rows

        p = require_complete(folder)
        return cls(read_json(p / "reproduce.json"), p, claim_rows(p))
