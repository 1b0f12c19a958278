"""``finetune``: train one model (any registered method) into an output folder, resumably."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sumcircuit.artifacts import read_csv, read_jsonl
from sumcircuit.config import coerce_config
from sumcircuit.data.config import DataConfig, coerce_data
from sumcircuit.models import ModelLike
from sumcircuit.outputs import remove_outputs, writes_output
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.training import trackers
from sumcircuit.training.checkpoint import latest_checkpoint
from sumcircuit.training.config import FinetuneConfig, FinetuneError
from sumcircuit.training.loop import finish, setup, track, train_loop, validate
from sumcircuit.training.result import FinetuneResult
from sumcircuit.training.resume import resume as resume_run
from sumcircuit.training.state import Run


@writes_output("finetune", "out")
def _finetune_into(model: ModelLike, data: DataConfig, config: FinetuneConfig, out: str | Path,
                   val_data: DataConfig | None, runtime: Runtime, resume: bool) -> dict[str, Any]:
    """Train, evaluate and save one run; returns what ``train_summary.json`` holds.

    ``setup`` loads the model and data and checks a checkpoint found in ``out``
    before anything there changes, so a refused run leaves a finished one as it was.
    """
    cfg = config.resolved()
    folder = Path(out)
    started = time.perf_counter()
    run = setup(model, data, cfg, folder, val_data, runtime)
    if not resume:
        remove_outputs(folder, FinetuneResult.files)
    folder.mkdir(parents=True, exist_ok=True)
    trackers.start(run.accelerator, folder, asdict(cfg))
    try:
        return _train(run, folder, started)
    finally:
        trackers.end(run.accelerator)


def _train(run: Run, folder: Path, started: float) -> dict[str, Any]:
    """From the start or the newest checkpoint to the final weights and summary."""
    cfg = run.cfg
    if latest_checkpoint(folder) is not None:
        resume_run(run)
    else:
        if run.accelerator.is_main_process:  # only rank 0 writes in the folder
            remove_outputs(folder, ("train_log.jsonl", "tracking.csv"))  # of a run that never reached a checkpoint
        t0 = time.perf_counter()
        validate(run)  # step 0: the curve starts at the untrained model
        if cfg.track_every:
            track(run)
        run.state.wall_time_s += time.perf_counter() - t0
    train_loop(run)
    if run.state.last_eval_step != run.state.step:
        validate(run)
    return finish(run, started)


def finetune(model: ModelLike, data: DataConfig | Any, config: FinetuneConfig | None = None, *,
             val_data: DataConfig | None = None, runtime: Runtime | None = None, out: str | Path,
             resume: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into ``out`` (checkpoints, ``final/``, logs).

    Args:
        model: the model to train (a spec or a :class:`~sumcircuit.models.LoadedModel`, trained in place).
        data: the training documents; without ``val_data`` a seeded ``val_fraction`` is held out.
        config: method and hyper-parameters (None ones take the method's paper default).
        val_data: validation documents for early stopping and the best checkpoint.
        runtime: device, dtype, progress (remote code is never run for training).
        out: the run folder.
        resume: continue from the newest finished checkpoint of the same run in ``out`` (a checkpoint of
            another run is refused); False starts over (sumcircuit's earlier outputs there are replaced).

    Returns:
        The run: summary (``train_summary.json``), log, tracking rows and the ``final/`` model folder.

    Example:
        >>> import sumcircuit as sc
        >>> data = sc.DataConfig("../shared/data/cnndm_gpt4", split="train", n_docs=32, max_tokens=256)
        >>> sc.finetune("smollm2-135m-instruct", data, sc.FinetuneConfig(method="lora", max_steps=4),
        ...             out="runs/lora")  # doctest: +SKIP
    """
    cfg = coerce_config(FinetuneConfig, config)
    rt = coerce_runtime(runtime)
    rt.require_whole_models("fine-tuning")
    if rt.trust_remote_code:
        raise FinetuneError("finetune does not run remote model code")
    train_cfg = coerce_data(data)
    val_cfg = coerce_data(val_data, "val_data") if val_data is not None else None
    summary = _finetune_into(model, train_cfg, cfg, out, val_cfg, rt, resume)
    folder = Path(out)
    return FinetuneResult(summary, read_jsonl(folder / "train_log.jsonl"),
                          [dict(r) for r in read_csv(folder / "tracking.csv")], folder)


def report_lines(result: FinetuneResult) -> list[str]:
    """What ``sumcircuit finetune`` prints: method, trainable parameters, steps, best loss, final weights."""
    summary = result.summary
    what = f"heads {', '.join(summary['circuit_heads'])}" if summary.get("unit") == "head" \
        else f"layers {summary['layers']}"
    return [f"method {summary['method']}, {what}: {summary['trainable_params']:,} trainable "
            f"of {summary['total_params']:,} parameters",
            f"{summary['steps']} steps ({summary['epochs']:.2f} epochs); best validation loss "
            f"{summary['best_val_loss']:.4f} at step {summary['best_step']} (epoch {summary['epochs_to_best']:.2f})"
            + ("; stopped early" if summary["stopped_early"] else ""),
            f"final weights ({summary['final_weights']}): {summary['final_dir']}"]
