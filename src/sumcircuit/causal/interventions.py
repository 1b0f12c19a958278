"""Reading and editing activations at :class:`~sumcircuit.sites.Site` s, the loss, and batching.

Everything here is shared by ablation, patching and attribution: which module
holds a site comes from the adapter table, the loss is the teacher-forced
summary loss of one document, and batches are cut the same way in one
process and under N processes.

Cost: a component at layer ``l`` can only change layers ``>= l``, so an
edited run replays layers ``< l`` from the cached clean run (the blocks return
their cached outputs without computing) and computes only layers ``l..L-1``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.causal.config import CausalError
from sumcircuit.data.config import DataConfig
from sumcircuit.data.encoding import IGNORE_INDEX, Encoded, collate, encode_all
from sumcircuit.data.records import DataSource, load_examples
from sumcircuit.errors import SumcircuitError
from sumcircuit.models import LoadedModel
from sumcircuit.sites import Site

# denoise: run base, insert tuned's activation (is the component sufficient?)
# noise:   run tuned, insert base's activation (is the component necessary?)
RECEIVER = {"denoise": "base", "noise": "tuned"}
Activation = tuple[str, int]  # Site.activation: (kind, layer); heads/neurons share one


def check_site(site: Site, adapter: ArchitectureAdapter, what: str = "component") -> Site:
    """``site`` if the model has it, else a one-line CausalError naming ``what``."""
    try:
        return site.check(adapter.n_layers, adapter.n_heads, adapter.n_neurons, what)
    except SumcircuitError as exc:
        raise CausalError(str(exc)) from None


def slice_width(site: Site, adapter: ArchitectureAdapter) -> int:
    """Width of one head's or one neuron's slice of its activation."""
    return adapter.head_dim if site.kind == "attn_head" else 1


def site_value(site: Site, activation: torch.Tensor, adapter: ArchitectureAdapter) -> torch.Tensor:
    """The site's part of its whole activation (a head's or a neuron's slice, else all of it)."""
    if site.index is None:
        return activation
    w = slice_width(site, adapter)
    return activation[..., site.index * w:(site.index + 1) * w]


# ---------------------------------------------------------------- hooks

def _first(output: Any) -> torch.Tensor:
    first: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return first


def _with_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _filled(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A fresh tensor shaped like ``like`` holding ``value`` (broadcast): never aliases a cache."""
    return like.new_empty(like.shape).copy_(value.to(like.dtype).expand_as(like))


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, bool]:
    """A module's first input, positional or the ``hidden_states`` keyword (decoder blocks)."""
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


class Interventions(contextlib.AbstractContextManager["Interventions"]):
    """Capture and edit activations through the adapter table; everything is undone on exit.

    ``edit`` is the primitive: a function from the activation to its new value.
    ``replace`` values broadcast against the site (a scalar 0 for zero
    ablation, a ``[head_dim]`` / ``[hidden]`` mean, or a ``[B, T, ...]`` patch).
    ``stub`` makes a decoder block return a cached output without computing.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.model, self.adapter = model, adapter
        self._handles: list[Any] = []
        self._stubbed: list[nn.Module] = []

    def edit(self, activation: Activation, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Call ``fn`` on the activation at every forward; a tensor it returns replaces the activation."""
        kind, layer = activation
        module, port = self.adapter.site_module(self.model, kind, layer)
        if port == "input":
            def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                x, positional = _input_of(args, kwargs)
                new = fn(x)
                if new is None:
                    return None
                if positional:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
                new = fn(_first(out))
                return None if new is None else _with_first(out, new)
            self._handles.append(module.register_forward_hook(post))

    def capture(self, activation: Activation, store: dict[Activation, torch.Tensor],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Store the activation (detached copy, or ``reduce`` of it) in ``store[activation]``."""
        def keep(value: torch.Tensor) -> None:
            store[activation] = reduce(value) if reduce else value.detach().clone()
        self.edit(activation, keep)

    def replace(self, values: Mapping[Site, torch.Tensor]) -> None:
        """Set each site's activation to its value (sites sharing an activation share one hook)."""
        grouped: dict[Activation, list[tuple[Site, torch.Tensor]]] = {}
        for site, value in values.items():
            grouped.setdefault(site.activation, []).append((site, value))
        for activation, items in grouped.items():
            self.edit(activation, functools.partial(self._replaced, items=items))

    def _replaced(self, x: torch.Tensor, items: list[tuple[Site, torch.Tensor]]) -> torch.Tensor:
        whole = [v for s, v in items if s.index is None]
        if whole:
            return _filled(x, whole[-1])
        x = x.clone()
        for site, value in items:
            w = slice_width(site, self.adapter)
            part = x[..., site.index * w:(site.index + 1) * w]  # type: ignore[operator]
            part.copy_(value.to(x.dtype).expand_as(part))
        return x

    def stub(self, layer: int, output: torch.Tensor) -> None:
        """Make block ``layer`` return ``output`` without computing (an instance-level forward)."""
        block = self.adapter.block(self.model, layer)
        block.forward = lambda *args, **kwargs: output
        if not any(b is block for b in self._stubbed):
            self._stubbed.append(block)

    def close(self) -> None:
        """Remove every hook and un-stub every block."""
        for handle in self._handles:
            handle.remove()
        for block in self._stubbed:
            del block.forward  # back to the class's forward
        self._handles, self._stubbed = [], []

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- loss

def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label counts: ``keep[:, t]`` iff ``labels[:, t+1] != -100``."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def per_unit(diff_times_grad: torch.Tensor, units: int) -> torch.Tensor:
    """``[B, T, W]`` -> ``[B, units]``: sum over positions and each unit's (head's, neuron's) slice of the width."""
    b, t, w = diff_times_grad.shape
    return diff_times_grad.reshape(b, t, units, w // units).sum(dim=(1, 3))


def grad_through(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook for the embedding: an output that requires grad, so activation gradients exist even with
    frozen weights."""
    return output if output.requires_grad else output.detach().requires_grad_()


def document_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], *, grad: bool = False) -> torch.Tensor:
    """Per-document mean CE over the label positions, float64 ``[B]`` (on CPU unless ``grad``).

    Logits are computed only where a label counts (``logits_to_keep`` mask),
    which saves a ``[B, T, vocab]`` tensor of up to gigabytes. ``grad=True``
    keeps the graph (attribution differentiates this very loss).
    """
    labels = batch["labels"]
    keep = loss_positions(labels)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False, logits_to_keep=keep)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    targets = labels[:, 1:][keep[:, :-1]]
    ce = F.cross_entropy(logits, targets, reduction="none").double()
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=ce.device).index_add(0, rows, ce)
    losses = sums / keep.sum(1).clamp(min=1)
    return losses if grad else losses.detach().cpu()


# ---------------------------------------------------------------- batching

def encode_examples(tokenizer: Any, data_cfg: DataConfig) -> tuple[list[Encoded], DataSource]:
    """Encode the data set; refuse documents with no summary tokens (their loss is undefined)."""
    examples = load_examples(data_cfg)
    encoded = encode_all(tokenizer, examples.examples, data_cfg, need_summary_tokens=True, source=examples.source)
    for enc, ex in zip(encoded, examples.examples):
        if not any(t != IGNORE_INDEX for t in enc.labels[1:]):
            raise CausalError(f"{ex.where}: no summary tokens to score (check `template` / `max_tokens`)")
    return encoded, examples.source


def batches(encoded: Sequence[Encoded], batch_size: int, pad_token_id: int,
            device: torch.device | str, *, shard: bool = False) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Right-padded batches of similar length (longest first); yields original indices too.

    ``shard``: only this process's batches under N processes (batch ``b`` goes
    to rank ``b % N``): the batches themselves are those of one process, so
    every per-document loss is computed on the same padded batch either way.
    """
    if batch_size < 1:
        raise CausalError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    starts = list(range(0, len(order), batch_size))
    for b in (dist.my_blocks(len(starts)) if shard else range(len(starts))):
        idx = order[starts[b]:starts[b] + batch_size]
        batch = collate([encoded[i] for i in idx], pad_token_id, "right")
        yield idx, {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def n_batches(n: int, batch_size: int, shard: bool = False) -> int:
    """How many batches this process runs (all of them, or its share under N processes)."""
    total = math.ceil(n / batch_size)
    return len(dist.my_blocks(total)) if shard else total


@dataclass
class CostCounter:
    """Forward passes run, and decoder layers computed (``layer_evals / n_layers`` = full-forward equivalents)."""

    forwards: int = 0
    layer_evals: int = 0
    batches: int = 0
    backwards: int = 0

    def add(self, n_layers_run: int) -> None:
        """Count one forward that computed ``n_layers_run`` layers."""
        self.forwards += 1
        self.layer_evals += n_layers_run

    def reduced(self) -> CostCounter:
        """Totals over all processes (each counted only its own batches)."""
        t = dist.all_reduce_sum(torch.tensor([self.forwards, self.layer_evals, self.batches, self.backwards],
                                             dtype=torch.float64))
        return CostCounter(*(int(v) for v in t.tolist()))

    def summary(self, n_layers: int) -> dict[str, float]:
        """Forwards and full-forward equivalents per batch (what every cost row states)."""
        b = max(self.batches, 1)
        return {"batches": self.batches, "forwards": self.forwards, "backwards": self.backwards,
                "forwards_per_batch": self.forwards / b,
                "full_forward_equivalents_per_batch": self.layer_evals / n_layers / b}


def run_intervened(model: nn.Module, adapter: ArchitectureAdapter, batch: Mapping[str, torch.Tensor],
                   values: Mapping[Site, torch.Tensor], blocks: Mapping[int, torch.Tensor] | None,
                   cost: CostCounter) -> torch.Tensor:
    """Per-document losses with ``values`` replaced; layers below the first edit replayed from ``blocks``.

    ``blocks`` holds this model's clean block outputs on ``batch`` (None: compute everything).
    A ``resid_post`` site is served by stubbing that block with its value.
    """
    first = min((s.layer for s in values), default=0)
    start = first if blocks is not None else 0
    with Interventions(model, adapter) as iv:
        for layer in range(start):
            iv.stub(layer, blocks[layer])  # type: ignore[index]
        stubbed = {s.layer for s in values if s.kind == "resid_post"}
        for site, value in values.items():
            if site.kind == "resid_post":
                iv.stub(site.layer, value)
        iv.replace({s: v for s, v in values.items() if s.kind != "resid_post"})
        losses = document_losses(model, batch)
    cost.add(adapter.n_layers - start - len(stubbed - set(range(start))))
    return losses


def clean_run(model: nn.Module, adapter: ArchitectureAdapter, batch: Mapping[str, torch.Tensor],
              activations: Sequence[Activation], cost: CostCounter) -> tuple[torch.Tensor, dict[Activation, torch.Tensor]]:
    """One forward that returns the losses and caches the given activations (block outputs for replay, donors)."""
    store: dict[Activation, torch.Tensor] = {}
    with Interventions(model, adapter) as iv:
        for activation in activations:
            iv.capture(activation, store)
        losses = document_losses(model, batch)
    cost.add(adapter.n_layers)
    return losses, store


def block_activations(adapter: ArchitectureAdapter) -> list[Activation]:
    """Every block's output: the cache an edited run replays its unchanged prefix from."""
    return [("resid_post", layer) for layer in range(adapter.n_layers)]


def sum_over_processes(values: Any) -> Any:
    """Per-document arrays that each process filled at its own documents (zeros elsewhere), combined.

    Every document is computed by exactly one process and ``x + 0 == x``, so
    the sum is the single-process array bit for bit, on every process.
    """
    if not dist.is_distributed():
        return values
    return dist.all_reduce_sum(torch.from_numpy(values)).numpy()


def check_pair(base: LoadedModel, tuned: LoadedModel) -> None:
    """Patching swaps activations position by position: same tokenizer and shapes are required."""
    a, b = base.adapter.describe(), tuned.adapter.describe()
    keys = ("family", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size", "n_neurons")
    diff = [f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]]
    if diff:
        raise CausalError(f"base {base.source.spec} and tuned {tuned.source.spec} have different "
                          f"architectures ({'; '.join(diff)}): they must have the same architecture")
    tb, tt = base.tokenizer, tuned.tokenizer
    if tb.get_vocab() != tt.get_vocab() or (tb.eos_token_id, tb.pad_token_id) != (tt.eos_token_id, tt.pad_token_id):
        raise CausalError(f"base {base.source.spec} and tuned {tuned.source.spec} have different "
                          "tokenizers: both models must see the same token ids")
