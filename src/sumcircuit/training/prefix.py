"""The frozen prefix: layers below the lowest trainable one, computed once per input and reused.

Targeted LoRA adapts a few layers (the ``cpu`` study's KL circuit: 21, 22 and
28 of 30). Every layer below the lowest adapted one has frozen weights, so the
residual stream entering that layer depends on the input alone. Validation
feeds the same batches at every evaluation, and a run of several epochs sees
every document once per epoch; recomputing their prefix each time is pure
waste. :class:`PrefixCache` keeps the residual stream entering layer
``start`` and, on a hit, runs the model with that tensor fed in there while
the layers below return their input untouched (embeddings and position
tables still run: they are cheap and the layers above need them).

* Validation batches are keyed by their index and stored whole, so a hit
  feeds layer ``start`` the very tensor the first evaluation computed:
  validation losses are bitwise the same as without the cache.
* Training rows are keyed by their tokens and computed one document at a
  time, so a document's prefix is the same whatever batch it falls in,
  however the epochs shuffle it, and after a resume (resume stays bitwise).
  That differs from the padded batch by float rounding only; it is switched
  on only where the data repeat (more than one epoch) and no dropout acts
  below ``start`` (dropout would make the prefix random).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sumcircuit.errors import ModelError


class _Captured(Exception):
    """Stops a forward pass once the prefix's output has been captured."""


def frozen_prefix(model: nn.Module, layers: Iterable[nn.Module]) -> int:
    """How many leading layers have no trainable parameter; 0 when anything outside the layers trains
    (e.g. the embeddings of full fine-tuning), or when nothing does."""
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    trainable = [layer_of.get(id(p)) for p in model.parameters() if p.requires_grad]
    if not trainable or any(i is None for i in trainable):
        return 0
    return min(i for i in trainable if i is not None)


def prefix_dropout(config: Any, dropout_fields: Sequence[str], layers: Iterable[nn.Module]) -> bool:
    """Whether dropout can act on the embeddings or the prefix layers in training mode (adapter table's
    config fields, and any ``nn.Dropout`` module in the prefix)."""
    if any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in dropout_fields):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for layer in layers for m in layer.modules())


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"a decoder layer's input is {type(hidden).__name__}, not a tensor")
    return hidden


@dataclass
class PrefixCache:
    """The residual stream entering layer ``start`` for inputs seen before, within a memory budget."""

    layers: nn.ModuleList
    start: int
    budget_bytes: int
    store: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    used_bytes: int = 0
    hits: int = 0
    misses: int = 0

    def lookup(self, key: Hashable) -> torch.Tensor | None:
        """The kept tensor for ``key`` (counted as a hit), or None (counted as a miss)."""
        hidden = self.store.get(key)
        if hidden is None:
            self.misses += 1
        else:
            self.hits += 1
        return hidden

    def keep(self, key: Hashable, hidden: torch.Tensor) -> None:
        """Store ``hidden`` under ``key`` if the budget allows (else it is simply recomputed next time)."""
        if self.used_bytes + hidden.nbytes <= self.budget_bytes:
            self.store[key] = hidden
            self.used_bytes += hidden.nbytes

    @contextmanager
    def capture(self, *, stop: bool) -> Iterator[list[torch.Tensor]]:
        """Record layer ``start``'s input during the next forward; ``stop``: end the pass there."""
        got: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got.append(_hidden_arg(args, kwargs).detach())
            if stop:
                raise _Captured

        def returns_tensor(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor):  # the identity stand-ins of feed() return a tensor
                raise ModelError(f"the frozen-prefix cache needs decoder layers that return a tensor; layer "
                                 f"{self.start - 1} returns {type(output).__name__} (this transformers version); "
                                 "set prefix_cache_gb 0 (--prefix-cache-gb 0)")

        handles = [self.layers[self.start].register_forward_pre_hook(hook, with_kwargs=True),
                   self.layers[self.start - 1].register_forward_hook(returns_tensor)]
        try:
            yield got
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def feed(self, hidden: torch.Tensor) -> Iterator[None]:
        """Run the model with ``hidden`` as layer ``start``'s input; the layers below return their input."""

        def identity(*args: Any, **kwargs: Any) -> torch.Tensor:
            return _hidden_arg(args, kwargs)

        def substitute(module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

        below = self.layers[:self.start]
        saved = [layer.__dict__.get("forward") for layer in below]  # accelerate may have wrapped forward
        handle = self.layers[self.start].register_forward_pre_hook(substitute, with_kwargs=True)
        for layer in below:
            layer.forward = identity
        try:
            yield
        finally:
            handle.remove()
            for layer, old in zip(below, saved, strict=True):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old

    def summary(self) -> dict[str, Any]:
        """What the cache did, for train_summary.json."""
        return {"start_layer": self.start, "entries": len(self.store), "megabytes": self.used_bytes / 2**20,
                "hits": self.hits, "misses": self.misses}


def rows_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """One key per row of a right-padded batch: its real tokens."""
    lengths = attention_mask.sum(dim=1).tolist()
    ids = input_ids.cpu()
    return [ids[row, :n].numpy().tobytes() for row, n in enumerate(lengths)]


@contextmanager
def recurring(cache: PrefixCache, key: Hashable) -> Iterator[None]:
    """Around the forward of a batch that recurs under ``key`` (validation): the first time its prefix is
    kept, later it is fed back, so whatever the forward computes is bitwise the same."""
    hidden = cache.lookup(key)
    if hidden is not None:
        with cache.feed(hidden):
            yield
        return
    with cache.capture(stop=False) as got:
        yield
    if got:
        cache.keep(key, got[0])


def document_states(cache: PrefixCache, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer ``start``'s input for a right-padded training batch, each document's prefix computed alone
    (once, then kept): the same for a document in any batch, epoch or resumed run. Padding stays zero;
    no real position attends to it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = []
    for row, key in enumerate(rows_key(ids, mask)):
        hidden = cache.lookup(key)
        if hidden is None:
            n = int(mask[row].sum())
            with torch.no_grad(), cache.capture(stop=True) as got:
                model(input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n], use_cache=False)
            hidden = got[0][0]
            cache.keep(key, hidden)
        rows.append(hidden)
    out = rows[0].new_zeros((len(rows), ids.shape[1], rows[0].shape[-1]))
    for row, hidden in enumerate(rows):
        out[row, :hidden.shape[0]] = hidden
    return out


def make_prefix_cache(model: nn.Module, layers: nn.ModuleList, config: Any, dropout_fields: Sequence[str],
                      budget_gb: float, *, data_repeat: bool) -> tuple[PrefixCache | None, bool]:
    """The run's cache (None without a frozen prefix or budget) and whether training rows use it too:
    only where the documents repeat (more than one epoch) and no dropout acts on the prefix."""
    start = frozen_prefix(model, layers)
    if start == 0 or budget_gb <= 0:
        return None, False
    cache = PrefixCache(layers, start, int(budget_gb * 2**30))
    return cache, data_repeat and not prefix_dropout(config, dropout_fields, layers[:start])
