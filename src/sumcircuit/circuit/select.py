"""Choosing a circuit: rank layers (and heads) by a score, and measure how stable the choice is.

This is the paper's selection step made explicit and checkable: the score is
named and defined in the output, and its stability is measured by re-ranking
over bootstrap resamples of the analysed documents. A change score is
*correlational*: whether the selected layers matter causally is what
``ablate`` and ``patch`` test; the ``attribution`` score ranks by estimated
cause instead. Selection is a pure function of an analysis (or attribution),
read from its folder or taken from the result in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sumcircuit.artifacts import read_csv, read_json
from sumcircuit.circuit.config import CIRCUIT_SCORES, CircuitConfig, CircuitError
from sumcircuit.circuit.result import Circuit, circuit_file
from sumcircuit.circuit.scores import has_head_score, head_scores, layer_scores, top_k
from sumcircuit.config import coerce_config
from sumcircuit.outputs import require_complete, writes_file
from sumcircuit.provenance import provenance
from sumcircuit.sites import Site, parse_sites
from sumcircuit.stats import resample_counts

if TYPE_CHECKING:
    from sumcircuit.analysis.result import AnalysisResult
    from sumcircuit.causal.attribution import AttributionResult

_RANKING = "descending score; ties broken by the lower index"
_BOOTSTRAP = ("documents resampled with replacement from per_doc.safetensors (each document weighted "
              "equally); per resample the score is recomputed from per-document means and the top-K "
              "re-selected; stability = fraction of resamples in which a selected item stays in the top-K")


# ---------------------------------------------------------------- reading

def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CircuitError(f"{path} not found: the analysis must be a folder written by `sumcircuit analyze`")
    return list(read_csv(path))


def _column(rows: list[dict[str, Any]], name: str, path: Path) -> np.ndarray:
    if rows and name not in rows[0]:
        raise CircuitError(f"{path}: no column '{name}' (columns: {', '.join(rows[0])})")
    try:
        return np.array([float(r[name]) if r[name] != "" else math.nan for r in rows])
    except ValueError as exc:
        raise CircuitError(f"{path}: column '{name}' is not numeric: {exc}") from exc


@dataclass
class AnalysisTables:
    """Per-head ``[L, H]`` and per-layer ``[L]`` statistics, plus per-document ones if present."""

    folder: Path | None  # None: an analysis in memory
    heads: dict[str, np.ndarray]  # kl_base_tuned, kl_tuned_base, entropy_delta: [L, H]
    layers: dict[str, np.ndarray]  # actmag_rel_change, weight_change_attn, weight_change_mlp: [L]
    per_doc: dict[str, np.ndarray] | None  # [D, L, H] / [D, L]
    provenance: dict[str, Any] | None = None  # the analysis's own

    @property
    def n_layers(self) -> int:
        """Layers analysed."""
        return int(next(iter(self.heads.values())).shape[0])


def read_analysis(source: str | Path | AnalysisResult) -> AnalysisTables:
    """The statistics a change score reads, from an analysis folder or an :class:`AnalysisResult`."""
    if not isinstance(source, (str, Path)):
        per_doc_t = {k: v.double().numpy() for k, v in source.per_doc.items()} if source.per_doc else None
        return _tables(None, list(source.heads), list(source.layers), per_doc_t,  # type: ignore[arg-type]
                       source.summary, Path("heads.csv"), Path("layers.csv"))
    folder = Path(source)
    if not folder.is_dir():
        raise CircuitError(f"analysis {folder}: not a folder")
    require_complete(folder)
    per_doc = None
    if (folder / "per_doc.safetensors").is_file():
        from safetensors.numpy import load_file

        per_doc = {k: v.astype(np.float64) for k, v in load_file(str(folder / "per_doc.safetensors")).items()}
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    return _tables(folder, _read_csv(folder / "heads.csv"), _read_csv(folder / "layers.csv"), per_doc, summary,
                   folder / "heads.csv", folder / "layers.csv")


def _tables(folder: Path | None, head_rows: list[dict[str, Any]], layer_rows: list[dict[str, Any]],
            per_doc: dict[str, np.ndarray] | None, summary: dict[str, Any], heads_path: Path,
            layers_path: Path) -> AnalysisTables:
    if not head_rows or not layer_rows:
        raise CircuitError(f"{folder or 'analysis'}: heads.csv or layers.csv is empty")
    layer_idx = _column(head_rows, "layer", heads_path).astype(int)
    head_idx = _column(head_rows, "head", heads_path).astype(int)
    n_layers, n_heads = layer_idx.max() + 1, head_idx.max() + 1
    heads: dict[str, np.ndarray] = {}
    for name in ("kl_base_tuned", "kl_tuned_base", "entropy_delta"):
        grid = np.full((n_layers, n_heads), math.nan)
        grid[layer_idx, head_idx] = _column(head_rows, name, heads_path)
        heads[name] = grid
    order = _column(layer_rows, "layer", layers_path).astype(int)
    layers: dict[str, np.ndarray] = {}
    for name in ("actmag_rel_change", "weight_change_attn", "weight_change_mlp"):
        values = np.full(n_layers, math.nan)
        if name in layer_rows[0]:
            values[order] = _column(layer_rows, name, layers_path)
        layers[name] = values
    return AnalysisTables(folder, heads, layers, per_doc, summary.get("provenance"))



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
        means: np.ndarray = (sums / n).reshape(counts.shape[0], *values.shape[1:])
        return means


def _per_doc_scores(tables: AnalysisTables, score: str, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(layer scores ``[B, L]``, head scores ``[B, L*H]`` or None) on resampled documents."""
    assert tables.per_doc is not None
    heads = _resampled_head_stats(tables.per_doc, counts)
    layers: dict[str, np.ndarray] = dict(tables.layers)
    if "actmag_rel_change" in tables.per_doc:
        layers["actmag_rel_change"] = _weighted_mean(tables.per_doc["actmag_rel_change"], counts)
    head = head_scores(score, heads) if has_head_score(score) and heads else None
    return layer_scores(score, heads, layers), head


@writes_file("out", circuit_file, names=("circuit.json",))
def select_circuit(source: str | Path | AnalysisResult | AttributionResult, config: CircuitConfig | None = None, *,
                   out: str | Path | None = None) -> Circuit:
    """Rank layers (and heads) by a score, measure the choice's bootstrap stability, write ``out`` if given.

    Args:
        source: an analysis (folder or :class:`~sumcircuit.analysis.AnalysisResult`) for the change
            scores, or an attribution (folder or result) for the ``attribution`` score.
        config: the score (default: ``kl`` for an analysis, ``attribution`` for an attribution), how many
            layers and heads, and the stability bootstrap.
        out: a ``.json`` file, or a folder to write ``circuit.json`` in.

    Returns:
        The circuit: its layers, heads as Sites, scores, ranks, stability and provenance.

    Example:
        >>> import sumcircuit as sc
        >>> analysis = sc.load_run("runs/demo/analysis")  # doctest: +SKIP
        >>> sc.select_circuit(analysis, sc.CircuitConfig(score="kl", top_layers=3)).layers  # doctest: +SKIP
    """
    cfg = coerce_config(CircuitConfig, config)
    by_cause = _is_attribution(source)
    score = cfg.score or ("attribution" if by_cause else "kl")
    if (CIRCUIT_SCORES.get(score).source == "attribution") != by_cause:
        need = "an attribution (`sumcircuit attribute`)" if not by_cause else "an analysis (`sumcircuit analyze`)"
        raise CircuitError(f"score {score} needs {need}, got {_kind(by_cause)}")
    cfg = cfg.replace(score=score)
    circuit = _by_attribution(source, cfg) if by_cause else _by_change(source, cfg)  # type: ignore[arg-type]
    if out is not None:
        circuit.save(out)
    return circuit


def _kind(by_cause: bool) -> str:
    return "an attribution" if by_cause else "an analysis"


def _is_attribution(source: Any) -> bool:
    if isinstance(source, (str, Path)):
        return (Path(source) / "attribution.json").is_file()
    return getattr(source, "kind", None) == "attribution"


def _by_change(source: str | Path | AnalysisResult, cfg: CircuitConfig) -> Circuit:
    score, top_layers, top_heads = str(cfg.score), cfg.top_layers, cfg.top_heads
    tables = read_analysis(source)
    n_layers = tables.n_layers
    n_heads = tables.heads["kl_base_tuned"].shape[1]
    if not 1 <= top_layers <= n_layers:
        raise CircuitError(f"top_layers {top_layers}: must be between 1 and the {n_layers} layers analysed")
    if not 0 <= top_heads <= n_layers * n_heads:
        raise CircuitError(f"top_heads {top_heads}: must be between 0 and the {n_layers * n_heads} heads analysed")
    scores = layer_scores(score, tables.heads, tables.layers)
    if np.all(np.isnan(scores)):
        raise CircuitError(f"{tables.folder or 'analysis'}: the statistics needed for score {score} are missing "
                           "or NaN")
    heads = head_scores(score, tables.heads) if top_heads else None
    _refuse_nan(scores, "layer", tables.folder, score)
    if heads is not None:
        _refuse_nan(heads, "head", tables.folder, score, n_heads)
    selected = top_k(scores, top_layers)
    selected_heads = top_k(heads, top_heads) if heads is not None else np.array([], dtype=int)

    stability, head_stability, frequency, note = _stability(tables, cfg, selected, selected_heads, n_heads)
    circuit: dict[str, Any] = {
        "layers": sorted(int(l) for l in selected),
        "heads": [Site(int(i // n_heads), "attn_head", int(i % n_heads)).name
                  for i in selected_heads] if top_heads else [],
        "ranked_layers": [int(l) for l in top_k(scores, n_layers)],
        "scores": [None if math.isnan(s) else float(s) for s in scores],
        "score": score,
        "definition": CIRCUIT_SCORES.get(score).definition,
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
    where = str(tables.folder.resolve()) if tables.folder is not None else None
    circuit["provenance"] = provenance(analysis={"dir": where, "provenance": tables.provenance},
                                       seed=cfg.seed, config=asdict(cfg))
    return Circuit(sorted(int(l) for l in selected), parse_sites(circuit["heads"]), circuit)


def _refuse_nan(scores: np.ndarray, unit: str, folder: Path | None, score: str, n_heads: int = 0) -> None:
    """A NaN score means broken statistics: ranking around it would pick a circuit from the rest, silently."""
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        names = [f"L{i // n_heads}.H{i % n_heads}" if n_heads else f"L{i}" for i in bad[:3]]
        raise CircuitError(f"{folder or 'analysis'}: score {score} is NaN for {bad.size} {unit}(s) "
                           f"({', '.join(names)}{', ...' if bad.size > 3 else ''}); its statistics are broken")


_Stability = tuple[dict[str, Any], dict[str, Any] | None, list[float] | None, str | None]


def _stability(tables: AnalysisTables, cfg: CircuitConfig, selected: np.ndarray, selected_heads: np.ndarray,
               n_heads: int) -> _Stability:
    """Top-K frequency per selected layer (and head) over document resamples."""
    null = {str(int(l)): None for l in selected}
    null_heads = ({Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: None for i in selected_heads}
                  if cfg.top_heads else None)
    if not CIRCUIT_SCORES.get(str(cfg.score)).per_document:
        return null, null_heads, None, (f"{cfg.score} score has no per-document variation (it compares weights, "
                                        "not activations): bootstrap stability is undefined, reported as null")
    if tables.per_doc is None:
        return null, null_heads, None, "per_doc.safetensors missing from the analysis folder: stability not computed"
    score = str(cfg.score)
    missing = [k for k in CIRCUIT_SCORES.get(score).needs if k not in tables.per_doc]
    if missing:
        return null, null_heads, None, f"per_doc.safetensors lacks {', '.join(missing)}: stability not computed"
    if cfg.n_bootstrap < 1:
        return null, null_heads, None, "n_bootstrap = 0: stability not computed"
    n_docs = next(iter(tables.per_doc.values())).shape[0]
    full_sample, _ = _per_doc_scores(tables, score, np.ones((1, n_docs)))
    per_doc_top = sorted(int(l) for l in top_k(full_sample[0], cfg.top_layers))
    counts = resample_counts(n_docs, cfg.n_bootstrap, cfg.seed)
    layer_boot, head_boot = _per_doc_scores(tables, score, counts)
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

def _by_attribution(source: str | Path | AttributionResult, cfg: CircuitConfig) -> Circuit:
    """Layers (and heads) whose patching from the other model moves the loss most, by attribution.

    Layer score: |effect| of its attention plus |effect| of its MLP contribution; head score: |effect|.
    Stability re-ranks on document resamples of the per-document estimates (attribution_neurons.safetensors).
    """
    from sumcircuit.causal.attribution import AttributionResult

    top_layers, top_heads, n_bootstrap, seed = cfg.top_layers, cfg.top_heads, cfg.n_bootstrap, cfg.seed
    if isinstance(source, (str, Path)):
        folder: Path | None = require_complete(source)
        result = AttributionResult.read(source)
    else:
        folder, result = None, source
    directions = result.summary.get("directions") or []
    chosen = cfg.direction or ("denoise" if "denoise" in directions else (directions or ["denoise"])[0])
    if chosen not in directions:
        raise CircuitError(f"direction {chosen}: {folder or 'the attribution'} has {', '.join(directions) or 'none'}")
    n_layers, n_heads = int(result.summary["n_layers"]), int(result.summary["n_heads"])
    if not 1 <= top_layers <= n_layers:
        raise CircuitError(f"top_layers {top_layers}: must be between 1 and the {n_layers} layers")
    effects = result.effects(chosen)
    layer_scores = np.array([abs(effects.get(f"L{l}.attn", math.nan)) + abs(effects.get(f"L{l}.mlp", math.nan))
                             for l in range(n_layers)])
    if np.all(np.isnan(layer_scores)):
        if any(f"L{l}.{k}" in effects for l in range(n_layers) for k in ("attn", "mlp")):
            gap = result.summary.get("gap") or {}
            raise CircuitError(f"{folder or 'attribution'}: every layer's effect is NaN (the base-tuned loss gap is "
                               f"{gap.get('mean')}, interval [{gap.get('ci_low')}, {gap.get('ci_high')}]: with no "
                               "gap there is nothing to recover); nothing can be chosen by cause")
        raise CircuitError(f"{folder or 'attribution'}: no layer rows (run `sumcircuit attribute --granularity "
                           "layer` or all)")
    where = folder or "the attribution"
    if (result.summary.get("blocks") or {}).get("method") != "exact":
        raise CircuitError(f"{where}: its attention/MLP blocks are first-order estimates, whose sign can be wrong; "
                           "rerun `sumcircuit attribute` (it patches blocks exactly by default)")
    _refuse_nan(layer_scores, "layer", folder, "attribution")
    head_grid = np.full(n_layers * n_heads, math.nan)
    exact_heads: dict[str, float] = {}
    if top_heads:  # chosen among heads whose exact effect is known, by that exact effect
        exact_heads = ((result.summary.get("confirmed") or {}).get("exact_effect") or {}).get(chosen) or {}
        if len(exact_heads) < 2 * top_heads:
            raise CircuitError(f"`top_heads` {top_heads}: {where} has {len(exact_heads)} heads confirmed by exact "
                               f"patching; {top_heads} heads are chosen among at least {2 * top_heads}: rerun "
                               f"`sumcircuit attribute --confirm {2 * top_heads}`")
        for name, value in exact_heads.items():
            site = Site.parse(name)
            head_grid[site.layer * n_heads + int(site.index or 0)] = abs(value)
    selected = top_k(layer_scores, top_layers)
    selected_heads = top_k(head_grid, top_heads) if top_heads else np.array([], dtype=int)
    stability, head_stability = _attribution_stability(result, chosen, selected, selected_heads, n_layers, n_heads,
                                                       top_layers, top_heads, n_bootstrap, seed,
                                                       np.isfinite(head_grid) if top_heads else None)
    head_sites = [Site(int(i // n_heads), "attn_head", int(i % n_heads)) for i in selected_heads]
    estimated = ((result.summary.get("confirmed") or {}).get("estimated_effect") or {}).get(chosen) or {}
    summary: dict[str, Any] = {
        "layers": sorted(int(l) for l in selected), "heads": [h.name for h in head_sites],
        "ranked_layers": [int(l) for l in top_k(layer_scores, n_layers)],
        "scores": [None if math.isnan(s) else float(s) for s in layer_scores],
        "score": "attribution", "direction": chosen, "definition": CIRCUIT_SCORES.get("attribution").definition,
        "ranking": _RANKING, "top_layers": top_layers, "top_heads": top_heads,
        "stability": stability, "stability_definition": _BOOTSTRAP.replace("per_doc.safetensors",
                                                                            "attribution_neurons.safetensors"),
        "n_layers": n_layers, "n_heads": n_heads,
        "head_scores": {h.name: float(head_grid[i]) for h, i in zip(head_sites, selected_heads)},
        "head_stability": head_stability,
        "head_effects": {h.name: {"estimate": float(estimated.get(h.name, math.nan)),
                                  "exact": float(exact_heads[h.name])} for h in head_sites},
        "provenance": provenance(attribution={"dir": str(folder.resolve()) if folder is not None else None,
                                              "provenance": result.summary.get("provenance")},
                                 seed=seed, config={"top_layers": top_layers, "top_heads": top_heads,
                                                    "direction": chosen, "n_bootstrap": n_bootstrap}),
    }
    return Circuit(summary["layers"], head_sites, summary)


def _attribution_stability(result: Any, direction: str, selected: np.ndarray, selected_heads: np.ndarray,
                           n_layers: int, n_heads: int, top_layers: int, top_heads: int, n_bootstrap: int,
                           seed: int, candidates: np.ndarray | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
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
    def boot(x: np.ndarray) -> np.ndarray:  # [R, units]
        return np.asarray(np.abs(counts @ np.asarray(x, dtype=np.float64) / n_docs))

    layer_boot = np.concatenate([boot(a) + boot(m) for a, m in zip(attn, mlp)], axis=1)  # [R, L]
    in_top = np.zeros(n_layers)
    for row in top_k(layer_boot, top_layers):
        in_top[row] += 1
    stability: dict[str, Any] = {str(int(l)): float(in_top[int(l)] / n_bootstrap) for l in selected}
    heads = [per_doc.get(f"{direction}.attn_heads.{l}") for l in range(n_layers)]
    if not top_heads or any(h is None for h in heads):
        return stability, null_heads
    head_boot = np.concatenate([boot(h) for h in heads], axis=1)  # [R, L * H]
    if candidates is not None:  # re-ranked among the confirmed heads only, as the selection was
        head_boot[:, ~candidates] = np.nan
    head_in_top = np.zeros(head_boot.shape[1])
    for row in top_k(head_boot, top_heads):
        head_in_top[row] += 1
    return stability, {Site(int(i // n_heads), "attn_head", int(i % n_heads)).name: float(head_in_top[i] / n_bootstrap)
                       for i in selected_heads}
