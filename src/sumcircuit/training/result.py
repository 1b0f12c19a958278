"""What ``finetune`` returns and writes: ``train_summary.json``, the log, tracking rows and ``final/``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sumcircuit.artifacts import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    read_csv,
    read_json,
    read_jsonl,
    to_json_line,
)
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.results import Result
from sumcircuit.training.tracking import TRACKING_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sumcircuit.models import LoadedModel


@dataclass(repr=False)
class FinetuneResult(Result):
    """A training run: ``summary`` (train_summary.json), the log, the tracking rows, the final model folder.

    A fine-tune *is* a model for every other operation: pass it where a model
    spec goes (``sc.analyze(base, tuned_result, data)``) and its ``final/`` is used.

    Example:
        >>> cfg = sc.FinetuneConfig(method="lora")
        >>> tuned = sc.finetune("smollm2-135m-instruct", data, cfg, out="runs/lora")  # doctest: +SKIP
        >>> tuned.summary["best_val_loss"], tuned.final_dir  # doctest: +SKIP
    """

    kind: ClassVar[str] = "finetune"
    main_table: ClassVar[str] = "val_curve"
    files: ClassVar[tuple[str, ...]] = ("train_summary.json", "train_log.jsonl", "tracking.csv", "final",
                                        "checkpoints", "trackers")
    summary: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None

    def describe(self) -> str:
        s = self.summary
        layers = s.get("layers") or []
        where = f"all {len(layers)} layers" if layers == list(range(len(layers))) and len(layers) > 4 \
            else f"layers {layers}"
        return (f"{s.get('method')} on {where}: {s.get('steps')} steps, best validation loss "
                f"{s.get('best_val_loss', float('nan')):.4f} at step {s.get('best_step')}")

    @property
    def final_dir(self) -> Path:
        """The trained model (an HF model folder, or an adapter folder): a model spec."""
        return Path(self.summary["final_dir"])

    def model_spec(self) -> str:
        """What other operations load when given this result as a model."""
        return str(self.final_dir)

    def tables(self) -> dict[str, list[Any]]:
        curve = [{"step": s, "val_loss": v} for s, v in self.summary.get("val_curve", [])]
        train = [r for r in self.log if r.get("type") == "train"]
        return {"val_curve": curve, "train_log": train, "tracking": self.tracking}

    def load_model(self, **kwargs: Any) -> LoadedModel:
        """The fine-tuned model (``final/``: a model folder, or an adapter loaded merged)."""
        from sumcircuit.models import load_model

        return load_model(str(self.final_dir), **kwargs)

    def plot(self) -> Figure:
        """Training and validation loss per optimizer step."""
        from sumcircuit import plots

        return plots.training_curves({self.summary.get("method", "run"): self.log})

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``train_summary.json``, ``train_log.jsonl``, ``tracking.csv`` (and ``final/`` if it lives elsewhere)."""
        folder = Path(out)
        if self.folder is not None and folder.resolve() == self.folder.resolve():
            return folder  # written there by the run itself
        folder.mkdir(parents=True, exist_ok=True)
        if self.final_dir.is_dir() and not (folder / "final").exists():
            shutil.copytree(self.final_dir, folder / "final")
        # one atomic write: appending would double the log of a folder that already holds one
        atomic_write_text(folder / "train_log.jsonl", "".join(to_json_line(r) for r in self.log))
        if self.tracking:
            atomic_write_csv(folder / "tracking.csv", self.tracking, TRACKING_COLUMNS)
        atomic_write_json(folder / "train_summary.json", {**self.summary, "final_dir": str(folder / "final")})
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> FinetuneResult:
        """A fine-tuning folder back as a result."""
        p = require_complete(folder)
        return cls(read_json(p / "train_summary.json"), read_jsonl(p / "train_log.jsonl"),
                   [dict(r) for r in read_csv(p / "tracking.csv")], p)
