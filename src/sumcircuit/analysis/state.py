"""The sums an analysis accumulates, and how one batch of both models adds to them.

Both models read identical token ids. Each batch runs both models in lockstep
(:func:`sumcircuit.capture.run_pair`): at every layer the capture sink gets
both models' attention row statistics, neuron activations and block outputs
and folds them into mergeable sums (:mod:`sumcircuit.metrics`). Nothing is
kept across layers, so memory is one layer of one batch above the two plain
forward passes and never grows with the number of documents. Per-document
sums are kept so that intervals resample documents, not tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis.config import AnalysisConfig, AnalysisError, IncompatibleModelsError, KernelMode
from sumcircuit.artifacts import atomic_save_safetensors
from sumcircuit.capture import PairRows, run_pair, unwrap
from sumcircuit.data.encoding import Encoded, collate
from sumcircuit.kernels import column_moments
from sumcircuit.metrics import CrossMoments, Moments

ROW_STATS = PairRows.NAMES  # entropy_base, entropy_tuned, kl_base_tuned, kl_tuned_base
STATE_FILE = "accumulators.safetensors"


def check_compatible(base: nn.Module, tuned: nn.Module) -> ArchitectureAdapter:
    """Refuse pairs whose layers, heads or neurons do not correspond one to one."""
    a = ArchitectureAdapter.for_model(unwrap(base)).describe()
    b = ArchitectureAdapter.for_model(unwrap(tuned)).describe()
    diff = [f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]
    if diff:
        raise IncompatibleModelsError("base and tuned models have different architectures ("
                                      + "; ".join(diff) + "): statistics need matching layers and heads")
    return ArchitectureAdapter.for_model(unwrap(base))


def check_same_tokenizer(base: PreTrainedTokenizerBase, tuned: PreTrainedTokenizerBase) -> None:
    """Both models must read the same ids; a different vocabulary makes every comparison meaningless."""
    probe = "Summarize: The quick brown fox, 2024 -- \u00e9t\u00e9.\nTL;DR:"
    problems = []
    if base.get_vocab() != tuned.get_vocab():
        problems.append(f"vocabularies differ ({len(base)} vs {len(tuned)} tokens)")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(base, name) != getattr(tuned, name):
            problems.append(f"{name} {getattr(base, name)} vs {getattr(tuned, name)}")
    if not problems and base(probe)["input_ids"] != tuned(probe)["input_ids"]:
        problems.append("they tokenize the same text differently")
    if problems:
        raise IncompatibleModelsError("base and tuned tokenizers differ: " + "; ".join(problems)
                                      + " (analysis needs identical token ids for both models)")


# ---------------------------------------------------------------- accumulated state

@dataclass
class AnalysisState:
    """All sums of a run: mergeable across shards and processes, saved for resume."""

    n_layers: int
    n_heads: int
    n_neurons: int
    hidden_size: int
    doc_ids: list[str] = field(default_factory=list)
    doc_tokens: list[Tensor] = field(default_factory=list)  # [B] counted rows per document
    per_doc: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> [B, L, (H)] sums
    heads: dict[str, Moments] = field(default_factory=dict)  # row-level moments [L, H]
    actmag: dict[str, Moments] = field(default_factory=dict)  # base/tuned [L]
    neurons: dict[str, Moments] = field(default_factory=dict)  # base/tuned [L, N]
    neuron_abs_change: Tensor | None = None  # [L, N] sum |a_t - a_b|
    cross: CrossMoments | None = None

    @classmethod
    def empty(cls, adapter: ArchitectureAdapter, with_cka: bool, device: torch.device | str = "cpu") -> AnalysisState:
        """Zero sums; CKA's ``3 L d^2`` accumulators go straight to ``device`` (where the models are)."""
        L, H, N, d = adapter.n_layers, adapter.n_heads, adapter.n_neurons, adapter.hidden_size
        return cls(L, H, N, d, heads={s: Moments.zeros(L, H) for s in ROW_STATS},
                   actmag={m: Moments.zeros(L) for m in ("base", "tuned")},
                   neurons={m: Moments.zeros(L, N) for m in ("base", "tuned")},
                   neuron_abs_change=torch.zeros(L, N, dtype=torch.float64),
                   cross=CrossMoments.zeros(L, d, device) if with_cka else None)

    @property
    def n_docs(self) -> int:
        """Documents accumulated so far."""
        return len(self.doc_ids)

    def doc_sums(self, name: str) -> Tensor:
        """Per-document sums of one statistic, all shards concatenated in document order."""
        parts = self.per_doc.get(name, [])
        if not parts:
            shape = (0, self.n_layers, self.n_heads) if name in ROW_STATS else (0, self.n_layers)
            return torch.zeros(shape, dtype=torch.float64)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def tokens(self) -> Tensor:
        """Counted tokens per document."""
        return torch.cat(self.doc_tokens) if self.doc_tokens else torch.zeros(0, dtype=torch.float64)

    def merge(self, other: AnalysisState) -> AnalysisState:
        """Sum of two states (documents of ``other`` come after this one's)."""
        if (self.n_layers, self.n_heads, self.n_neurons) != (other.n_layers, other.n_heads, other.n_neurons):
            raise AnalysisError("cannot merge accumulators of different architectures")
        if (self.cross is None) != (other.cross is None):
            raise AnalysisError("cannot merge accumulators with and without CKA")
        return AnalysisState(
            self.n_layers, self.n_heads, self.n_neurons, self.hidden_size,
            self.doc_ids + other.doc_ids, [self.tokens(), other.tokens()],
            {k: [self.doc_sums(k), other.doc_sums(k)] for k in set(self.per_doc) | set(other.per_doc)},
            {k: self.heads[k].merge(other.heads[k]) for k in self.heads},
            {k: self.actmag[k].merge(other.actmag[k]) for k in self.actmag},
            {k: self.neurons[k].merge(other.neurons[k]) for k in self.neurons},
            self.neuron_abs_change + other.neuron_abs_change,  # type: ignore[operator]
            self.cross.merge(other.cross) if self.cross is not None and other.cross is not None else None)

    def additive_tensors(self) -> dict[str, Tensor]:
        """The sums that merge by plain addition (counts, sums, sums of squares): what processes all-reduce."""
        out: dict[str, Tensor] = {"neuron_abs_change": self.neuron_abs_change}  # type: ignore[dict-item]
        for group, moments in (("heads", self.heads), ("actmag", self.actmag), ("neurons", self.neurons)):
            for key, m in moments.items():
                out.update(m.state(f"{group}.{key}"))
        return out

    def to_tensors(self) -> dict[str, Tensor]:
        """Every sum as a CPU tensor (what the resume file holds)."""
        out: dict[str, Tensor] = {"doc_tokens": self.tokens(), **self.additive_tensors()}
        for name in self.per_doc:
            out[f"per_doc.{name}"] = self.doc_sums(name)
        if self.cross is not None:
            out.update({k: v.cpu() for k, v in self.cross.state("cross").items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        """Document ids and sizes, stored beside the tensors."""
        return {"doc_ids": json.dumps(self.doc_ids),
                "dims": json.dumps([self.n_layers, self.n_heads, self.n_neurons, self.hidden_size])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> AnalysisState:
        L, H, N, d = json.loads(metadata["dims"])
        def group(prefix: str, keys: Sequence[str]) -> dict[str, Moments]:
            return {k: Moments.from_state(tensors, f"{prefix}.{k}") for k in keys}
        per_doc = {k.split(".", 1)[1]: [v] for k, v in tensors.items() if k.startswith("per_doc.")}
        cross = CrossMoments.from_state(tensors, "cross") if "cross.n" in tensors else None
        return cls(L, H, N, d, json.loads(metadata["doc_ids"]), [tensors["doc_tokens"]], per_doc,
                   group("heads", ROW_STATS), group("actmag", ("base", "tuned")),
                   group("neurons", ("base", "tuned")), tensors["neuron_abs_change"], cross)


def save_state(state: AnalysisState, path: Path, extra: dict[str, str] | None = None) -> None:
    """Write the sums atomically, so a resumed run never reads half a file."""
    atomic_save_safetensors(state.to_tensors(), path, {**state.metadata(), **(extra or {})})


def load_state(path: str | Path) -> tuple[AnalysisState, dict[str, str]]:
    """An accumulator file written by ``run_analysis`` (mergeable with :meth:`AnalysisState.merge`)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata() or {})
    return AnalysisState.from_tensors(load_file(str(path)), metadata), metadata


# ---------------------------------------------------------------- one batch

class _PairSink:
    """Capture sink for one batch: folds each layer of both models into the batch's sums as it arrives.

    The sums stay on the models' device until :meth:`finish` adds them to
    ``state`` in one go: a host copy inside the layer loop would make an
    accelerator wait for the host at every layer.
    """

    def __init__(self, state: AnalysisState, weights: Tensor, kernels: KernelMode = "auto") -> None:
        self.state, self.kernels = state, kernels
        self.weights = weights  # [B, T] bool: counted query positions
        self.counted = weights.reshape(-1).nonzero()[:, 0]  # flat [B * T] index of each counted token
        self.row_doc = self.counted // weights.shape[1]  # its document
        self.n_tokens = float(self.counted.numel())  # known on the host once the index is
        self.all_counted = self.counted.numel() == weights.numel()
        B, L, H, N = weights.shape[0], state.n_layers, state.n_heads, state.n_neurons

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=weights.device)

        self.doc_sums = {s: zeros(B, L, H) for s in ROW_STATS}
        self.doc_sums.update({f"actmag_{m}": zeros(B, L) for m in ("base", "tuned")})
        self.squares = {name: zeros(*sums.shape[1:]) for name, sums in self.doc_sums.items()}
        self.neuron_sums = zeros(L, 5, N)  # column_moments per layer

    def _add_rows(self, layer: int, rows: PairRows) -> None:
        """Fold per-row values [S, B, H, T] into per-document sums and sums of squares, all S at once."""
        masked = torch.where(self.weights[None, :, None, :], rows.values,
                             torch.zeros((), dtype=rows.values.dtype, device=rows.values.device))
        per_doc = masked.sum(-1, dtype=torch.float64)  # [S, B, H]
        squares = masked.square().sum((1, 3), dtype=torch.float64)  # [S, H]
        for i, name in enumerate(PairRows.NAMES):
            self.doc_sums[name][:, layer] = per_doc[i]
            self.squares[name][layer] = squares[i]

    def _rows(self, values: Tensor) -> Tensor:
        """[B, T, F] -> [n, F] at counted tokens (a view when every token counts).

        By index, not by boolean mask: a mask's row count is only known on the
        host, so it would make an accelerator wait at every layer.
        """
        flat = values.reshape(-1, values.shape[-1])
        return (flat if self.all_counted else flat.index_select(0, self.counted)).float()

    # -- sink protocol
    def on_attention(self, layer: int, rows: PairRows) -> None:
        self._add_rows(layer, rows)

    def on_neurons(self, layer: int, base: Tensor, tuned: Tensor) -> None:
        # one fused pass over both models' rows (fp32 within 64-row chunks, fp64 beyond)
        self.neuron_sums[layer] = column_moments(self._rows(base), self._rows(tuned), self.kernels)

    def on_hidden(self, layer: int, base: Tensor, tuned: Tensor) -> None:
        pair = {"base": self._rows(base), "tuned": self._rows(tuned)}
        for phase, rows in pair.items():
            norms = rows.norm(dim=-1).double()
            self.doc_sums[f"actmag_{phase}"][:, layer].index_add_(0, self.row_doc, norms)
            self.squares[f"actmag_{phase}"][layer] = norms.square().sum()
        if self.state.cross is not None:
            self.state.cross.add(layer, pair["base"], pair["tuned"])

    def finish(self) -> None:
        """Add the batch to ``state`` (its sums come to the host here, once); counts are per batch."""
        self.doc_sums = {name: sums.cpu() for name, sums in self.doc_sums.items()}
        squares = {name: sq.cpu() for name, sq in self.squares.items()}
        for name in ROW_STATS:
            self.state.heads[name].add(self.n_tokens, self.doc_sums[name].sum(0), squares[name])
        neurons = self.neuron_sums.cpu()
        for i, phase in enumerate(("base", "tuned")):
            self.state.actmag[phase].add(self.n_tokens, self.doc_sums[f"actmag_{phase}"].sum(0),
                                         squares[f"actmag_{phase}"])
            self.state.neurons[phase].add(self.n_tokens, neurons[:, 2 * i], neurons[:, 2 * i + 1])
        self.state.neuron_abs_change += neurons[:, 4]  # type: ignore[operator]


def _region_weights(batch: dict[str, Tensor], region: str) -> Tensor:
    valid = batch["attention_mask"].bool()
    if region == "document":
        return valid & batch["document_mask"]
    if region == "summary":
        return valid & batch["summary_mask"]
    return valid


def device_of(model: nn.Module) -> torch.device:
    """Where a (possibly wrapped) model's inputs go: its weights' device, or its device map's first GPU."""
    from sumcircuit.placement import execution_device

    return execution_device(unwrap(model))


@torch.no_grad()
def accumulate(base: nn.Module, tuned: nn.Module, adapter: ArchitectureAdapter, encoded: Sequence[Encoded],
                config: AnalysisConfig, pad_token_id: int, state: AnalysisState,
                progress: tqdm | None = None) -> None:
    """Add ``encoded`` to ``state``: batches of similar length, per-document rows in input order."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    D, L, H = len(encoded), state.n_layers, state.n_heads
    shard_sums = {s: torch.zeros(D, L, H, dtype=torch.float64) for s in ROW_STATS}
    shard_sums.update({f"actmag_{m}": torch.zeros(D, L, dtype=torch.float64) for m in ("base", "tuned")})
    tokens = torch.zeros(D, dtype=torch.float64)
    device_b, device_t = device_of(base), device_of(tuned)
    if device_t != device_b:
        raise AnalysisError(f"base and tuned models are on different devices ({device_b}, {device_t})")
    for start in range(0, D, config.batch_size):
        idx = order[start:start + config.batch_size]
        batch = collate([encoded[i] for i in idx], pad_token_id, "right")
        weights = _region_weights(batch, config.region)
        sink = _PairSink(state, weights.to(device_b), config.kernels)
        # Padding is on the right: causal attention alone keeps every real token from seeing it,
        # and padded rows are never counted. Without a padding mask attention takes the causal
        # path (no additive mask per layer) and real tokens' numbers are exactly as with it.
        inputs = {"input_ids": batch["input_ids"].to(device_b), "use_cache": False}
        run_pair(base, tuned, adapter, sink, inputs, config.rows_per_tile, config.kernels)
        sink.finish()
        rows = torch.tensor(idx)
        for name, sums in sink.doc_sums.items():
            shard_sums[name][rows] = sums
        tokens[rows] = weights.sum(-1).double()
        if progress is not None:
            progress.update(len(idx))
    state.doc_ids.extend(e.doc_id for e in encoded)
    state.doc_tokens.append(tokens)
    for name, sums in shard_sums.items():
        state.per_doc.setdefault(name, []).append(sums)


