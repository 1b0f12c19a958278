"""What ``analyze`` returns and writes: per-head, per-layer and per-neuron tables, tensors, a summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from torch import Tensor

from sumcircuit.analysis.state import STATE_FILE, AnalysisState
from sumcircuit.artifacts import atomic_save_safetensors, atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.results import Result, typed_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEAD_STATS = ("entropy_base", "entropy_tuned", "entropy_delta", "kl_base_tuned", "kl_tuned_base")
HEAD_COLUMNS = ["layer", "head", *HEAD_STATS, "rows",
                *(f"{s}_ci_{e}" for s in HEAD_STATS for e in ("low", "high"))]
LAYER_COLUMNS = ["layer", "kl_base_tuned", "kl_tuned_base", "entropy_delta", "actmag_base", "actmag_tuned",
                 "actmag_rel_change", "cka", "weight_change_attn", "weight_change_mlp",
                 "neuron_abs_change_mean", "neuron_frac_changed", "neuron_sign_flips"]
NEURON_COLUMNS = ["rank", "layer", "neuron", "mean_base", "mean_tuned", "mean_change", "mean_abs_change",
                  "std_base", "std_tuned", "standardized_change", "sign_flip"]


class HeadRow(TypedDict):
    """One row of ``heads.csv``: a head's token-weighted means and their confidence bounds."""

    layer: int
    head: int
    entropy_base: float
    entropy_tuned: float
    entropy_delta: float
    kl_base_tuned: float
    kl_tuned_base: float
    rows: int
    entropy_base_ci_low: float
    entropy_base_ci_high: float
    entropy_tuned_ci_low: float
    entropy_tuned_ci_high: float
    entropy_delta_ci_low: float
    entropy_delta_ci_high: float
    kl_base_tuned_ci_low: float
    kl_base_tuned_ci_high: float
    kl_tuned_base_ci_low: float
    kl_tuned_base_ci_high: float


class LayerRow(TypedDict):
    """One row of ``layers.csv``."""

    layer: int
    kl_base_tuned: float
    kl_tuned_base: float
    entropy_delta: float
    actmag_base: float
    actmag_tuned: float
    actmag_rel_change: float
    cka: float
    weight_change_attn: float
    weight_change_mlp: float
    neuron_abs_change_mean: float
    neuron_frac_changed: float
    neuron_sign_flips: int


class NeuronRow(TypedDict):
    """One row of ``neurons.csv`` (the top-k neurons by change)."""

    rank: int
    layer: int
    neuron: int
    mean_base: float
    mean_tuned: float
    mean_change: float
    mean_abs_change: float
    std_base: float
    std_tuned: float
    standardized_change: float
    sign_flip: int


@dataclass(repr=False)
class AnalysisResult(Result):
    """Everything ``analyze`` reports: tables (heads, layers, neurons), tensors, ``summary``.

    Example:
        >>> result = sc.analyze(base, tuned, data)  # doctest: +SKIP
        >>> result.to_pandas().sort_values("kl_base_tuned").tail()  # doctest: +SKIP
    """

    kind: ClassVar[str] = "analysis"
    main_table: ClassVar[str] = "heads"
    files: ClassVar[tuple[str, ...]] = ("heads.csv", "layers.csv", "neurons.csv", "stats.safetensors",
                                        "per_doc.safetensors", "summary.json", STATE_FILE)
    heads: list[HeadRow]
    layers: list[LayerRow]
    neurons: list[NeuronRow]
    summary: dict[str, Any]
    stats: dict[str, Tensor]  # full per-head, per-layer and per-neuron tensors
    per_doc: dict[str, Tensor]  # per-document means [D, L, H] / [D, L] and tokens [D]
    state: AnalysisState | None = None  # the mergeable sums (None when read back from a folder)
    doc_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        s = self.summary
        share = s.get("share_heads_entropy_decreased")
        text = f"{s.get('n_layers')} layers x {s.get('n_heads')} heads, {s.get('n_docs')} documents"
        if isinstance(share, float):
            text += f"; {share:.1%} of heads more focused, mean KL {s.get('mean_kl_base_tuned', float('nan')):.4g}"
        return text

    def head_table(self, stat: str) -> Tensor:
        """One statistic as an [L, H] tensor."""
        return self.stats[f"heads.{stat}"]

    def tables(self) -> dict[str, list[Any]]:
        return {"heads": list(self.heads), "layers": list(self.layers), "neurons": list(self.neurons)}

    def plot(self, what: str = "heads") -> Figure:
        """A figure: ``"heads"`` (entropy change and KL per head) or ``"layers"`` (per-layer change).

        Returns a matplotlib Figure (no global state is touched: inline plotting keeps working).
        """
        from sumcircuit import plots

        if what == "heads":
            return plots.head_heatmaps(self.heads)
        if what == "layers":
            return plots.layer_bars(self.layers)
        raise ValueError(f"plot {what!r}: choose heads or layers")

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """heads.csv, layers.csv, neurons.csv, stats.safetensors, per_doc.safetensors, summary.json."""
        write_outputs(self, out, self.summary.get("provenance"))
        return Path(out)

    @classmethod
    def read(cls, folder: str | Path) -> AnalysisResult:
        """An analysis folder (written by ``analyze`` or :meth:`save`) back as a result."""
        p = require_complete(folder)
        return cls(typed_rows(read_csv(p / "heads.csv"), HeadRow), typed_rows(read_csv(p / "layers.csv"), LayerRow),
                   typed_rows(read_csv(p / "neurons.csv"), NeuronRow), read_json(p / "summary.json"),
                   _tensors(p / "stats.safetensors"), _tensors(p / "per_doc.safetensors"), None,
                   _doc_ids(p / "per_doc.safetensors"))


def _tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _doc_ids(path: Path) -> list[str]:
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(json.loads((fh.metadata() or {}).get("doc_ids", "[]")))


def write_outputs(result: AnalysisResult, out_dir: str | Path, prov: dict[str, Any] | None = None) -> None:
    """heads.csv, layers.csv, neurons.csv, stats.safetensors, per_doc.safetensors, summary.json."""
    out = Path(out_dir)
    atomic_write_csv(out / "heads.csv", result.heads, HEAD_COLUMNS)
    atomic_write_csv(out / "layers.csv", result.layers, LAYER_COLUMNS)
    atomic_write_csv(out / "neurons.csv", result.neurons, NEURON_COLUMNS)
    meta = {"definitions": json.dumps(result.summary.get("definitions", {}))}
    atomic_save_safetensors(result.stats, out / "stats.safetensors", meta)
    atomic_save_safetensors(result.per_doc, out / "per_doc.safetensors",
                            {"doc_ids": json.dumps(result.doc_ids),
                             "layout": "kl/entropy [D, L, H]; actmag_rel_change [D, L]; tokens [D]"})
    atomic_write_json(out / "summary.json", {**result.summary, "provenance": prov or {}})
