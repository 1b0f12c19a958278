"""Fine-tuning for summarization: one loop for every method, so that only the method differs.

The paper (arXiv 2505.17073) compares three ways to adapt a model, each a
registered :class:`~sumcircuit.training.methods.FinetuneMethod`:

==============  =========  =====  ==========  ======  ========  =====================
method          what       lr     batch (eff) epochs  patience  weight decay (AdamW)
==============  =========  =====  ==========  ======  ========  =====================
full            all params 3e-5   32          10      off (0)   0.01
lora            q,v r=8    5e-5   16          10      3         0.01
targeted-lora   q,v r=8,   5e-5   16          10      3         0.01
                chosen
                layers
==============  =========  =====  ==========  ======  ========  =====================

lr, batch and epochs are the paper's. Not stated by the paper (our choices,
all options): alpha 16 (2 x rank), LoRA dropout 0.05, linear decay without
warmup and gradient clipping at 1.0 (the Hugging Face Trainer defaults), no
weight decay on 1-D parameters (biases, norms), patience counted in
evaluations, one evaluation per epoch, and ``min_delta`` (default 0): a
validation loss counts as better only when it is lower than the best by more
than that (the Keras rule). Checkpoints hold weights, optimizer, scheduler and
RNG states: a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sumcircuit import distributed as dist
from sumcircuit.artifacts import append_jsonl, atomic_write_csv, atomic_write_json, read_jsonl
from sumcircuit.data.config import DataConfig
from sumcircuit.data.encoding import IGNORE_INDEX
from sumcircuit.models import ModelLike, ensure_loaded
from sumcircuit.provenance import provenance
from sumcircuit.runtime import Runtime
from sumcircuit.training import trackers
from sumcircuit.training.batches import (
    EpochSampler,
    collate_train,
    device_batch,
    evaluate_loss,
    lm_loss_terms,
    prepare_splits,
)
from sumcircuit.training.casting import cast_context, make_weight_casts
from sumcircuit.training.checkpoint import export_model, replace_dir, tmp_dir
from sumcircuit.training.config import FinetuneError, ResolvedFinetuneConfig
from sumcircuit.training.methods import FINETUNE_METHODS, choose_layers
from sumcircuit.training.optim import make_optimizer, make_scheduler
from sumcircuit.training.prefix import document_states, make_prefix_cache
from sumcircuit.training.resume import fingerprint, save_best, save_checkpoint
from sumcircuit.training.state import Run, TrainState
from sumcircuit.training.tracking import TRACKING_COLUMNS, Tracker


def train_step(run: Run, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over the step's ``micro_batches``; loss normalized by the step's summary tokens.

    Every process sees all of the step's micro-batches (the same data order
    as one process) and runs micro-batch ``j`` when ``j % N`` is its rank.
    Each loss term is the summed CE times ``N / (summary tokens of the whole
    step)``; DDP averages gradients over the N processes, so the update is
    the per-token mean over the step, exactly as in one process with
    ``grad_accum`` micro-batches, however tokens fall across processes.
    """
    acc = run.accelerator
    n_proc, rank = acc.num_processes, acc.process_index
    n_summary = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    scale = n_proc / max(n_summary, 1)
    mine = list(range(rank, len(micro_batches), n_proc))
    # A process without a micro-batch in a short last step still joins DDP's gradient all-reduce
    # (with a zero-weighted pass), or the others would wait for it forever.
    work = [(j, scale) for j in mine] or [(0, 0.0)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i, (j, weight) in enumerate(work):
        # Dropout masks depend on (seed, step, micro-batch) only: a resumed run, or one on another
        # number of processes, draws the same masks for the same examples.
        torch.manual_seed((run.cfg.seed * 1_000_003 + run.state.step + 1) * 65_536 + j)
        mb = device_batch(micro_batches[j], acc.device)
        sync = i == len(work) - 1
        context = acc.no_sync(run.model) if not sync else contextlib.nullcontext()
        # Backward stays inside the fed prefix and the casts: checkpointed layers recompute their forward there.
        with context, cast_context(run.casts), _fed_prefix(run, mb):
            part, _ = lm_loss_terms(run.model, mb)
            acc.backward(part * weight)
        if weight:
            loss_sum += part.detach().double()
    if n_proc > 1:
        loss_sum = acc.reduce(loss_sum, reduction="sum")
    if not math.isfinite(float(loss_sum)):  # every process sees the reduced loss: all stop together
        raise FinetuneError(f"step {run.state.step + 1}: the training loss is {float(loss_sum)}; the update would "
                            "ruin the weights (lower `lr`, or use `mixed_precision` no)")
    grad_norm = None
    if run.cfg.max_grad_norm is not None:
        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return {"loss": float(loss_sum) / max(n_summary, 1), "grad_norm": grad_norm, "tokens": tokens,
            "summary_tokens": n_summary}


def _fed_prefix(run: Run, batch: dict[str, torch.Tensor]) -> Any:
    """The frozen prefix's cached output fed in, when training rows use the cache."""
    if run.prefix is None or not run.prefix_training:
        return contextlib.nullcontext()
    return run.prefix.feed(document_states(run.prefix, run.unwrapped, batch))


def validate(run: Run) -> dict[str, Any]:
    """Validation loss now; updates the best checkpoint and the early-stopping count."""
    cfg, state = run.cfg, run.state
    acc = run.accelerator
    started = time.perf_counter()
    with cast_context(run.casts, trainable=True):  # the weights stay fixed for the whole pass: cast once
        val_loss, n_tokens = evaluate_loss(run.model, run.splits.val, run.loaded.tokenizer.pad_token_id,
                                           int(cfg.batch_size), acc.device, rank=acc.process_index,
                                           world=acc.num_processes, all_sum=dist.all_reduce_sum, prefix=run.prefix)
    if not math.isfinite(val_loss):
        raise FinetuneError(f"step {state.step}: the validation loss is {val_loss}: the model's weights are broken")
    state.last_eval_step = state.step
    improved = state.best_val_loss is None or val_loss < state.best_val_loss - cfg.min_delta
    if improved:
        state.best_val_loss, state.best_step, state.best_epoch = val_loss, state.step, run.epoch_float()
        state.bad_evals = 0
        save_best(run)
    else:
        state.bad_evals += 1
        if cfg.patience and state.bad_evals >= cfg.patience:
            state.stopped_early = True
    record = {"type": "val", "step": state.step, "epoch": run.epoch_float(), "val_loss": val_loss,
              "val_tokens": n_tokens, "best": improved, "best_val_loss": state.best_val_loss,
              "val_time_s": time.perf_counter() - started}  # the loss, and the best checkpoint's export if improved
    if run.accelerator.is_main_process:
        append_jsonl(run.out / "train_log.jsonl", record)
    trackers.log(acc, {"val/loss": val_loss}, state.step)
    return record



def track(run: Run) -> None:
    """Per-head change against the start model now (tracking.csv)."""
    if run.tracker is None:
        return
    rows = run.tracker.rows(run.unwrapped, run.state.step, run.epoch_float())
    run.tracking_rows.extend(rows)
    if run.accelerator.is_main_process:
        atomic_write_csv(run.out / "tracking.csv", run.tracking_rows, TRACKING_COLUMNS)


def _next_micro_batches(iterator: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) == n:
            break
    return out


def train_loop(run: Run) -> None:
    """Optimizer steps until the step cap or early stopping, checkpointing as configured."""
    from tqdm.auto import tqdm

    cfg, state = run.cfg, run.state
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", desc=cfg.method,
               disable=not run.progress or not run.accelerator.is_main_process, dynamic_ncols=True)
    try:
        while state.step < run.total_steps and not state.stopped_early:
            run.sampler.set_epoch(state.epoch)  # every process iterates the same (global) micro-batches
            run.sampler.set_start(state.micro * int(cfg.batch_size))
            iterator = iter(run.loader)
            while state.step < run.total_steps and not state.stopped_early:
                started = time.perf_counter()
                micro_batches = _next_micro_batches(iterator, cfg.grad_accum)
                if not micro_batches:
                    break
                stats = train_step(run, micro_batches)
                state.step += 1
                state.micro += len(micro_batches)
                state.tokens += int(stats["tokens"])
                state.summary_tokens += int(stats["summary_tokens"])
                if state.micro >= run.micro_per_epoch:
                    state.epoch, state.micro = state.epoch + 1, 0
                elapsed = time.perf_counter() - started
                state.wall_time_s += elapsed
                record = {"type": "train", "step": state.step, "epoch": run.epoch_float(), **stats,
                          "lr": run.scheduler.get_last_lr()[0], "step_time_s": elapsed,
                          "tokens_per_s": stats["tokens"] / elapsed}
                if run.accelerator.is_main_process:
                    append_jsonl(run.out / "train_log.jsonl", record)
                trackers.log(run.accelerator, {"train/loss": stats["loss"], "train/grad_norm": stats["grad_norm"],
                                               "train/lr": record["lr"]}, state.step)
                postfix = {"loss": f"{stats['loss']:.3f}"}
                last = state.step >= run.total_steps
                if state.step % run.eval_every == 0 or last:
                    t0 = time.perf_counter()
                    postfix["val"] = f"{validate(run)['val_loss']:.3f}"
                    state.wall_time_s += time.perf_counter() - t0
                if cfg.track_every and (state.step % cfg.track_every == 0 or last):
                    track(run)
                bar.set_postfix(postfix)
                bar.update(1)
                if state.step % run.save_every == 0 or last or state.stopped_early:
                    save_checkpoint(run)
                if state.micro == 0:
                    break  # epoch finished: a fresh permutation
    finally:
        bar.close()


def setup(model: ModelLike, train_cfg: DataConfig, cfg: ResolvedFinetuneConfig, out: Path,
          val_cfg: DataConfig | None, runtime: Runtime) -> Run:
    """Everything a run needs: model, method, data, optimizer, schedule, sampler, fingerprint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    names = trackers.tracker_names(cfg.log_with)
    dist.allow_precision(cfg.mixed_precision)
    accelerator = Accelerator(cpu=runtime.device == "cpu", mixed_precision=cfg.mixed_precision,
                              log_with=names or None, project_dir=str(out / trackers.TRACKER_DIR) if names else None)
    if cfg.grad_accum % accelerator.num_processes:
        n = accelerator.num_processes
        raise FinetuneError(f"`grad_accum` {cfg.grad_accum} cannot be shared by {n} processes: the effective "
                            f"batch (`batch_size` x `grad_accum`) is kept whatever the number of processes, "
                            f"so `grad_accum` must be a multiple of {n} (e.g. `batch_size` "
                            f"{max(1, int(cfg.batch_size) // n)} `grad_accum` {cfg.grad_accum * n})")
    loaded = ensure_loaded(model, runtime=runtime, device="cpu", trust_remote_code=False)
    method = FINETUNE_METHODS.get(cfg.method)
    choice = choose_layers(cfg, loaded.adapter.n_layers)
    splits = prepare_splits(loaded.tokenizer, train_cfg, val_cfg, cfg)
    if not splits.train or not splits.val:
        raise FinetuneError("no training or validation examples")
    loaded.weights_sha256()  # hash the starting weights before training changes them
    set_seed(cfg.seed)  # LoRA initialization and dropout
    start_copy = copy.deepcopy(loaded.model) if cfg.track_every else None
    prepared = method.prepare_model(loaded, choice, cfg)
    prepared.model.train()
    optimizer = make_optimizer(prepared.model, cfg)
    sampler = EpochSampler(len(splits.train), cfg.seed)
    train_set: Any = splits.train  # a list is a map-style dataset
    loader: DataLoader[Any] = DataLoader(train_set, batch_size=int(cfg.batch_size), sampler=sampler,
                        collate_fn=partial(collate_train, pad_token_id=loaded.tokenizer.pad_token_id))
    micro_per_epoch = math.ceil(len(splits.train) / int(cfg.batch_size))  # all processes together
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(float(cfg.epochs) * steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    # The loader is not sharded by accelerate: every process reads the one-process micro-batch
    # sequence and _train_step deals each step's micro-batches out (same data order for any N).
    wrapped, optimizer = accelerator.prepare(prepared.model, optimizer)
    eval_every = cfg.eval_every or steps_per_epoch
    tracker = None
    if start_copy is not None:
        probe = splits.val[:cfg.track_docs]
        tracker = Tracker.create(start_copy, loaded.adapter, probe, loaded.tokenizer.pad_token_id, cfg.seed,
                                 choice.layers if method.adapter else None)
        del start_copy
    meta = {"method": cfg.method, "layers": choice.layers, "layer_source": choice.source, "unit": cfg.unit,
            "rank": cfg.rank if method.adapter else None,
            "alpha": cfg.alpha if method.adapter else None}
    run = Run(cfg, out, loaded, accelerator, wrapped, optimizer, scheduler, loader, sampler, splits,
              TrainState(), meta, {}, micro_per_epoch, total_steps, eval_every,
              cfg.save_every or eval_every, tracker, [], runtime.progress)
    # A document repeats when the run covers more than one epoch of micro-batches.
    run.prefix, run.prefix_training = make_prefix_cache(
        prepared.model, loaded.adapter.layers(loaded.model), loaded.model.config, loaded.adapter.spec.dropout_fields,
        cfg.prefix_cache_gb, data_repeat=total_steps * cfg.grad_accum > micro_per_epoch)
    run.casts = make_weight_casts(prepared.model, loaded.adapter.layers(loaded.model), accelerator)
    run.fingerprint = fingerprint(loaded.weights_sha256(), cfg, splits, choice, runtime.dtype)
    run.meta.update({"circuit_heads": [h.name for h in choice.heads] if choice.heads else None,
                     "trainable_params": prepared.trainable_params,
                     "total_params": prepared.total_params, "expected_trainable_params": prepared.expected_trainable,
                     "steps_per_epoch": steps_per_epoch})
    return run



def finish(run: Run, started: float) -> dict[str, Any]:
    """Copy the final weights into place and write train_summary.json; returns the summary."""
    cfg, state, out = run.cfg, run.state, run.out
    run.accelerator.wait_for_everyone()  # rank 0's log is complete before anyone reads it
    final = out / "final"
    best = out / "checkpoints" / "best"
    final_kind = "best" if cfg.final == "best" and best.is_dir() else "last"
    if run.accelerator.is_main_process:
        tmp = tmp_dir(final)
        if final_kind == "best":
            shutil.rmtree(tmp)
            shutil.copytree(best, tmp)
        else:
            export_model(run.unwrapped, run.loaded, tmp, {**run.meta, "step": state.step,
                                                          "epoch": run.epoch_float()})
        replace_dir(tmp, final)
    curve = [(r["step"], r["val_loss"]) for r in read_log(out) if r.get("type") == "val"]
    train_records = [r for r in read_log(out) if r.get("type") == "train"]
    step_time = sum(r["step_time_s"] for r in train_records)
    summary = {
        **{k: run.meta[k] for k in ("method", "unit", "layers", "layer_source", "circuit_heads", "rank", "alpha")},
        "trainable_params": run.meta["trainable_params"], "total_params": run.meta["total_params"],
        "trainable_fraction": run.meta["trainable_params"] / run.meta["total_params"],
        "expected_trainable_params": run.meta["expected_trainable_params"],
        "steps": state.step, "planned_steps": run.total_steps, "steps_per_epoch": run.meta["steps_per_epoch"],
        "epochs": run.epoch_float(), "effective_batch_size": int(cfg.batch_size) * cfg.grad_accum,
        "processes": run.accelerator.num_processes,
        "best_step": state.best_step, "epochs_to_best": state.best_epoch, "best_val_loss": state.best_val_loss,
        "final_val_loss": curve[-1][1] if curve else None, "val_curve": curve,
        "stopped_early": state.stopped_early, "final_weights": final_kind,
        "n_train": len(run.splits.train), "n_val": len(run.splits.val),
        "tokens": state.tokens, "summary_tokens": state.summary_tokens,
        "train_tokens_per_s": sum(r["tokens"] for r in train_records) / step_time if step_time else None,
        "wall_time_s": state.wall_time_s, "session_wall_time_s": time.perf_counter() - started,
        "resumed_from_steps": state.resumed_from, "final_dir": str(final),
        "prefix_cache": ({**run.prefix.summary(), "training_rows": run.prefix_training}
                         if run.prefix is not None else None),
        "weight_casts": run.casts.summary() if run.casts is not None else None,
        "provenance": provenance(models=[run.loaded.provenance()], data=run.splits.train_source,
                                 val_data=run.splits.val_source, seed=cfg.seed, config=asdict(cfg)),
    }
    if run.accelerator.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return summary


def read_log(out: Path) -> list[dict[str, Any]]:
    """The run's train_log.jsonl records."""
    return read_jsonl(out / "train_log.jsonl")
