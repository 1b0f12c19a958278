"""Training curves through Accelerate's experiment trackers (TensorBoard, W&B, MLflow, ...), on request.

``train_log.jsonl`` stays the record sumcircuit reads; ``log_with`` adds the
dashboards a team already uses. Every tracker is an optional package: a name
that is not installed is a one-line error before training, never a silent skip
(Accelerate itself only warns and logs nowhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sumcircuit.training.config import FinetuneError

TRACKER_DIR = "trackers"


def tracker_names(log_with: str | None) -> list[str]:
    """The trackers asked for, checked against those Accelerate knows and those installed here."""
    if not log_with:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    names = [n.strip().lower() for n in log_with.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise FinetuneError(f"`log_with` {name}: not a tracker Accelerate knows ({', '.join(known)})")
        if name not in installed:
            raise FinetuneError(f"`log_with` {name}: its package is not installed here (pip install {name}); "
                                f"installed: {', '.join(sorted(installed)) or 'none'}")
    return list(dict.fromkeys(names))


def start(accelerator: Any, out: Path, config: Mapping[str, Any]) -> None:
    """Open the trackers (their files under ``out/trackers``), with the run's scalar settings as hyper-parameters."""
    if not accelerator.log_with:
        return
    hparams = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(out.name or "sumcircuit", config=hparams)


def log(accelerator: Any, values: Mapping[str, Any], step: int) -> None:
    """One step's numbers (None values left out: trackers want floats)."""
    if accelerator.log_with:
        accelerator.log({k: float(v) for k, v in values.items() if v is not None}, step=step)


def end(accelerator: Any) -> None:
    """Flush and close the trackers."""
    if accelerator.log_with:
        accelerator.end_training()
