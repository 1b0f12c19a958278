"""Checkpoints of a run and resuming from them: weights, optimizer, scheduler, RNG and the run's state.

A checkpoint is written into a temporary folder and renamed into place, and
holds everything a resumed run needs to continue bit for bit; a fingerprint
of the contents (weights, data, config) refuses a checkpoint of another run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sumcircuit.artifacts import atomic_write_json, read_csv, read_json
from sumcircuit.training.batches import Splits
from sumcircuit.training.checkpoint import (
    export_model,
    latest_checkpoint,
    load_optimizer,
    load_rng,
    load_weights,
    replace_dir,
    save_optimizer,
    save_rng,
    tmp_dir,
    truncate_log,
)
from sumcircuit.training.config import FinetuneError, ResolvedFinetuneConfig
from sumcircuit.training.methods import LayerChoice
from sumcircuit.training.state import Run, TrainState

log = logging.getLogger(__name__)


def fingerprint(weights_sha256: str, cfg: ResolvedFinetuneConfig, splits: Splits, choice: LayerChoice,
                dtype: str) -> dict[str, Any]:
    """What must match for a resume to continue the same run: contents, never how a path is spelled."""
    ignore = {"keep_checkpoints", "circuit", "log_with"}  # the circuit enters as the layers/heads it gave
    return {"model_weights_sha256": weights_sha256, "layers": choice.layers,
            "heads": [h.name for h in choice.heads or []], "n_train": len(splits.train), "n_val": len(splits.val),
            "train_sha256": splits.train_source.get("sha256"), "val_sha256": splits.val_source.get("sha256"),
            "config": {**{k: v for k, v in asdict(cfg).items() if k not in ignore}, "dtype": dtype}}


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))



def save_best(run: Run) -> None:
    """Export the current weights as the best checkpoint."""
    if not run.accelerator.is_main_process:
        return
    target = run.out / "checkpoints" / "best"
    tmp = tmp_dir(target)
    export_model(run.unwrapped, run.loaded, tmp, {**run.meta, "step": run.state.step,
                                                    "epoch": run.epoch_float(),
                                                    "val_loss": run.state.best_val_loss})
    replace_dir(tmp, target)


def save_checkpoint(run: Run) -> None:
    """A full checkpoint (weights, optimizer, schedule, RNG, state); keeps the newest few."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        root = run.out / "checkpoints"
        target = root / f"step-{run.state.step:08d}"
        tmp = tmp_dir(target)
        export_model(run.unwrapped, run.loaded, tmp / "model", {**run.meta, "step": run.state.step,
                                                                  "epoch": run.epoch_float()})
        save_optimizer(run.optimizer, tmp)
        atomic_write_json(tmp / "scheduler.json", run.scheduler.state_dict())
        save_rng(tmp)
        atomic_write_json(tmp / "state.json", {"state": asdict(run.state), "fingerprint": run.fingerprint})
        replace_dir(tmp, target)
        steps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
        for old in steps[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def resume(run: Run) -> None:
    """Continue from the newest finished checkpoint; a damaged one is a one-line error."""
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        raise FinetuneError(f"no finished checkpoint to resume from in {run.out / 'checkpoints'}")
    try:
        _restore(run, ckpt)
    except FinetuneError:
        raise
    except Exception as exc:  # a damaged file: safetensors, JSON or a shape that no longer fits
        raise FinetuneError(f"resume: checkpoint {ckpt} is damaged ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); remove it to resume from an earlier one") from None


def _restore(run: Run, ckpt: Path) -> None:
    saved = read_json(ckpt / "state.json")
    want = _json_roundtrip(run.fingerprint)
    if saved["fingerprint"] != want:
        diff = sorted(k for k in set(want) | set(saved["fingerprint"])
                      if want.get(k) != saved["fingerprint"].get(k))
        if "config" in diff:
            a, b = saved["fingerprint"]["config"], want["config"]
            diff = [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + \
                [d for d in diff if d != "config"]
        raise FinetuneError(f"resume: {ckpt} was written by a different run (differs in: "
                            f"{', '.join(diff)}); use the same options, another output folder, or start over "
                            "(resume=False, --no-resume)")
    load_weights(run.unwrapped, ckpt / "model")
    load_optimizer(run.optimizer, ckpt)
    run.scheduler.load_state_dict(read_json(ckpt / "scheduler.json"))
    load_rng(ckpt)
    run.state = TrainState(**saved["state"])
    run.state.resumed_from.append(run.state.step)
    if run.accelerator.is_main_process:
        truncate_log(run.out / "train_log.jsonl", run.state.step)
    run.tracking_rows[:] = [r for r in read_tracking(run.out) if int(r["step"]) <= run.state.step]
    log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", ckpt, run.state.step,
             run.state.epoch, run.state.micro)


def read_tracking(out: Path) -> list[dict[str, Any]]:
    """The tracking rows written so far."""
    return [dict(r) for r in read_csv(out / "tracking.csv")]
