"""Circuit selection: rank layers (and heads) by how much fine-tuning changed them.

This is the paper's selection step made explicit and checkable: the score is
named and defined in the output, and its stability is measured by re-ranking
over bootstrap resamples of the analysed documents. A high change score is
*correlational*: whether the selected layers matter causally is what
``sumcircuit ablate`` / ``sumcircuit patch`` test.

Input: an analysis folder (``sumcircuit analyze``) with ``heads.csv``,
``layers.csv``, ``per_doc.safetensors`` and ``summary.json``. Selection is a
pure function of those files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sumcircuit.artifacts import atomic_write_json, read_csv, read_json
from sumcircuit.errors import SumcircuitError
from sumcircuit.options import CIRCUIT_SCORE_DEFINITIONS, CIRCUIT_SCORES
from sumcircuit.outputs import claim_file, require_complete, writes_file
from sumcircuit.provenance import provenance
from sumcircuit.results import Result
from sumcircuit.sites import Site, SiteError, parse_sites
from sumcircuit.stats import average_ranks, resample_counts

SCORES = tuple(s for s in CIRCUIT_SCORES if s != "attribution")
HEAD_SCORES = ("kl", "kl-sym", "entropy", "combined")
COMBINED_PARTS = ("kl", "entropy", "activation", "weights")
DEFINITIONS = CIRCUIT_SCORE_DEFINITIONS
_RANKING = "descending score; ties broken by the lower index"
_BOOTSTRAP = ("documents resampled with replacement from per_doc.safetensors (each document weighted "
              "equally); per resample the score is recomputed from per-document means and the top-K "
              "re-selected; stability = fraction of resamples in which a selected item stays in the top-K")


class CircuitError(SumcircuitError):
    """An analysis folder that cannot be read, or a score / K that does not fit it."""


@dataclass(frozen=True)
class CircuitConfig:
    score: str = "kl"
    top_layers: int = 3
    top_heads: int = 0  # 0: no head selection
    n_bootstrap: int = 1000
    seed: int = 0


# ---------------------------------------------------------------- circuit files

@dataclass
class Circuit(Result):
    """A selected circuit: its layers, its heads as :class:`Site` s, and everything circuit.json holds."""

    kind: ClassVar[str] = "circuit"
    main_table: ClassVar[str] = "layers"
    layers: list[int]
    heads: list[Site]
    summary: dict[str, Any]

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        scores = self.summary.get("scores") or []
        ranked = self.summary.get("ranked_layers") or []
        rank = {int(l): i for i, l in enumerate(ranked)}
        stability = self.summary.get("stability") or {}
        layers = [{"layer": l, "score": s, "rank": rank.get(l), "selected": l in self.layers,
                   "stability": stability.get(str(l))} for l, s in enumerate(scores)]
        head_stab = self.summary.get("head_stability") or {}
        heads = [{**h.to_row(), "stability": head_stab.get(h.name)} for h in self.heads]
        return {"layers": layers, "heads": heads}

    def save(self, out: str | Path) -> Path:
        """``circuit.json`` (``out`` is the file, or a folder to write it in)."""
        with claim_file(circuit_file(out)) as path:
            atomic_write_json(path, self.summary)
        return path


def circuit_file(out: str | Path) -> Path:
    """Where a circuit goes: ``out`` itself when it names a .json file, else ``out/circuit.json``."""
    path = Path(out)
    return path if path.suffix == ".json" else path / "circuit.json"


def read_circuit(path: str | Path) -> Circuit:
    """A circuit file, strictly checked: integer layers, heads as names (``L2.H3``) or ``[layer, head]`` pairs.

    Files of earlier versions (heads as ``[l, h]`` lists, stability keyed ``"2.3"``) load too.
    Wrong types are refused, never coerced.
    """
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise CircuitError(f"circuit file {path}: cannot read it: {exc}") from exc
    if not isinstance(data, dict):
        raise CircuitError(f"circuit file {path}: expected a JSON object")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise CircuitError(f"circuit file {path}: field 'layers' must be a non-empty list of "
                           f"non-negative integers, got {layers!r}")
    raw_heads = data.get("heads") or []
    if not isinstance(raw_heads, list):
        raise CircuitError(f"circuit file {path}: field 'heads' must be a list")
    try:
        heads = parse_sites(raw_heads)
    except SiteError as exc:
        raise CircuitError(f"circuit file {path}: field 'heads': {exc}") from None
    if any(h.kind != "attn_head" for h in heads):
        raise CircuitError(f"circuit file {path}: field 'heads' holds non-head components")
    return Circuit(sorted(set(layers)), heads, data)


# ---------------------------------------------------------------- reading

def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise CircuitError(f"{path} not found: --analysis must be a folder written by `sumcircuit analyze`")
    return read_csv(path)


def _column(rows: list[dict[str, str]], name: str, path: Path) -> np.ndarray:
    if rows and name not in rows[0]:
        raise CircuitError(f"{path}: no column '{name}' (columns: {', '.join(rows[0])})")
    try:
        return np.array([float(r[name]) if r[name] != "" else math.nan for r in rows])
    except ValueError as exc:
        raise CircuitError(f"{path}: column '{name}' is not numeric: {exc}") from exc


@dataclass
class AnalysisTables:
    """Per-head ``[L, H]`` and per-layer ``[L]`` statistics, plus per-document ones if present."""

    folder: Path
    heads: dict[str, np.ndarray]  # kl_base_tuned, kl_tuned_base, entropy_delta: [L, H]
    layers: dict[str, np.ndarray]  # actmag_rel_change, weight_change_attn, weight_change_mlp: [L]
    per_doc: dict[str, np.ndarray] | None  # [D, L, H] / [D, L]

    @property
    def n_layers(self) -> int:
        return next(iter(self.heads.values())).shape[0]


def read_analysis(folder: str | Path) -> AnalysisTables:
    folder = Path(folder)
    if not folder.is_dir():
        raise CircuitError(f"--analysis {folder}: not a folder")
    require_complete(folder)
    head_rows = _read_csv(folder / "heads.csv")
    layer_rows = _read_csv(folder / "layers.csv")
    if not head_rows or not layer_rows:
        raise CircuitError(f"{folder}: heads.csv or layers.csv is empty")
    layer_idx = _column(head_rows, "layer", folder / "heads.csv").astype(int)
    head_idx = _column(head_rows, "head", folder / "heads.csv").astype(int)
    n_layers, n_heads = layer_idx.max() + 1, head_idx.max() + 1
    heads: dict[str, np.ndarray] = {}
    for name in ("kl_base_tuned", "kl_tuned_base", "entropy_delta"):
        grid = np.full((n_layers, n_heads), math.nan)
        grid[layer_idx, head_idx] = _column(head_rows, name, folder / "heads.csv")
        heads[name] = grid
    order = _column(layer_rows, "layer", folder / "layers.csv").astype(int)
    layers: dict[str, np.ndarray] = {}
    for name in ("actmag_rel_change", "weight_change_attn", "weight_change_mlp"):
        values = np.full(n_layers, math.nan)
        if name in layer_rows[0]:
            values[order] = _column(layer_rows, name, folder / "layers.csv")
        layers[name] = values
    per_doc = None
    if (folder / "per_doc.safetensors").is_file():
        from safetensors.numpy import load_file

        per_doc = {k: v.astype(np.float64) for k, v in load_file(str(folder / "per_doc.safetensors")).items()}
    return AnalysisTables(folder, heads, layers, per_doc)


# ---------------------------------------------------------------- scores

def normalized_ranks(scores: np.ndarray) -> np.ndarray:
    """``(n-1-rank)/(n-1)`` along the last axis, rank 0 = largest, ties averaged; NaN stays NaN."""
    n = scores.shape[-1]
    filled = np.nan_to_num(scores, nan=-np.inf)
    ranks = np.apply_along_axis(average_ranks, -1, filled)
    return np.where(np.isnan(scores), np.nan, (n - 1 - ranks) / max(n - 1, 1))


def _head_grids(score: str, stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-head score ``[..., L, H]`` from (resampled) mean per-head statistics."""
    if score == "kl":
        return stats["kl_base_tuned"]
    if score == "kl-sym":
        return (stats["kl_base_tuned"] + stats["kl_tuned_base"]) / 2
    if score == "entropy":
        return np.abs(stats["entropy_delta"])
    raise CircuitError(f"no per-head statistic for score '{score}'")


def layer_scores(score: str, heads: Mapping[str, np.ndarray], layers: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-layer score ``[..., L]`` (leading axes: bootstrap resamples)."""
    if score in ("kl", "kl-sym", "entropy"):
        return np.nanmean(_head_grids(score, heads), axis=-1)
    if score == "activation":
        return np.abs(layers["actmag_rel_change"])
    if score == "weights":
        return layers["weight_change_attn"] + layers["weight_change_mlp"]
    if score == "combined":
        parts = [layer_scores(p, heads, layers) for p in COMBINED_PARTS]
        parts = [p for p in parts if not np.all(np.isnan(p))]
        shape = np.broadcast_shapes(*(p.shape for p in parts))
        return np.nanmean(np.stack([normalized_ranks(np.broadcast_to(p, shape)) for p in parts]), axis=0)
    raise CircuitError(f"--score {score}: choose one of {', '.join(SCORES)}")


def head_scores(score: str, heads: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-head score flattened to ``[..., L*H]`` (index = layer * H + head)."""
    if score not in HEAD_SCORES:
        raise CircuitError(f"--top-heads needs a per-head score ({', '.join(HEAD_SCORES)}); "
                           f"'{score}' is defined per layer only")
    if score == "combined":
        parts = [head_scores(p, heads) for p in ("kl", "entropy")]
        return np.nanmean(np.stack([normalized_ranks(p) for p in parts]), axis=0)
    grid = _head_grids(score, heads)
    return grid.reshape(*grid.shape[:-2], -1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest along the last axis (NaN last; ties: lower index first)."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=-1, kind="stable")
    return order[..., :k]


# ---------------------------------------------------------------- bootstrap

def _resampled_head_stats(per_doc: Mapping[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-head means over each resample ``[B, L, H]``, NaN-aware (a document may lack a head's rows)."""
    out = {}
    sources = {"kl_base_tuned": per_doc.get("kl_base_tuned"), "kl_tuned_base": per_doc.get("kl_tuned_base"),
               "entropy_delta": (per_doc["entropy_tuned"] - per_doc["entropy_base"])
               if "entropy_tuned" in per_doc and "entropy_base" in per_doc else None}
    for name, values in sources.items():
        if values is None:
            continue
        out[name] = _weighted_mean(values, counts)
    return out


def _weighted_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``values [D, ...]`` averaged with resample counts ``[B, D]`` -> ``[B, ...]``, skipping NaN."""
    flat = values.reshape(values.shape[0], -1)
    valid = ~np.isnan(flat)
    sums = counts @ np.where(valid, flat, 0.0)
    n = counts @ valid.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / n).reshape(counts.shape[0], *values.shape[1:])


def _per_doc_scores(tables: AnalysisTables, score: str, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(layer scores ``[B, L]``, head scores ``[B, L*H]`` or None) on resampled documents."""
    assert tables.per_doc is not None
    heads = _resampled_head_stats(tables.per_doc, counts)
    layers: dict[str, np.ndarray] = dict(tables.layers)
    if "actmag_rel_change" in tables.per_doc:
        layers["actmag_rel_change"] = _weighted_mean(tables.per_doc["actmag_rel_change"], counts)
    head = head_scores(score, heads) if score in HEAD_SCORES and heads else None
    return layer_scores(score, heads, layers), head


def _needs(score: str) -> tuple[str, ...]:
    return {"kl": ("kl_base_tuned",), "kl-sym": ("kl_base_tuned", "kl_tuned_base"),
            "entropy": ("entropy_base", "entropy_tuned"), "activation": ("actmag_rel_change",),
            "weights": (), "combined": ("kl_base_tuned", "entropy_base", "entropy_tuned", "actmag_rel_change")}[score]


# ---------------------------------------------------------------- selection

@writes_file("out", circuit_file)
def select_circuit(analysis_dir: str | Path, score: str = "kl", top_layers: int = 3, top_heads: int = 0,
                   n_bootstrap: int = 1000, seed: int = 0, out: str | Path | None = None) -> Circuit:
    """Rank layers (and heads) by ``score``; measure bootstrap stability; write ``out`` if given."""
    cfg = CircuitConfig(score, top_layers, top_heads, n_bootstrap, seed)
    if score not in SCORES:
        raise CircuitError(f"--score {score}: choose one of {', '.join(SCORES)}")
    tables = read_analysis(analysis_dir)
    n_layers = tables.n_layers
    n_heads = tables.heads["kl_base_tuned"].shape[1]
    if not 1 <= top_layers <= n_layers:
        raise CircuitError(f"--top-layers {top_layers}: must be between 1 and the {n_layers} layers analysed")
    if not 0 <= top_heads <= n_layers * n_heads:
        raise CircuitError(f"--top-heads {top_heads}: must be between 0 and the {n_layers * n_heads} heads analysed")
    scores = layer_scores(score, tables.heads, tables.layers)
    if np.all(np.isnan(scores)):
        raise CircuitError(f"{tables.folder}: the statistics needed for --score {score} are missing or NaN")
    selected = top_k(scores, top_layers)
    heads = head_scores(score, tables.heads) if top_heads else None
    selected_heads = top_k(heads, top_heads) if heads is not None else np.array([], dtype=int)

    stability, head_stability, frequency, note = _stability(tables, cfg, selected, selected_heads, n_heads)
    summary_path = tables.folder / "summary.json"
    analysis_prov = read_json(summary_path).get("provenance") if summary_path.is_file() else None
    circuit: dict[str, Any] = {
        "layers": sorted(int(l) for l in selected),
        "heads": [Site(int(i // n_heads), "attn_head", int(i % n_heads)).name
                  for i in selected_heads] if top_heads else [],
        "ranked_layers": [int(l) for l in top_k(scores, n_layers)],
        "scores": [None if math.isnan(s) else float(s) for s in scores],
        "score": score,
        "definition": DEFINITIONS[score],
        "ranking": _RANKING,
        "top_layers": top_layers,
        "top_heads": top_heads,
        "stability": stability,
        "stability_definition": _BOOTSTRAP if note is None else note,
        "n_layers": n_layers,
        "n_heads": n_heads,
    }
    if top_heads:
        circuit["head_scores"] = {Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: float(heads[i])  # type: ignore[index]
                                  for i in selected_heads}
        circuit["head_stability"] = head_stability
    if frequency is not None:
        circuit["topk_frequency"] = frequency
    circuit["provenance"] = provenance(analysis={"dir": str(Path(analysis_dir).resolve()),
                                                 "provenance": analysis_prov},
                                       seed=seed, config=asdict(cfg))
    result = Circuit(sorted(int(l) for l in selected), parse_sites(circuit["heads"]), circuit)
    if out is not None:
        result.save(out)
    return result


_Stability = tuple[dict[str, Any], dict[str, Any] | None, list[float] | None, str | None]


def _stability(tables: AnalysisTables, cfg: CircuitConfig, selected: np.ndarray, selected_heads: np.ndarray,
               n_heads: int) -> _Stability:
    """Top-K frequency per selected layer (and head) over document resamples."""
    null = {str(int(l)): None for l in selected}
    null_heads = ({Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: None for i in selected_heads}
                  if cfg.top_heads else None)
    if cfg.score == "weights":
        return null, null_heads, None, ("weights score has no per-document variation (it compares weights, "
                                        "not activations): bootstrap stability is undefined, reported as null")
    if tables.per_doc is None:
        return null, null_heads, None, "per_doc.safetensors missing from the analysis folder: stability not computed"
    missing = [k for k in _needs(cfg.score) if k not in tables.per_doc]
    if missing:
        return null, null_heads, None, f"per_doc.safetensors lacks {', '.join(missing)}: stability not computed"
    if cfg.n_bootstrap < 1:
        return null, null_heads, None, "n_bootstrap = 0: stability not computed"
    n_docs = next(iter(tables.per_doc.values())).shape[0]
    full_sample, _ = _per_doc_scores(tables, cfg.score, np.ones((1, n_docs)))
    per_doc_top = sorted(int(l) for l in top_k(full_sample[0], cfg.top_layers))
    counts = resample_counts(n_docs, cfg.n_bootstrap, cfg.seed)
    layer_boot, head_boot = _per_doc_scores(tables, cfg.score, counts)
    in_top = np.zeros(tables.n_layers)
    for row in top_k(layer_boot, cfg.top_layers):
        in_top[row] += 1
    frequency = (in_top / cfg.n_bootstrap).tolist()
    stability: dict[str, float | None] = {str(int(l)): frequency[int(l)] for l in selected}
    head_stability = None
    if cfg.top_heads and head_boot is not None:
        head_in_top = np.zeros(head_boot.shape[-1])
        for row in top_k(head_boot, cfg.top_heads):
            head_in_top[row] += 1
        head_stability = {Site(int(i // n_heads), "attn_head", int(i % n_heads)).name:
                          float(head_in_top[i] / cfg.n_bootstrap)
                          for i in selected_heads}
    note = None
    if per_doc_top != sorted(int(l) for l in selected):
        note = (_BOOTSTRAP + f". Caution: with every document weighted equally the top-{cfg.top_layers} "
                f"layers are {per_doc_top}, not the selected ones (the CSV statistics weight documents "
                "by their number of tokens)")
    return stability, head_stability, frequency, note


# ---------------------------------------------------------------- circuits by cause

@writes_file("out", circuit_file)
def select_circuit_by_attribution(attribution_dir: str | Path, top_layers: int = 3, top_heads: int = 0,
                                  direction: str | None = None, n_bootstrap: int = 1000, seed: int = 0,
                                  out: str | Path | None = None) -> Circuit:
    """Layers (and heads) whose patching from the other model moves the loss most, by attribution.

    Layer score: |effect| of its attention plus |effect| of its MLP contribution; head score: |effect|.
    Stability re-ranks on document resamples of the per-document estimates (attribution_neurons.safetensors).
    """
    from sumcircuit.causal.attribution import AttributionResult

    folder = require_complete(attribution_dir)
    if not (folder / "attribution.json").is_file():
        raise CircuitError(f"attribution {folder}: not a folder written by `sumcircuit attribute`")
    result = AttributionResult.read(folder)
    directions = result.summary.get("directions") or []
    chosen = direction or ("denoise" if "denoise" in directions else (directions or ["denoise"])[0])
    if chosen not in directions:
        raise CircuitError(f"direction {chosen}: {folder} has {', '.join(directions) or 'none'}")
    n_layers, n_heads = int(result.summary["n_layers"]), int(result.summary["n_heads"])
    if not 1 <= top_layers <= n_layers:
        raise CircuitError(f"--top-layers {top_layers}: must be between 1 and the {n_layers} layers")
    effects = result.effects(chosen)
    layer_scores = np.array([abs(effects.get(f"L{l}.attn", math.nan)) + abs(effects.get(f"L{l}.mlp", math.nan))
                             for l in range(n_layers)])
    if np.all(np.isnan(layer_scores)):
        raise CircuitError(f"{folder}: no layer rows (run `sumcircuit attribute --granularity layer` or all)")
    head_grid = np.array([abs(effects.get(f"L{l}.H{h}", math.nan)) for l in range(n_layers) for h in range(n_heads)])
    if top_heads and np.all(np.isnan(head_grid)):
        raise CircuitError(f"--top-heads {top_heads}: {folder} has no head rows")
    selected = top_k(layer_scores, top_layers)
    selected_heads = top_k(head_grid, top_heads) if top_heads else np.array([], dtype=int)
    stability, head_stability = _attribution_stability(result, chosen, selected, selected_heads, n_layers, n_heads,
                                                       top_layers, top_heads, n_bootstrap, seed)
    head_sites = [Site(int(i // n_heads), "attn_head", int(i % n_heads)) for i in selected_heads]
    summary: dict[str, Any] = {
        "layers": sorted(int(l) for l in selected), "heads": [h.name for h in head_sites],
        "ranked_layers": [int(l) for l in top_k(layer_scores, n_layers)],
        "scores": [None if math.isnan(s) else float(s) for s in layer_scores],
        "score": "attribution", "direction": chosen, "definition": DEFINITIONS["attribution"],
        "ranking": _RANKING, "top_layers": top_layers, "top_heads": top_heads,
        "stability": stability, "stability_definition": _BOOTSTRAP.replace("per_doc.safetensors",
                                                                            "attribution_neurons.safetensors"),
        "n_layers": n_layers, "n_heads": n_heads,
        "head_scores": {h.name: float(head_grid[i]) for h, i in zip(head_sites, selected_heads)},
        "head_stability": head_stability,
        "provenance": provenance(attribution={"dir": str(folder.resolve()),
                                              "provenance": result.summary.get("provenance")},
                                 seed=seed, config={"top_layers": top_layers, "top_heads": top_heads,
                                                    "direction": chosen, "n_bootstrap": n_bootstrap}),
    }
    circuit = Circuit(summary["layers"], head_sites, summary)
    if out is not None:
        circuit.save(out)
    return circuit


def _attribution_stability(result: Any, direction: str, selected: np.ndarray, selected_heads: np.ndarray,
                           n_layers: int, n_heads: int, top_layers: int, top_heads: int, n_bootstrap: int,
                           seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Top-K frequency over document resamples of the per-document loss deltas (|mean| ranks like |effect|)."""
    per_doc = result.per_doc
    attn = [per_doc.get(f"{direction}.attn.{l}") for l in range(n_layers)]
    mlp = [per_doc.get(f"{direction}.mlp.{l}") for l in range(n_layers)]
    null = {str(int(l)): None for l in selected}
    null_heads = {Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: None for i in selected_heads}
    if any(a is None for a in attn) or any(m is None for m in mlp) or n_bootstrap < 1:
        return null, null_heads
    n_docs = attn[0].shape[0]
    counts = resample_counts(n_docs, n_bootstrap, seed)
    boot = lambda x: np.abs(counts @ np.asarray(x, dtype=np.float64) / n_docs)  # noqa: E731  [R, units]
    layer_boot = np.concatenate([boot(a) + boot(m) for a, m in zip(attn, mlp)], axis=1)  # [R, L]
    in_top = np.zeros(n_layers)
    for row in top_k(layer_boot, top_layers):
        in_top[row] += 1
    stability: dict[str, Any] = {str(int(l)): float(in_top[int(l)] / n_bootstrap) for l in selected}
    heads = [per_doc.get(f"{direction}.attn_heads.{l}") for l in range(n_layers)]
    if not top_heads or any(h is None for h in heads):
        return stability, null_heads
    head_boot = np.concatenate([boot(h) for h in heads], axis=1)  # [R, L * H]
    head_in_top = np.zeros(head_boot.shape[1])
    for row in top_k(head_boot, top_heads):
        head_in_top[row] += 1
    return stability, {Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: float(head_in_top[i] / n_bootstrap)
                       for i in selected_heads}
