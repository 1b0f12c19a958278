"""Training data and the loss: train/validation splits, the epoch sampler, the summary loss, validation.

The loss covers summary tokens only (the mask from
:func:`sumcircuit.data.encoding.encode`; the ``document`` control objective
labels the document's tokens instead) and is normalized by the labelled
tokens of the whole optimizer step, so ``batch_size 4 x grad_accum 8``
computes the gradient of ``batch_size 32``. Data order is a seeded
permutation per epoch whose position is checkpointed, so a resumed run sees
exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from sumcircuit.data.config import DataConfig, Template
from sumcircuit.data.encoding import IGNORE_INDEX, Encoded, collate, encode_all
from sumcircuit.data.records import load_examples
from sumcircuit.training.config import FinetuneError, ResolvedFinetuneConfig
from sumcircuit.training.prefix import PrefixCache, recurring


def _summary_examples(tokenizer: Any, examples: Sequence[Any], data: DataConfig, source: Any) -> list[Encoded]:
    """The task: the loss on the summary's tokens, given the document."""
    return encode_all(tokenizer, examples, data, need_summary_tokens=True, source=source)


def _document_examples(tokenizer: Any, examples: Sequence[Any], data: DataConfig, source: Any) -> list[Encoded]:
    """The control task: the template's text before the document, then the document alone; the loss on every
    document token (the whole ``max_tokens`` budget goes to the document, no summary is ever seen)."""
    prefix = Template.parse(data.template).pre.replace("{", "{{").replace("}", "}}")
    encoded = encode_all(tokenizer, examples, data.replace(template=prefix + "{document}"), source=source)
    out = []
    for enc in encoded:
        start, end = enc.document_span
        labels = [IGNORE_INDEX] * len(enc.input_ids)
        labels[start:end] = enc.input_ids[start:end]
        out.append(dataclasses.replace(enc, labels=labels))
    if out and not any(e.document_span[1] > e.document_span[0] for e in out):
        raise FinetuneError(f"no document tokens to model in {data.data}")
    return out


OBJECTIVES: dict[str, Callable[[Any, Sequence[Any], DataConfig, Any], list[Encoded]]] = {
    "summary": _summary_examples, "document": _document_examples}


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
    encode = OBJECTIVES[cfg.objective]
    if val_cfg is not None:
        val_set = load_examples(val_cfg)
        train = encode(tokenizer, train_set.examples, train_cfg, train_set.source)
        val = encode(tokenizer, val_set.examples, val_cfg, val_set.source)
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
    encoded = encode(tokenizer, examples, train_cfg, train_set.source)
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
        """Use epoch ``epoch``'s permutation (accelerate calls this too)."""
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Start at position ``start`` of the permutation (a resumed epoch)."""
        self.start = start

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s permutation of the training examples."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.start:]

    def __len__(self) -> int:
        return self.n - self.start


def summary_loss_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over summary tokens, their count); position t predicts label t+1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions t whose next token is labelled in some row: the only logits the loss reads."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def lm_loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over labelled tokens, their count), the LM head run only at the positions the loss reads.

    The summary is a small part of each sequence; the LM head (vocabulary x
    hidden) and its cross-entropy at every other position were computed and
    thrown away. ``logits_to_keep`` (transformers' own argument; any final
    soft-capping still applies) keeps the positions labelled in any row of
    the batch. The same terms as :func:`summary_loss_terms` on full logits, up
    to float summation order.
    """
    positions = loss_positions(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=positions).logits
    targets = batch["labels"][:, positions + 1]
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def summary_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean CE over summary tokens of ``batch`` (validation and tests)."""
    total, count = lm_loss_terms(model, batch)
    return total / count



def collate_train(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A padded training batch: ids, mask, labels."""
    full = collate(batch, pad_token_id)
    return {k: full[k] for k in ("input_ids", "attention_mask", "labels")}



def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device``."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def evaluate_loss(model: torch.nn.Module, encoded: Sequence[Encoded], pad_token_id: int, batch_size: int,
                  device: torch.device, *, rank: int = 0, world: int = 1,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  prefix: PrefixCache | None = None) -> tuple[float, int]:
    """Token-weighted mean CE over every summary token of ``encoded``, and the token count.

    Under ``world`` processes each computes 1/world of it: batch ``b`` runs on
    rank ``b % world``, its (loss sum, token count) goes into slot ``b`` of a
    table that ``all_sum`` (a sum over processes) completes, and every rank
    adds the table up in batch order -- the very numbers and additions of one
    process (``x + 0`` is exact), so the loss does not depend on ``world``.
    Every rank runs the same number of forward passes (an idle rank in the
    last round repeats batch 0 and drops it): DDP and FSDP forwards may hold
    collectives that every rank must join. ``prefix``: batch ``b``'s frozen prefix is kept the first time
    and fed back later (the same numbers, without running the frozen layers again).
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
            batch = device_batch(collate(encoded[start:start + batch_size], pad_token_id), device)
            with recurring(prefix, b) if prefix is not None else contextlib.nullcontext():
                part_sum, part_count = lm_loss_terms(model, batch)
            if b < len(starts):
                table[b, 0], table[b, 1] = part_sum.double().cpu(), float(part_count)
    model.train(was_training)
    if all_sum is not None:
        table = all_sum(table)
    total = sum(table[:, 0].tolist())  # left to right, in batch order
    count = int(table[:, 1].sum())
    return total / max(count, 1), count
