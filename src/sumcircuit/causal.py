"""Causal tests of a circuit: ablation and activation patching.

The paper picked its "summarization circuit" from correlational change scores
only. This module asks the causal questions directly:

* **ablation** -- replace attention heads (or whole attention / MLP blocks)
  by zero or by their data-set mean and measure how much the teacher-forced
  summary loss rises; repeat on random sets of the same size so the circuit's
  effect is read against a null distribution (empirical p-value);
* **activation patching** -- run the base model with one component's output
  taken from the tuned model on the same input (and the reverse), and report
  the fraction of the base-to-tuned loss gap that this recovers.

All module lookups go through :class:`~sumcircuit.adapters.ArchitectureAdapter`:

=========  ==========================================================
component  activation that is read or replaced
=========  ==========================================================
``head``   slice ``h*head_dim:(h+1)*head_dim`` of the *input* of
           ``adapter.attention_output(model, l)`` (o_proj / c_proj)
``attn``   what attention adds to the residual stream: the output of
           ``adapter.attention(model, l)`` (first element), or of its
           post-norm where the family has one (Gemma 2/3)
``mlp``    what the MLP adds: ``adapter.mlp(model, l)`` output (or post-norm)
``block``  output of the decoder block ``adapter.block(model, l)``
=========  ==========================================================

Loss: the mean cross-entropy over the positions whose label is not -100
(the data module's summary tokens and closing EOS), **per document**, so
every confidence interval is a percentile bootstrap over documents (seeded).

Cost: a component at layer ``l`` can only change layers ``>= l``, so a
patched or ablated run replays layers ``< l`` from the cached clean run (the
blocks return their cached outputs without computing) and computes only
layers ``l..L-1``. Layer-level patching therefore costs 2 clean forwards plus
about ``L`` full-forward equivalents per direction and batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_write_csv, atomic_write_json, read_json
from sumcircuit.data import IGNORE_INDEX, DataConfig, Encoded, collate, encode_all, load_examples
from sumcircuit.errors import SumcircuitError
from sumcircuit.models import LoadedModel, load_model
from sumcircuit.provenance import provenance

KINDS = ("head", "attn", "mlp", "block")
ABLATION_MODES = ("zero", "mean")
LAYER_COMPONENTS = ("attn", "mlp", "both")
CONTROL_POOLS = ("all", "complement")
GRANULARITIES = ("layer", "head", "block")
# denoise: run base, insert tuned's activation (is the component sufficient?)
# noise:   run tuned, insert base's activation (is the component necessary?)
DIRECTIONS = ("denoise", "noise")


class CausalError(SumcircuitError):
    """Bad ablation / patching input: a head or layer that does not exist, mismatched models."""


# ---------------------------------------------------------------- components

@dataclass(frozen=True, order=True)
class Component:
    """One site of the network: a head, an attention or MLP block, or a whole decoder block."""

    layer: int
    kind: str
    head: int = -1

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}" if self.kind == "head" else f"L{self.layer}.{self.kind}"

    @property
    def site(self) -> tuple[str, int]:
        """Where its activation lives: heads share their layer's o_proj input."""
        return ("head_input" if self.kind == "head" else self.kind, self.layer)


def check_component(c: Component, adapter: ArchitectureAdapter, flag: str = "component") -> None:
    label = f"{c.layer}.{c.head}" if c.kind == "head" else str(c.layer)  # as the user typed it
    if c.kind not in KINDS:
        raise CausalError(f"{flag} {c.name}: unknown kind '{c.kind}' (one of {', '.join(KINDS)})")
    if not 0 <= c.layer < adapter.n_layers:
        raise CausalError(f"{flag} {label}: layer {c.layer} out of range: the model has "
                          f"{adapter.n_layers} layers (0..{adapter.n_layers - 1})")
    if c.kind == "head" and not 0 <= c.head < adapter.n_heads:
        raise CausalError(f"{flag} {label}: head {c.head} out of range: the model has "
                          f"{adapter.n_heads} attention heads per layer (0..{adapter.n_heads - 1})")


def parse_heads(text: str, adapter: ArchitectureAdapter | None = None) -> list[Component]:
    """``"2.3,5.0"`` -> heads (layer 2 head 3, layer 5 head 0); checked against the model if given."""
    heads: list[Component] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise CausalError(f"--heads {item}: expected LAYER.HEAD, e.g. 3.1")
        comp = Component(int(parts[0]), "head", int(parts[1]))
        if adapter is not None:
            check_component(comp, adapter, "--heads")
        heads.append(comp)
    if not heads:
        raise CausalError("--heads is empty")
    return sorted(set(heads))


def parse_layers(text: str, adapter: ArchitectureAdapter | None = None, flag: str = "--layers") -> list[int]:
    """``"2,3,5"`` or ``"2-5"`` -> layer indices, checked against the model if given."""
    layers: set[int] = set()
    for item in (t.strip() for t in text.split(",") if t.strip()):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise CausalError(f"{flag} {item}: expected a layer index or a range like 2-5")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers:
        raise CausalError(f"{flag} is empty")
    if adapter is not None:
        for layer in sorted(layers):
            if not 0 <= layer < adapter.n_layers:
                raise CausalError(f"{flag} {layer}: out of range: the model has {adapter.n_layers} "
                                  f"layers (0..{adapter.n_layers - 1})")
    return sorted(layers)


def layer_components(layers: Sequence[int], component: str) -> list[Component]:
    kinds = ("attn", "mlp") if component == "both" else (component,)
    return [Component(layer, kind) for layer in layers for kind in kinds]


# ---------------------------------------------------------------- hooks

def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _filled(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A fresh tensor shaped like ``like`` holding ``value`` (broadcast): never aliases a cache."""
    return like.new_empty(like.shape).copy_(value.to(like.dtype).expand_as(like))


class Interventions(contextlib.AbstractContextManager["Interventions"]):
    """Capture and replace activations through the adapter; everything is undone on exit.

    ``replace`` values broadcast against the activation (a scalar 0 for zero
    ablation, a ``[head_dim]`` / ``[hidden]`` mean, or a ``[B, T, ...]`` patch).
    ``stub`` makes a decoder block return a cached output without computing:
    that is how runs skip the layers an intervention cannot change.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.model, self.adapter = model, adapter
        self._handles: list[Any] = []
        self._stubbed: list[nn.Module] = []

    def _module(self, kind: str, layer: int) -> nn.Module:
        if kind == "head_input":
            return self.adapter.attention_output(self.model, layer)
        if kind == "attn":
            return self.adapter.attention_contribution(self.model, layer)
        if kind == "mlp":
            return self.adapter.mlp_contribution(self.model, layer)
        return self.adapter.block(self.model, layer)

    def capture(self, site: tuple[str, int], store: dict[tuple[str, int], torch.Tensor],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Store the site's activation (or ``reduce`` of it) in ``store[site]`` on every forward."""
        kind, layer = site
        module = self._module(kind, layer)

        def keep(value: torch.Tensor) -> None:
            store[site] = reduce(value) if reduce else value.detach().clone()

        if kind == "head_input":
            self._handles.append(module.register_forward_pre_hook(lambda m, args: keep(args[0])))
        else:
            self._handles.append(module.register_forward_hook(lambda m, args, out: keep(_first(out))))

    def replace(self, values: Mapping[Component, torch.Tensor]) -> None:
        """Set each component's activation to its value (heads of one layer share one hook)."""
        heads: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for comp, value in values.items():
            if comp.kind == "head":
                heads.setdefault(comp.layer, []).append((comp.head, value))
            else:
                module = self._module(comp.kind, comp.layer)
                self._handles.append(module.register_forward_hook(
                    lambda m, args, out, v=value: _with_first(out, _filled(_first(out), v))))
        dim = self.adapter.head_dim
        for layer, items in heads.items():
            def pre_hook(m: nn.Module, args: tuple[Any, ...], items: list[tuple[int, torch.Tensor]] = items) -> Any:
                x = args[0].clone()
                for head, value in items:
                    x[..., head * dim:(head + 1) * dim] = value.to(x.dtype)
                return (x, *args[1:])
            self._handles.append(self.adapter.attention_output(self.model, layer)
                                 .register_forward_pre_hook(pre_hook))

    def stub(self, layer: int, output: torch.Tensor) -> None:
        """Make block ``layer`` return ``output`` without computing (an instance-level forward)."""
        block = self.adapter.block(self.model, layer)
        block.forward = lambda *args, **kwargs: output  # type: ignore[method-assign]
        if not any(b is block for b in self._stubbed):
            self._stubbed.append(block)

    def close(self) -> None:
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


def document_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-document mean CE over the label positions, in float64 ``[B]``.

    Logits are computed only where a label counts (``logits_to_keep`` mask),
    which saves a ``[B, T, vocab]`` tensor of up to gigabytes.
    """
    labels = batch["labels"]
    keep = loss_positions(labels)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False, logits_to_keep=keep)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    targets = labels[:, 1:][keep[:, :-1]]
    ce = F.cross_entropy(logits, targets, reduction="none").double()
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=ce.device).index_add_(0, rows, ce)
    return (sums / keep.sum(1).clamp(min=1)).cpu()


# ---------------------------------------------------------------- batching

def encode_examples(tokenizer: Any, data_cfg: DataConfig) -> tuple[list[Encoded], Any]:
    """Encode the data set; refuse documents with no summary tokens (their loss is undefined)."""
    examples = load_examples(data_cfg)
    encoded = encode_all(tokenizer, examples.examples, data_cfg)
    for enc, ex in zip(encoded, examples.examples):
        if not any(t != IGNORE_INDEX for t in enc.labels[1:]):
            raise CausalError(f"{ex.where}: no summary tokens to score (check --template / --max-tokens)")
    return encoded, examples.source


def batches(encoded: Sequence[Encoded], batch_size: int, pad_token_id: int,
            device: torch.device | str, *, shard: bool = False) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Right-padded batches of similar length (longest first); yields original indices too.

    ``shard``: only this process's batches under N processes (batch ``b`` goes
    to rank ``b % N``): the batches themselves are those of one process, so
    every per-document loss is computed on the same padded batch either way.
    """
    if batch_size < 1:
        raise CausalError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    starts = list(range(0, len(order), batch_size))
    for b in (dist.my_blocks(len(starts)) if shard else range(len(starts))):
        idx = order[starts[b]:starts[b] + batch_size]
        batch = collate([encoded[i] for i in idx], pad_token_id, "right")
        yield idx, {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def _n_batches(n: int, batch_size: int, shard: bool = False) -> int:
    total = math.ceil(n / batch_size)
    return len(dist.my_blocks(total)) if shard else total


@dataclass
class CostCounter:
    """Forward passes run, and decoder layers computed (``layer_evals / n_layers`` = full-forward equivalents)."""

    forwards: int = 0
    layer_evals: int = 0
    batches: int = 0

    def add(self, n_layers_run: int) -> None:
        self.forwards += 1
        self.layer_evals += n_layers_run

    def reduced(self) -> "CostCounter":
        """Totals over all processes (each counted only its own batches)."""
        t = dist.all_reduce_sum(torch.tensor([self.forwards, self.layer_evals, self.batches], dtype=torch.float64))
        return CostCounter(*(int(v) for v in t.tolist()))

    def summary(self, n_layers: int) -> dict[str, float]:
        b = max(self.batches, 1)
        return {"batches": self.batches, "forwards": self.forwards,
                "forwards_per_batch": self.forwards / b,
                "full_forward_equivalents_per_batch": self.layer_evals / n_layers / b}


def run_intervened(model: nn.Module, adapter: ArchitectureAdapter, batch: Mapping[str, torch.Tensor],
                   values: Mapping[Component, torch.Tensor], blocks: Mapping[int, torch.Tensor] | None,
                   cost: CostCounter) -> torch.Tensor:
    """Per-document losses with ``values`` replaced; layers below the first edit replayed from ``blocks``.

    ``blocks`` holds this model's clean block outputs on ``batch`` (None: compute everything).
    A ``block`` component is served by stubbing that block with its value.
    """
    start = min((c.layer for c in values), default=0) if blocks is not None else 0
    with Interventions(model, adapter) as iv:
        for layer in range(start):
            iv.stub(layer, blocks[layer])  # type: ignore[index]
        stubbed = {c.layer for c in values if c.kind == "block"}
        for comp, value in values.items():
            if comp.kind == "block":
                iv.stub(comp.layer, value)
        iv.replace({c: v for c, v in values.items() if c.kind != "block"})
        losses = document_losses(model, batch)
    cost.add(adapter.n_layers - start - len(stubbed - set(range(start))))
    return losses


def clean_run(model: nn.Module, adapter: ArchitectureAdapter, batch: Mapping[str, torch.Tensor],
              sites: Sequence[tuple[str, int]], cost: CostCounter) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor]]:
    """One forward that returns the losses and caches the given sites (block outputs for replay, donors)."""
    store: dict[tuple[str, int], torch.Tensor] = {}
    with Interventions(model, adapter) as iv:
        for site in sites:
            iv.capture(site, store)
        losses = document_losses(model, batch)
    cost.add(adapter.n_layers)
    return losses, store


# ---------------------------------------------------------------- statistics

def bootstrap_indices(n_docs: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``[n_bootstrap, n_docs]`` document resamples, from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_bootstrap, n_docs))


def resampled_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Means over each resample of the last axis of ``values`` (``[..., D]`` -> ``[..., n_boot]``).

    Uses resample counts, so memory is ``n_boot x D`` however many rows ``values`` has.
    """
    n_boot, n_docs = idx.shape
    counts = np.zeros((n_boot, n_docs))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return values @ counts.T / n_docs


def percentile_ci(samples: np.ndarray, ci: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - ci) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


def mean_ci(values: np.ndarray, idx: np.ndarray, ci: float) -> dict[str, float]:
    """Mean of per-document values with a percentile bootstrap CI over documents."""
    lo, hi = percentile_ci(values[idx].mean(axis=1), ci)
    return {"mean": float(values.mean()), "ci_low": lo, "ci_high": hi}


def empirical_p_value(circuit_effect: float, random_effects: Sequence[float] | np.ndarray) -> float:
    """``(1 + #{random >= circuit}) / (N + 1)``: never 0, exact under exchangeability."""
    effects = np.asarray(random_effects, dtype=float)
    return float((1 + np.sum(effects >= circuit_effect)) / (effects.size + 1))


def recovery(loss_base: np.ndarray, loss_tuned: np.ndarray, loss_patched: np.ndarray) -> float:
    """``(L_base - L_patched) / (L_base - L_tuned)`` on the means over documents."""
    gap = loss_base.mean() - loss_tuned.mean()
    return float((loss_base.mean() - loss_patched.mean()) / gap) if gap != 0 else float("nan")


def recovery_ci(loss_base: np.ndarray, loss_tuned: np.ndarray, loss_patched: np.ndarray,
                idx: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile bootstrap of the ratio of means, resampling documents (paired across models)."""
    b, t, p = loss_base[idx].mean(1), loss_tuned[idx].mean(1), loss_patched[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_ci((b - p) / (b - t), ci)


# ---------------------------------------------------------------- ablation

@dataclass(frozen=True)
class AblationConfig:
    """What to ablate and how. Exactly one of ``heads`` / ``layers`` (a circuit file fills one)."""

    heads: tuple[tuple[int, int], ...] = ()
    layers: tuple[int, ...] = ()
    component: str = "attn"  # for layers: attn | mlp | both
    mode: str = "zero"  # zero | mean (mean over valid tokens of the data set, first pass)
    random_controls: int = 0
    control_pool: str = "all"  # random sets drawn from all components, or from those outside the circuit
    seed: int = 0
    batch_size: int = 4
    n_bootstrap: int = 1000
    ci: float = 0.95
    rouge: bool = False  # also ROUGE of greedy summaries, clean vs ablated (slow: generation)
    rouge_max_new_tokens: int = 128
    circuit: str | None = None  # circuit.json: its layers (or heads) are the target when none are given
    circuit_part: str = "layers"  # which part of the circuit file to ablate: layers | heads
    adapter: str | None = None  # PEFT adapter folder to merge into the model
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False


def circuit_targets(path: str | Path, part: str = "layers") -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(layers, heads) from a circuit.json written by ``sumcircuit circuit``."""
    try:
        circuit = read_json(path)
    except (OSError, ValueError) as exc:
        raise CausalError(f"--circuit {path}: cannot read circuit file: {exc}") from exc
    if part == "heads":
        heads = circuit.get("heads") or []
        if not heads:
            raise CausalError(f"--circuit {path}: has no heads (select them with `sumcircuit circuit --top-heads K`)")
        return (), tuple((int(l), int(h)) for l, h in heads)
    layers = circuit.get("layers") or []
    if not layers:
        raise CausalError(f"--circuit {path}: has no layers")
    return tuple(int(l) for l in layers), ()


def ablation_targets(cfg: AblationConfig, adapter: ArchitectureAdapter) -> list[Component]:
    if cfg.circuit and not cfg.heads and not cfg.layers:
        if cfg.circuit_part not in ("layers", "heads"):
            raise CausalError(f"--circuit-part {cfg.circuit_part}: choose layers or heads")
        layers, heads = circuit_targets(cfg.circuit, cfg.circuit_part)
        cfg = replace(cfg, layers=layers, heads=heads)
    if bool(cfg.heads) == bool(cfg.layers):
        raise CausalError("give exactly one of --heads, --layers or --circuit")
    if cfg.mode not in ABLATION_MODES:
        raise CausalError(f"--mode {cfg.mode}: choose one of {', '.join(ABLATION_MODES)}")
    if cfg.component not in LAYER_COMPONENTS:
        raise CausalError(f"--component {cfg.component}: choose one of {', '.join(LAYER_COMPONENTS)}")
    if cfg.control_pool not in CONTROL_POOLS:
        raise CausalError(f"--control-pool {cfg.control_pool}: choose one of {', '.join(CONTROL_POOLS)}")
    if cfg.heads:
        comps = sorted({Component(l, "head", h) for l, h in cfg.heads})
        for c in comps:
            check_component(c, adapter, "--heads")
        return comps
    for layer in cfg.layers:
        check_component(Component(layer, "attn"), adapter, "--layers")
    return layer_components(sorted(set(cfg.layers)), cfg.component)


def random_sets(targets: Sequence[Component], adapter: ArchitectureAdapter, n: int, seed: int,
                pool: str = "all") -> list[list[Component]]:
    """``n`` random sets of the same size: as many heads, or as many layers (same block kinds).

    Drawn uniformly without replacement within a set, independently across
    sets, from all heads/layers (``pool='all'``, the circuit is one possible
    draw) or from those outside the circuit (``'complement'``).
    """
    rng = np.random.default_rng(seed)
    if targets and targets[0].kind == "head":
        units = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
        chosen = {(c.layer, c.head) for c in targets}
        k = len(chosen)
        make: Callable[[list[Any]], list[Component]] = lambda picks: sorted(Component(l, "head", h) for l, h in picks)
    else:
        units = list(range(adapter.n_layers))
        chosen = {c.layer for c in targets}
        k = len(chosen)
        kinds = sorted({c.kind for c in targets})
        make = lambda picks: sorted(Component(l, kind) for l in picks for kind in kinds)
    if pool == "complement":
        units = [u for u in units if u not in chosen]
    if k > len(units):
        raise CausalError(f"cannot draw random sets of {k} from a pool of {len(units)} "
                          f"({'heads' if targets[0].kind == 'head' else 'layers'}, --control-pool {pool})")
    return [make([units[i] for i in sorted(rng.choice(len(units), size=k, replace=False))]) for _ in range(n)]


def dataset_means(model: nn.Module, adapter: ArchitectureAdapter, encoded: Sequence[Encoded],
                  components: Sequence[Component], batch_size: int, pad_token_id: int,
                  device: str | torch.device) -> dict[Component, torch.Tensor]:
    """Mean activation of each component over all non-padding tokens of the data set (float64 sums).

    Under N processes each sums its own batches; sums and counts are then
    combined over processes before dividing, so every process ablates with the
    data-set mean, not its shard's.
    """
    sites = sorted({c.site for c in components})
    sums: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    for _, batch in tqdm(batches(encoded, batch_size, pad_token_id, device, shard=True), desc="mean activations",
                         total=_n_batches(len(encoded), batch_size, shard=True), leave=False,
                         disable=not dist.is_main_process()):
        mask = batch["attention_mask"].bool()
        store: dict[tuple[str, int], torch.Tensor] = {}
        with Interventions(model, adapter) as iv, torch.no_grad():
            for site in sites:
                iv.capture(site, store, reduce=lambda x, m=mask: x[m].double().sum(0))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False, logits_to_keep=1)
        for site, value in store.items():
            sums[site] = sums[site] + value if site in sums else value
        count += int(mask.sum())
    sums, count = _combine_sums(sums, count, device)
    dim = adapter.head_dim
    means: dict[Component, torch.Tensor] = {}
    for c in components:
        total = sums[c.site] / count
        if c.kind == "head":
            total = total[c.head * dim:(c.head + 1) * dim]
        means[c] = total.float()
    return means


def _combine_sums(sums: dict[tuple[str, int], torch.Tensor], count: int,
                  device: str | torch.device) -> tuple[dict[tuple[str, int], torch.Tensor], int]:
    """Per-site sums and the token count added over processes (in rank order, float64)."""
    if not dist.is_distributed():
        return sums, count
    parts = dist.all_gather_objects(({k: v.cpu() for k, v in sums.items()}, count))
    total: dict[tuple[str, int], torch.Tensor] = {}
    for part_sums, _ in parts:  # a process without batches contributes nothing
        for site, value in part_sums.items():
            total[site] = total[site] + value if site in total else value
    return {k: v.to(device) for k, v in total.items()}, sum(c for _, c in parts)


def _ablation_values(components: Sequence[Component], mode: str,
                     means: Mapping[Component, torch.Tensor], device: str | torch.device) -> dict[Component, torch.Tensor]:
    if mode == "zero":
        return {c: torch.zeros((), device=device) for c in components}
    return {c: means[c] for c in components}


@dataclass
class AblationResult:
    """Per-document losses: ``clean [D]`` and ``ablated [S, D]`` for the circuit (row 0) and each random set."""

    doc_ids: list[str]
    sets: list[list[Component]]
    clean: np.ndarray
    ablated: np.ndarray
    cost: CostCounter
    wall_s: float
    means: dict[Component, torch.Tensor] = field(default_factory=dict)


def ablate(loaded: LoadedModel, encoded: Sequence[Encoded], cfg: AblationConfig) -> AblationResult:
    """Ablate the target set (and the random controls) and collect per-document losses.

    Per batch: 1 clean forward (caching block outputs) + 1 ablated forward per
    set, each computing only the layers from the set's first layer on.
    """
    model, adapter = loaded.model, loaded.adapter
    targets = ablation_targets(cfg, adapter)
    sets = [targets] + random_sets(targets, adapter, cfg.random_controls, cfg.seed, cfg.control_pool)
    device = next(model.parameters()).device
    pad = int(loaded.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    means: dict[Component, torch.Tensor] = {}
    if cfg.mode == "mean":
        needed = sorted({c for s in sets for c in s})
        means = {c: v.to(device) for c, v in
                 dataset_means(model, adapter, encoded, needed, cfg.batch_size, pad, device).items()}
    clean = np.zeros(len(encoded))
    ablated = np.zeros((len(sets), len(encoded)))
    cost = CostCounter()
    block_sites = [("block", layer) for layer in range(adapter.n_layers)]
    with torch.no_grad():
        for idx, batch in tqdm(batches(encoded, cfg.batch_size, pad, device, shard=True), desc="ablation",
                               total=_n_batches(len(encoded), cfg.batch_size, shard=True),
                               disable=not dist.is_main_process()):
            cost.batches += 1
            losses, cache = clean_run(model, adapter, batch, block_sites, cost)
            clean[idx] = losses.numpy()
            blocks = {layer: cache[("block", layer)] for layer in range(adapter.n_layers)}
            for s, comps in enumerate(sets):
                values = _ablation_values(comps, cfg.mode, means, device)
                ablated[s, idx] = run_intervened(model, adapter, batch, values, blocks, cost).numpy()
    clean, ablated = _sum_over_processes(clean), _sum_over_processes(ablated)
    return AblationResult([e.doc_id for e in encoded], sets, clean, ablated, cost.reduced(),
                          time.perf_counter() - t0, {k: v.cpu() for k, v in means.items()})


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Per-document arrays that each process filled at its own documents (zeros elsewhere), combined.

    Every document is computed by exactly one process and ``x + 0 == x``, so
    the sum is the single-process array bit for bit, on every process.
    """
    if not dist.is_distributed():
        return values
    return dist.all_reduce_sum(torch.from_numpy(values)).numpy()


def summarize_ablation(result: AblationResult, cfg: AblationConfig) -> dict[str, Any]:
    """Effects (mean loss increase) with CIs, the random-control distribution and the p-value.

    The p-value's CI comes from the same document resamples applied to the
    circuit and every control (paired): it shows how much the conclusion
    depends on which documents were scored.
    """
    idx = bootstrap_indices(len(result.clean), cfg.n_bootstrap, cfg.seed)
    effects = result.ablated - result.clean[None, :]  # [S, D]
    rows = []
    for s, comps in enumerate(result.sets):
        eff = mean_ci(effects[s], idx, cfg.ci)
        rows.append({"set": "circuit" if s == 0 else f"random_{s - 1}",
                     "members": " ".join(c.name for c in comps), "size": len(comps),
                     "loss_clean": float(result.clean.mean()), "loss_ablated": float(result.ablated[s].mean()),
                     "effect": eff["mean"], "effect_ci_low": eff["ci_low"], "effect_ci_high": eff["ci_high"]})
    out: dict[str, Any] = {
        "circuit": {**rows[0], "members": [c.name for c in result.sets[0]]},
        "n_docs": len(result.clean),
        "loss_clean": mean_ci(result.clean, idx, cfg.ci),
        "effect_definition": "mean over documents of (ablated loss - clean loss); loss = mean CE over "
                             "summary tokens (labels != -100) of one document; CIs: percentile "
                             f"bootstrap over documents ({cfg.n_bootstrap} resamples, seed {cfg.seed})",
    }
    if len(result.sets) > 1:
        rand = effects[1:].mean(axis=1)
        boot = resampled_means(effects, idx)  # [S, n_boot]
        boot_p = np.array([empirical_p_value(boot[0, b], boot[1:, b]) for b in range(boot.shape[1])])
        p_lo, p_hi = percentile_ci(boot_p, cfg.ci)
        circuit_effect = float(effects[0].mean())
        out["random_controls"] = {
            "n": len(result.sets) - 1, "pool": cfg.control_pool, "seed": cfg.seed,
            "effect_mean": float(rand.mean()), "effect_std": float(rand.std(ddof=1)) if rand.size > 1 else 0.0,
            "effect_quantiles": {str(q): float(np.quantile(rand, q)) for q in (0.025, 0.25, 0.5, 0.75, 0.975)},
            "p_value": empirical_p_value(circuit_effect, rand),
            "p_value_ci_low": p_lo, "p_value_ci_high": p_hi,
            "circuit_percentile": float(np.mean(rand < circuit_effect)),
            "p_value_definition": "(1 + #{random effect >= circuit effect}) / (N + 1), one-sided "
                                  "(is the circuit's effect larger than random sets of the same size); "
                                  "its CI recomputes it on the document resamples",
        }
    return {"summary": out, "rows": rows}


def _target_description(targets: Sequence[Component]) -> str:
    if targets[0].kind == "head":
        return "heads " + ",".join(f"{c.layer}.{c.head}" for c in targets)
    kinds = "+".join(sorted({c.kind for c in targets}))
    return f"{kinds} of layers " + ",".join(map(str, sorted({c.layer for c in targets})))


def _load_with_adapter(spec: str, cfg: AblationConfig) -> LoadedModel:
    loaded = load_model(spec, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    if cfg.adapter:
        try:
            from sumcircuit.finetune import load_adapter  # issue 4; lazy so ablation works without it
        except ImportError as exc:
            raise CausalError(f"--adapter {cfg.adapter}: adapter loading is not available yet "
                              f"(sumcircuit.finetune.load_adapter): {exc}") from exc
        loaded = load_adapter(loaded, cfg.adapter, merge=True)
    return loaded


def _rouge_under_ablation(loaded: LoadedModel, data_cfg: DataConfig, cfg: AblationConfig,
                          targets: Sequence[Component], means: Mapping[Component, torch.Tensor]) -> dict[str, Any]:
    """ROUGE of greedy summaries with and without the ablation, paired over documents.

    Uses ``sumcircuit.evaluate`` (generation, ROUGE, bootstrap) so the numbers
    match ``sumcircuit evaluate``; the ablation hooks stay on during generation
    (values broadcast over the one-token decoding steps).
    """
    from sumcircuit.data import encode
    from sumcircuit.evaluate import GenerationConfig, eos_token_ids, generate_summaries, rouge_scores

    examples = load_examples(data_cfg).examples
    prompts = [encode(loaded.tokenizer, e, data_cfg.template, data_cfg.max_tokens, with_summary=False,
                      summary_budget=cfg.rouge_max_new_tokens) for e in examples]
    refs = [list(e.references) for e in examples]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.rouge_max_new_tokens, batch_size=cfg.batch_size)
    eos = eos_token_ids(loaded)
    device = next(loaded.model.parameters()).device
    per_doc: dict[str, list[dict[str, float]]] = {}
    for label, values in (("clean", {}), ("ablated", _ablation_values(targets, cfg.mode, means, device))):
        mine: list[tuple[int, list[str]]] = []  # (batch number, texts); batch b runs on rank b % N
        with Interventions(loaded.model, loaded.adapter) as iv:
            iv.replace({c: v.to(device) for c, v in values.items()})
            starts = range(0, len(prompts), gen_cfg.batch_size)
            for b in tqdm(dist.my_blocks(len(starts)), desc=f"generate ({label})",
                          disable=not dist.is_main_process()):
                outs = generate_summaries(loaded.model, loaded.tokenizer,
                                          prompts[starts[b]:starts[b] + gen_cfg.batch_size], gen_cfg, eos)
                mine.append((b, [o.text for o in outs]))
        texts = [t for _, batch_texts in sorted(p for part in dist.all_gather_objects(mine) for p in part)
                 for t in batch_texts]
        per_doc[label] = rouge_scores(texts, refs)
    idx = bootstrap_indices(len(examples), cfg.n_bootstrap, cfg.seed)
    out: dict[str, Any] = {"n": len(examples), "max_new_tokens": cfg.rouge_max_new_tokens,
                           "definition": "F1, greedy decoding; delta = ablated - clean, paired "
                                         "percentile bootstrap over documents"}
    for key in per_doc["clean"][0]:
        clean = np.array([d[key] for d in per_doc["clean"]])
        ablated = np.array([d[key] for d in per_doc["ablated"]])
        out[key] = {"clean": float(clean.mean()), "ablated": float(ablated.mean()),
                    "delta": mean_ci(ablated - clean, idx, cfg.ci)}
    return out


def run_ablation(model_spec: str, data_cfg: DataConfig, cfg: AblationConfig, out_dir: str | Path, *,
                 device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Ablate, then write ``ablation.json``, ``ablation.csv``, ``ablation_per_doc.csv``, ``ablation.png``.

    ``device`` / ``dtype`` override the config's (so a pipeline can pass its own).
    """
    cfg = replace(cfg, device=device or cfg.device, dtype=dtype or cfg.dtype)
    dist.setup(cfg.device)
    cfg = replace(cfg, device=dist.local_device(cfg.device))
    out = Path(out_dir)
    with dist.main_process_first():  # rank 0 fills the GGUF cache, the others read it
        loaded = _load_with_adapter(model_spec, cfg)
    encoded, source = encode_examples(loaded.tokenizer, data_cfg)
    result = ablate(loaded, encoded, cfg)
    tables = summarize_ablation(result, cfg)
    summary = tables["summary"]
    controls = summary.get("random_controls", {})
    summary.update({"effect": summary["circuit"]["effect"], "effect_ci_low": summary["circuit"]["effect_ci_low"],
                    "effect_ci_high": summary["circuit"]["effect_ci_high"], "p_value": controls.get("p_value"),
                    "target": _target_description(result.sets[0]), "mode": cfg.mode,
                    "cost": {**result.cost.summary(loaded.adapter.n_layers), "wall_s": result.wall_s}})
    if cfg.rouge:
        summary["rouge"] = _rouge_under_ablation(loaded, data_cfg, cfg, result.sets[0], result.means)
    summary["provenance"] = provenance(models=[loaded.provenance()], adapter=cfg.adapter,
                                       data=source.provenance(), data_config=asdict(data_cfg),
                                       seed=cfg.seed, config=asdict(cfg), circuit=cfg.circuit,
                                       processes=dist.world_size())
    dist.on_main(lambda: _write_ablation(out, summary, tables, result, cfg))
    return summary


def _write_ablation(out: Path, summary: dict[str, Any], tables: dict[str, Any], result: AblationResult,
                    cfg: AblationConfig) -> None:
    """Rank 0's files (every rank holds the same numbers)."""
    atomic_write_csv(out / "ablation.csv", tables["rows"], list(tables["rows"][0]))
    per_doc = [{"doc_id": d, "set": row["set"], "loss_clean": float(result.clean[j]),
                "loss_ablated": float(result.ablated[s, j])}
               for s, row in enumerate(tables["rows"]) for j, d in enumerate(result.doc_ids)]
    atomic_write_csv(out / "ablation_per_doc.csv", per_doc, ["doc_id", "set", "loss_clean", "loss_ablated"])
    from sumcircuit.plots import plot_ablation

    plot_ablation(tables["rows"], out / "ablation.png", title=f"{cfg.mode}-ablation of {_target_description(result.sets[0])}")
    atomic_write_json(out / "ablation.json", summary)


# ---------------------------------------------------------------- patching

@dataclass(frozen=True)
class PatchConfig:
    """Activation patching between a base and a tuned model of the same architecture."""

    granularity: str = "layer"  # layer: attn and mlp per layer | head | block: whole decoder block
    directions: tuple[str, ...] = DIRECTIONS
    layers: tuple[int, ...] = ()  # restrict to these layers (empty: all)
    include_all: bool = True  # also patch every component at once (the 100%-recovery check)
    replay_prefix: bool = True  # replay unchanged layers from the clean cache (pure speed-up)
    batch_size: int = 4
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False


ALL = "all"


def patch_components(adapter: ArchitectureAdapter, cfg: PatchConfig) -> list[Component]:
    if cfg.granularity not in GRANULARITIES:
        raise CausalError(f"--granularity {cfg.granularity}: choose one of {', '.join(GRANULARITIES)}")
    for d in cfg.directions:
        if d not in DIRECTIONS:
            raise CausalError(f"--direction {d}: choose one of {', '.join(DIRECTIONS)} or both")
    layers = list(cfg.layers) or list(range(adapter.n_layers))
    for layer in layers:
        check_component(Component(layer, "attn"), adapter, "--layers")
    if cfg.granularity == "layer":
        return layer_components(layers, "both")
    if cfg.granularity == "block":
        return [Component(l, "block") for l in layers]
    return [Component(l, "head", h) for l in layers for h in range(adapter.n_heads)]


def check_compatible(base: LoadedModel, tuned: LoadedModel) -> None:
    """Patching swaps activations position by position: same tokenizer and shapes are required."""
    a, b = base.adapter.describe(), tuned.adapter.describe()
    keys = ("family", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size", "n_neurons")
    diff = [f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]]
    if diff:
        raise CausalError(f"--base {base.source.spec} and --tuned {tuned.source.spec} have different "
                          f"architectures ({'; '.join(diff)}): patching needs the same architecture")
    tb, tt = base.tokenizer, tuned.tokenizer
    if tb.get_vocab() != tt.get_vocab() or (tb.eos_token_id, tb.pad_token_id) != (tt.eos_token_id, tt.pad_token_id):
        raise CausalError(f"--base {base.source.spec} and --tuned {tuned.source.spec} have different "
                          "tokenizers: patching needs both models to see the same token ids")


@dataclass
class PatchResult:
    """Per-document losses: ``base``, ``tuned`` ``[D]``; ``patched[(direction, name)] [D]``."""

    doc_ids: list[str]
    components: list[Component]
    base: np.ndarray
    tuned: np.ndarray
    patched: dict[tuple[str, str], np.ndarray]
    cost: CostCounter
    wall_s: float


def patch(base: LoadedModel, tuned: LoadedModel, encoded: Sequence[Encoded], cfg: PatchConfig) -> PatchResult:
    """Patch every component in both directions; per batch 2 clean forwards + 1 per component and direction.

    The clean forward of each model caches its block outputs (to replay the
    unchanged prefix) and the component activations (as donors).
    """
    check_compatible(base, tuned)
    adapter = base.adapter
    comps = patch_components(adapter, cfg)
    sets: list[tuple[str, list[Component]]] = [(c.name, [c]) for c in comps]
    if cfg.include_all:
        sets.append((ALL, comps))
    device = next(base.model.parameters()).device
    pad = int(base.tokenizer.pad_token_id)
    sites = sorted({c.site for c in comps} | {("block", l) for l in range(adapter.n_layers)})
    models = {"base": base.model, "tuned": tuned.model}
    receiver = {"denoise": "base", "noise": "tuned"}
    n = len(encoded)
    losses = {"base": np.zeros(n), "tuned": np.zeros(n)}
    patched = {(d, name): np.zeros(n) for d in cfg.directions for name, _ in sets}
    cost = CostCounter()
    dim = adapter.head_dim
    t0 = time.perf_counter()
    with torch.no_grad():
        for idx, batch in tqdm(batches(encoded, cfg.batch_size, pad, device, shard=True), desc="patching",
                               total=_n_batches(n, cfg.batch_size, shard=True), disable=not dist.is_main_process()):
            cost.batches += 1
            caches = {}
            for label, model in models.items():
                batch_losses, caches[label] = clean_run(model, adapter, batch, sites, cost)
                losses[label][idx] = batch_losses.numpy()
            for direction in cfg.directions:
                recv = receiver[direction]
                donor = caches["tuned" if recv == "base" else "base"]
                blocks = ({l: caches[recv][("block", l)] for l in range(adapter.n_layers)}
                          if cfg.replay_prefix else None)
                for name, members in tqdm(sets, desc=direction, leave=False, disable=not dist.is_main_process()):
                    values = {c: (donor[c.site][..., c.head * dim:(c.head + 1) * dim]
                                  if c.kind == "head" else donor[c.site]) for c in members}
                    patched[(direction, name)][idx] = run_intervened(
                        models[recv], adapter, batch, values, blocks, cost).numpy()
            del caches
    losses = {k: _sum_over_processes(v) for k, v in losses.items()}
    patched = {k: _sum_over_processes(v) for k, v in patched.items()}
    return PatchResult([e.doc_id for e in encoded], comps, losses["base"], losses["tuned"], patched,
                       cost.reduced(), time.perf_counter() - t0)


def summarize_patching(result: PatchResult, cfg: PatchConfig) -> dict[str, Any]:
    """One row per (direction, component): mean losses, recovery with a bootstrap CI over documents."""
    idx = bootstrap_indices(len(result.base), cfg.n_bootstrap, cfg.seed)
    by_name = {c.name: c for c in result.components}
    rows = []
    for (direction, name), loss in result.patched.items():
        comp = by_name.get(name)
        rec = recovery(result.base, result.tuned, loss)
        lo, hi = recovery_ci(result.base, result.tuned, loss, idx, cfg.ci)
        rows.append({"direction": direction, "component": name,
                     "layer": comp.layer if comp else "", "kind": comp.kind if comp else ALL,
                     "head": comp.head if comp and comp.kind == "head" else "",
                     "loss_base": float(result.base.mean()), "loss_tuned": float(result.tuned.mean()),
                     "loss_patched": float(loss.mean()), "recovery": rec,
                     "recovery_ci_low": lo, "recovery_ci_high": hi,
                     "effect": rec if direction == "denoise" else 1.0 - rec})
    gap = result.base - result.tuned
    gap_ci = mean_ci(gap, idx, cfg.ci)
    summary: dict[str, Any] = {
        "n_docs": len(result.base), "granularity": cfg.granularity, "directions": list(cfg.directions),
        "loss_base": mean_ci(result.base, idx, cfg.ci), "loss_tuned": mean_ci(result.tuned, idx, cfg.ci),
        "gap": gap_ci,
        "definition": {
            "loss": "per document, mean CE over summary tokens (labels != -100); aggregated as the "
                    "mean over documents",
            "recovery": "(L_base - L_patched) / (L_base - L_tuned) on losses averaged over documents "
                        "(a ratio of means, not a mean of per-document ratios); 0 = base, 1 = tuned",
            "denoise": "run the base model with this component's activation taken from the tuned "
                       "model; effect = recovery (is the component sufficient?)",
            "noise": "run the tuned model with this component's activation taken from the base "
                     "model; effect = 1 - recovery = fraction of the gap lost (is it necessary?)",
            "components": "head: its slice of the attention output projection's input; attn / mlp: "
                          "what the attention / MLP block adds to the residual stream (after the "
                          "block's post-norm in Gemma 2/3); block: the decoder "
                          "block's output (the residual stream after the layer); 'all': every listed "
                          "component at once (embeddings, final norm and LM head are never patched, "
                          "so 'all' is < 1 if fine-tuning changed them)",
            "ci": f"{cfg.ci:.0%} percentile bootstrap over documents, {cfg.n_bootstrap} resamples, "
                  f"seed {cfg.seed}, paired across base/tuned/patched",
        },
    }
    if gap_ci["ci_low"] <= 0 <= gap_ci["ci_high"] or gap_ci["mean"] <= 0:
        summary["warning"] = ("the base-tuned loss gap is not clearly positive (CI includes 0 or "
                              "tuned is worse): recovery ratios are unstable and hard to interpret")
    return {"summary": summary, "rows": rows}


def run_patching(base_spec: str, tuned_spec: str, data_cfg: DataConfig, cfg: PatchConfig,
                 out_dir: str | Path, *, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Patch, then write ``patching.json``, ``patching.csv``, ``patching_per_doc.csv``, ``patching.png``."""
    cfg = replace(cfg, device=device or cfg.device, dtype=dtype or cfg.dtype)
    dist.setup(cfg.device)
    cfg = replace(cfg, device=dist.local_device(cfg.device))
    out = Path(out_dir)
    with dist.main_process_first():  # rank 0 fills the GGUF cache, the others read it
        base = load_model(base_spec, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
        tuned = load_model(tuned_spec, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    check_compatible(base, tuned)
    encoded, source = encode_examples(base.tokenizer, data_cfg)
    result = patch(base, tuned, encoded, cfg)
    tables = summarize_patching(result, cfg)
    summary = tables["summary"]
    summary["cost"] = {**result.cost.summary(base.adapter.n_layers), "wall_s": result.wall_s,
                       "docs_per_s": len(encoded) / result.wall_s if result.wall_s else None}
    summary["provenance"] = provenance(models=[base.provenance(), tuned.provenance()],
                                       data=source.provenance(), data_config=asdict(data_cfg),
                                       seed=cfg.seed, config=asdict(cfg), processes=dist.world_size())
    dist.on_main(lambda: _write_patching(out, summary, tables, result, cfg, base.adapter))
    return summary


def _write_patching(out: Path, summary: dict[str, Any], tables: dict[str, Any], result: PatchResult,
                    cfg: PatchConfig, adapter: ArchitectureAdapter) -> None:
    """Rank 0's files (every rank holds the same numbers)."""
    columns = list(tables["rows"][0])
    atomic_write_csv(out / "patching.csv", tables["rows"], columns)
    per_doc = [{"doc_id": d, "direction": direction, "component": name, "loss_base": float(result.base[j]),
                "loss_tuned": float(result.tuned[j]), "loss_patched": float(loss[j])}
               for (direction, name), loss in result.patched.items() for j, d in enumerate(result.doc_ids)]
    atomic_write_csv(out / "patching_per_doc.csv", per_doc,
                     ["doc_id", "direction", "component", "loss_base", "loss_tuned", "loss_patched"])
    from sumcircuit.plots import plot_patching

    plot_patching(tables["rows"], out / "patching.png", granularity=cfg.granularity,
                  n_layers=adapter.n_layers, n_heads=adapter.n_heads)
    atomic_write_json(out / "patching.json", summary)
