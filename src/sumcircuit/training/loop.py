"""Fine-tuning for summarization: full, LoRA on every layer, and targeted LoRA.

The paper (arXiv 2505.17073) compares three ways to adapt a model; this module
runs them under one loop so that only the method differs:

==============  =========  =====  ==========  ======  ========  =====================
method          what       lr     batch (eff) epochs  patience  weight decay (AdamW)
==============  =========  =====  ==========  ======  ========  =====================
full            all params 3e-5   32          10      off (0)   0.01
lora            q,v r=8    5e-5   16          10      3         0.01
targeted-lora   q,v r=8,   5e-5   16          10      3         0.01
                chosen
                layers
==============  =========  =====  ==========  ======  ========  =====================

lr, batch and epochs are the paper's; the paper gives lr/batch/early stopping
for targeted LoRA and describes standard LoRA as "the same" on all layers, so
both LoRA methods share them. Not stated by the paper (our choices, all
flags): alpha 16 (2 x rank), LoRA dropout 0.05, linear decay without warmup
and gradient clipping at 1.0 (the Hugging Face Trainer defaults), no weight
decay on 1-D parameters (biases, norms; also the Trainer's convention),
patience counted in evaluations, one evaluation per epoch, and ``min_delta``
(default 0): a validation loss counts as better only when it is lower than
the best by more than that (the Keras rule), so the best checkpoint and the
epochs to it mark where the loss stopped improving by a stated amount.

Loss covers summary tokens only (the mask from :func:`sumcircuit.data.encode`)
and is normalized by the summary tokens of the whole optimizer step, so
``--batch-size 4 --grad-accum 8`` computes the gradient of ``--batch-size 32``.
Data order is a seeded permutation per epoch whose position is checkpointed,
and checkpoints hold weights, optimizer, scheduler and RNG states: a resumed
run ends with the same weights as an uninterrupted one.
"""


from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import (
    append_jsonl,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    read_csv,
    read_json,
    read_jsonl,
    to_json_line,
)
from sumcircuit.data import IGNORE_INDEX, DataConfig, Encoded, collate, encode_all, load_examples
from sumcircuit.lora import (
    count_params,
    expected_head_lora_params,
    expected_lora_params,
    inject_lora,
    restrict_lora_to_heads,
)
from sumcircuit.models import LoadedModel, ensure_loaded, load_model
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import provenance
from sumcircuit.results import Result
from sumcircuit.sites import Site
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
from sumcircuit.training.config import (
    FinetuneConfig,
    FinetuneError,
    LayerChoice,
    ResolvedFinetuneConfig,
    choose_layers,
)
from sumcircuit.training.tracking import TRACKING_COLUMNS, Tracker

# ---------------------------------------------------------------- data
log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Encoded]
    val: list[Encoded]
    train_source: dict[str, Any]
    val_source: dict[str, Any]


def prepare_splits(tokenizer: Any, train_cfg: DataConfig, val_cfg: DataConfig | None,
                   cfg: ResolvedFinetuneConfig) -> Splits:
    """Encode train and validation data; without ``val_cfg`` hold out a seeded fraction."""
    train_set = load_examples(train_cfg)
    if val_cfg is not None:
        val_set = load_examples(val_cfg)
        train = encode_all(tokenizer, train_set.examples, train_cfg, need_summary_tokens=True, source=train_set.source)
        val = encode_all(tokenizer, val_set.examples, val_cfg, need_summary_tokens=True, source=val_set.source)
        return Splits(train, val, {**train_set.source.provenance(), "n_docs": len(train)},
                      {**val_set.source.provenance(), "n_docs": len(val)})
    examples = train_set.examples
    if len(examples) < 2:
        raise FinetuneError("need at least 2 training examples to hold out validation data "
                            "(or pass --val-data)")
    n_val = min(len(examples) - 1, max(1, round(cfg.val_fraction * len(examples))))
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    val_idx = set(order[:n_val])
    encoded = encode_all(tokenizer, examples, train_cfg, need_summary_tokens=True, source=train_set.source)
    train = [e for i, e in enumerate(encoded) if i not in val_idx]
    val = [e for i, e in enumerate(encoded) if i in val_idx]
    val_source = {**train_set.source.provenance(), "n_docs": len(val),
                  "held_out": f"{cfg.val_fraction:g} of the training file, seed {cfg.seed}"}
    return Splits(train, val, {**train_set.source.provenance(), "n_docs": len(train)}, val_source)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start mid-epoch.

    The order depends on (seed, epoch) only, never on global RNG state, so a
    resumed run that sets the epoch and start position sees exactly the
    examples an uninterrupted run would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard calls this too
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.start:]

    def __len__(self) -> int:
        return self.n - self.start


# ---------------------------------------------------------------- model, loss, optimizer

def summary_loss_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over summary tokens, their count); position t predicts label t+1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def summary_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean CE over summary tokens of ``batch`` (validation and tests)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    total, count = summary_loss_terms(logits, batch["labels"])
    return total / count


def enable_gradient_checkpointing(model: Any) -> None:
    """Checkpoint each block without making the embeddings require grad.

    transformers (and PEFT) hook the input embeddings to require grad so that
    reentrant checkpointing works with frozen inputs; that forces backward
    through every layer below the lowest adapted one. Non-reentrant
    checkpointing does not need it, so the hook is removed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


def make_optimizer(model: torch.nn.Module, cfg: ResolvedFinetuneConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, 1-D parameters (biases, norm weights) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ResolvedFinetuneConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class PreparedModel:
    model: torch.nn.Module  # a PeftModel for LoRA methods
    adapter: ArchitectureAdapter
    trainable_params: int
    total_params: int
    expected_trainable: int | None


def prepare_model(loaded: LoadedModel, method: str, layers: list[int], cfg: ResolvedFinetuneConfig,
                  heads: list[Site] | None = None) -> PreparedModel:
    """Full: every parameter trains. LoRA: q/v LoRA on ``layers`` (verified), the rest frozen.

    With ``cfg.unit == "head"`` LoRA may change only the q/v rows of ``heads``;
    the trainable count is then of the parameters that can change.
    """
    model, adapter = loaded.model, loaded.adapter
    expected = None
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        model = inject_lora(model, adapter, layers, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)
        expected = expected_lora_params(adapter, len(layers), cfg.rank)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_params(model)
    if cfg.unit == "head":
        if not heads:
            raise FinetuneError("--unit head needs the circuit's heads")
        trainable = restrict_lora_to_heads(model, adapter, heads)
        expected = expected_head_lora_params(adapter, heads, cfg.rank)
        if trainable != expected:
            raise FinetuneError(f"head-level LoRA has {trainable} trainable parameters, expected {expected}")
    return PreparedModel(model, adapter, trainable, total, expected)


# ---------------------------------------------------------------- run state

@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0  # input tokens trained on
    summary_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    wall_time_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)


def _fingerprint(weights_sha256: str, cfg: ResolvedFinetuneConfig, splits: Splits,
                 choice: LayerChoice) -> dict[str, Any]:
    """What must match for a resume to continue the same run: contents, never how a path is spelled."""
    ignore = {"device", "progress", "keep_checkpoints", "circuit"}  # the circuit enters as the layers/heads it gave
    return {"model_weights_sha256": weights_sha256, "layers": choice.layers,
            "heads": [h.name for h in choice.heads or []], "n_train": len(splits.train), "n_val": len(splits.val),
            "train_sha256": splits.train_source.get("sha256"), "val_sha256": splits.val_source.get("sha256"),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ignore}}


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------- the run

@dataclass
class _Run:
    """The live objects of one run, passed between the loop's helpers."""

    cfg: ResolvedFinetuneConfig
    out: Path
    loaded: LoadedModel
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any
    sampler: EpochSampler
    splits: Splits
    state: TrainState
    meta: dict[str, Any]
    fingerprint: dict[str, Any]
    micro_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    tracker: Tracker | None
    tracking_rows: list[dict[str, Any]]

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def epoch_float(self) -> float:
        return self.state.epoch + self.state.micro / self.micro_per_epoch


def _device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def evaluate_loss(model: torch.nn.Module, encoded: Sequence[Encoded], pad_token_id: int, batch_size: int,
                  device: torch.device, *, rank: int = 0, world: int = 1,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, int]:
    """Token-weighted mean CE over every summary token of ``encoded``, and the token count.

    Under ``world`` processes each computes 1/world of it: batch ``b`` runs on
    rank ``b % world``, its (loss sum, token count) goes into slot ``b`` of a
    table that ``all_sum`` (a sum over processes) completes, and every rank
    adds the table up in batch order -- the very numbers and additions of one
    process (``x + 0`` is exact), so the loss does not depend on ``world``.
    Every rank runs the same number of forward passes (an idle rank in the
    last round repeats batch 0 and drops it): DDP and FSDP forwards may hold
    collectives that every rank must join.
    """
    if world > 1 and all_sum is None:
        raise ValueError("evaluate_loss under several processes needs all_sum")
    was_training = model.training
    model.eval()
    starts = list(range(0, len(encoded), batch_size))
    table = torch.zeros(len(starts), 2, dtype=torch.float64)  # per batch: loss sum, summary tokens
    with torch.no_grad():
        for first in range(0, len(starts), world):
            b = first + rank
            start = starts[b] if b < len(starts) else 0
            batch = _device_batch(collate(encoded[start:start + batch_size], pad_token_id), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            part_sum, part_count = summary_loss_terms(logits, batch["labels"])
            if b < len(starts):
                table[b, 0], table[b, 1] = part_sum.double().cpu(), float(part_count)
    model.train(was_training)
    if all_sum is not None:
        table = all_sum(table)
    total = sum(table[:, 0].tolist())  # left to right, in batch order
    count = int(table[:, 1].sum())
    return total / max(count, 1), count


def _train_step(run: _Run, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
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
        mb = _device_batch(micro_batches[j], acc.device)
        sync = i == len(work) - 1
        context = acc.no_sync(run.model) if not sync else _nullcontext()
        with context:
            logits = run.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                               use_cache=False).logits
            part, _ = summary_loss_terms(logits, mb["labels"])
            acc.backward(part * weight)
        if weight:
            loss_sum += part.detach().double()
    if n_proc > 1:
        loss_sum = acc.reduce(loss_sum, reduction="sum")
    grad_norm = None
    if run.cfg.max_grad_norm is not None:
        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    return {"loss": float(loss_sum) / max(n_summary, 1), "grad_norm": grad_norm, "tokens": tokens,
            "summary_tokens": n_summary}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _evaluate(run: _Run) -> dict[str, Any]:
    cfg, state = run.cfg, run.state
    acc = run.accelerator
    val_loss, n_tokens = evaluate_loss(run.model, run.splits.val, run.loaded.tokenizer.pad_token_id,
                                       int(cfg.batch_size), acc.device, rank=acc.process_index,
                                       world=acc.num_processes, all_sum=dist.all_reduce_sum)
    state.last_eval_step = state.step
    improved = state.best_val_loss is None or val_loss < state.best_val_loss - cfg.min_delta
    if improved:
        state.best_val_loss, state.best_step, state.best_epoch = val_loss, state.step, run.epoch_float()
        state.bad_evals = 0
        _save_best(run)
    else:
        state.bad_evals += 1
        if cfg.patience and state.bad_evals >= cfg.patience:
            state.stopped_early = True
    record = {"type": "val", "step": state.step, "epoch": run.epoch_float(), "val_loss": val_loss,
              "val_tokens": n_tokens, "best": improved, "best_val_loss": state.best_val_loss}
    if run.accelerator.is_main_process:
        append_jsonl(run.out / "train_log.jsonl", record)
    return record


def _save_best(run: _Run) -> None:
    if not run.accelerator.is_main_process:
        return
    target = run.out / "checkpoints" / "best"
    tmp = tmp_dir(target)
    export_model(run.unwrapped, run.loaded, tmp, {**run.meta, "step": run.state.step,
                                                    "epoch": run.epoch_float(),
                                                    "val_loss": run.state.best_val_loss})
    replace_dir(tmp, target)


def _save_checkpoint(run: _Run) -> None:
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


def _resume(run: _Run) -> None:
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        raise FinetuneError(f"--resume: no finished checkpoint in {run.out / 'checkpoints'}")
    try:
        _restore(run, ckpt)
    except FinetuneError:
        raise
    except Exception as exc:  # a damaged file: safetensors, JSON or a shape that no longer fits
        raise FinetuneError(f"--resume: checkpoint {ckpt} is damaged ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); remove it to resume from an earlier one") from None


def _restore(run: _Run, ckpt: Path) -> None:
    saved = read_json(ckpt / "state.json")
    want = _json_roundtrip(run.fingerprint)
    if saved["fingerprint"] != want:
        diff = sorted(k for k in set(want) | set(saved["fingerprint"])
                      if want.get(k) != saved["fingerprint"].get(k))
        if "config" in diff:
            a, b = saved["fingerprint"]["config"], want["config"]
            diff = [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] + \
                [d for d in diff if d != "config"]
        raise FinetuneError(f"--resume: {ckpt} was written by a different run (differs in: "
                            f"{', '.join(diff)}); use the same options or a new --out")
    load_weights(run.unwrapped, ckpt / "model")
    load_optimizer(run.optimizer, ckpt)
    run.scheduler.load_state_dict(read_json(ckpt / "scheduler.json"))
    load_rng(ckpt)
    run.state = TrainState(**saved["state"])
    run.state.resumed_from.append(run.state.step)
    if run.accelerator.is_main_process:
        truncate_log(run.out / "train_log.jsonl", run.state.step)
    run.tracking_rows[:] = [r for r in _read_tracking(run.out) if int(r["step"]) <= run.state.step]
    log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", ckpt, run.state.step,
             run.state.epoch, run.state.micro)


def _read_tracking(out: Path) -> list[dict[str, Any]]:
    return [dict(r) for r in read_csv(out / "tracking.csv")]


def _track(run: _Run) -> None:
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


def _loop(run: _Run) -> None:
    from tqdm.auto import tqdm

    cfg, state = run.cfg, run.state
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", desc=cfg.method,
               disable=not cfg.progress or not run.accelerator.is_main_process, dynamic_ncols=True)
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
                stats = _train_step(run, micro_batches)
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
                postfix = {"loss": f"{stats['loss']:.3f}"}
                last = state.step >= run.total_steps
                if state.step % run.eval_every == 0 or last:
                    t0 = time.perf_counter()
                    postfix["val"] = f"{_evaluate(run)['val_loss']:.3f}"
                    state.wall_time_s += time.perf_counter() - t0
                if cfg.track_every and (state.step % cfg.track_every == 0 or last):
                    _track(run)
                bar.set_postfix(postfix)
                bar.update(1)
                if state.step % run.save_every == 0 or last or state.stopped_early:
                    _save_checkpoint(run)
                if state.micro == 0:
                    break  # epoch finished: a fresh permutation
    finally:
        bar.close()


def _setup(model: str | LoadedModel, train_cfg: DataConfig, cfg: ResolvedFinetuneConfig, out: Path,
           val_cfg: DataConfig | None) -> _Run:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    if cfg.grad_accum % accelerator.num_processes:
        n = accelerator.num_processes
        raise FinetuneError(f"--grad-accum {cfg.grad_accum} cannot be shared by {n} processes: the effective "
                            f"batch (--batch-size x --grad-accum) is kept whatever the number of processes, "
                            f"so --grad-accum must be a multiple of {n} (e.g. --batch-size "
                            f"{max(1, int(cfg.batch_size) // n)} --grad-accum {cfg.grad_accum * n})")
    loaded = ensure_loaded(model, dtype=cfg.dtype, device="cpu")
    choice = choose_layers(cfg, loaded.adapter.n_layers)
    splits = prepare_splits(loaded.tokenizer, train_cfg, val_cfg, cfg)
    if not splits.train or not splits.val:
        raise FinetuneError("no training or validation examples")
    loaded.weights_sha256()  # hash the starting weights before training changes them
    set_seed(cfg.seed)  # LoRA initialization and dropout
    start_copy = copy.deepcopy(loaded.model) if cfg.track_every else None
    prepared = prepare_model(loaded, cfg.method, choice.layers, cfg, choice.heads)
    prepared.model.train()
    optimizer = make_optimizer(prepared.model, cfg)
    sampler = EpochSampler(len(splits.train), cfg.seed)
    train_set: Any = splits.train  # a list is a map-style dataset
    loader: DataLoader[Any] = DataLoader(train_set, batch_size=int(cfg.batch_size), sampler=sampler,
                        collate_fn=partial(_collate_train, pad_token_id=loaded.tokenizer.pad_token_id))
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
                                 choice.layers if cfg.method != "full" else None)
        del start_copy
    meta = {"method": cfg.method, "layers": choice.layers, "layer_source": choice.source, "unit": cfg.unit,
            "rank": cfg.rank if cfg.method != "full" else None,
            "alpha": cfg.alpha if cfg.method != "full" else None}
    run = _Run(cfg, out, loaded, accelerator, wrapped, optimizer, scheduler, loader, sampler, splits,
               TrainState(), meta, {}, micro_per_epoch, total_steps, eval_every,
               cfg.save_every or eval_every, tracker, [])
    run.fingerprint = _fingerprint(loaded.weights_sha256(), cfg, splits, choice)
    run.meta.update({"circuit_heads": [h.name for h in choice.heads] if choice.heads else None,
                     "trainable_params": prepared.trainable_params,
                     "total_params": prepared.total_params, "expected_trainable_params": prepared.expected_trainable,
                     "steps_per_epoch": steps_per_epoch})
    return run


def _collate_train(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    full = collate(batch, pad_token_id)
    return {k: full[k] for k in ("input_ids", "attention_mask", "labels")}


def _finish(run: _Run, started: float) -> dict[str, Any]:
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
    curve = [(r["step"], r["val_loss"]) for r in _read_log(out) if r.get("type") == "val"]
    train_records = [r for r in _read_log(out) if r.get("type") == "train"]
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
        "provenance": provenance(models=[run.loaded.provenance()], data=run.splits.train_source,
                                 val_data=run.splits.val_source, seed=cfg.seed, config=asdict(cfg)),
    }
    if run.accelerator.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return summary


def _read_log(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / "train_log.jsonl")


@dataclass
class FinetuneResult(Result):
    """A training run: ``summary`` (train_summary.json), the log, the tracking rows, the final model folder."""

    kind: ClassVar[str] = "finetune"
    main_table: ClassVar[str] = "val_curve"
    summary: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None

    @property
    def final_dir(self) -> Path:
        return Path(self.summary["final_dir"])

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        curve = [{"step": s, "val_loss": v} for s, v in self.summary.get("val_curve", [])]
        train = [r for r in self.log if r.get("type") == "train"]
        return {"val_curve": curve, "train_log": train, "tracking": self.tracking}

    def load_model(self, **kwargs: Any) -> LoadedModel:
        """The fine-tuned model (``final/``: a model folder, or an adapter loaded merged)."""
        return load_model(str(self.final_dir), **kwargs)

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


def finetune(model: str | LoadedModel, data: DataConfig, config: FinetuneConfig | None = None, *,
             out: str | Path, val_data: DataConfig | None = None, resume: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into ``out`` (checkpoints, ``final/``, logs).

    A :class:`LoadedModel` is trained in place. ``resume=True`` continues from
    the newest finished checkpoint in ``out/checkpoints`` (refusing one
    written with different options).
    """
    summary = run_finetune(model, data, config or FinetuneConfig(), out, val_data, resume)
    folder = Path(out)
    return FinetuneResult(summary, _read_log(folder), [dict(r) for r in read_csv(folder / "tracking.csv")], folder)


@writes_output("finetune", "out_dir")
def run_finetune(model_spec: str | LoadedModel, train_cfg: DataConfig, config: FinetuneConfig, out_dir: str | Path,
                 val_cfg: DataConfig | None = None, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and save one run; returns what ``train_summary.json`` holds.

    ``resume=True`` continues from the newest finished checkpoint in
    ``out_dir/checkpoints`` (refusing one written with different options).
    """
    cfg = config.resolved()
    out = Path(out_dir)
    if not resume and (out / "checkpoints").exists() and latest_checkpoint(out) is not None:
        raise FinetuneError(f"{out} already holds checkpoints: pass --resume to continue, or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = _setup(model_spec, train_cfg, cfg, out, val_cfg)
    if resume:
        _resume(run)
    else:
        if run.accelerator.is_main_process:  # only rank 0 writes in --out
            (out / "train_log.jsonl").unlink(missing_ok=True)
            (out / "tracking.csv").unlink(missing_ok=True)
        t0 = time.perf_counter()
        _evaluate(run)  # step 0: the curve starts at the untrained model
        if cfg.track_every:
            _track(run)
        run.state.wall_time_s += time.perf_counter() - t0
    _loop(run)
    if run.state.last_eval_step != run.state.step:
        _evaluate(run)
    return _finish(run, started)


