"""One finished study folder, read as what ``compare`` needs: its circuits, score profiles and analyses.

Only finished stages count (a study or stage with ``INCOMPLETE.json`` is
refused with a one-line error naming it), and every file is read strictly:
compare never guesses around a damaged or missing input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sumcircuit.errors import SumcircuitError
from sumcircuit.outputs import incomplete_reason
from sumcircuit.sites import Site
from sumcircuit.study.evidence import StudyEvidence, read_csv_if_finished, read_json_if_finished
from sumcircuit.study.layout import StudyLayout

CIRCUIT_KINDS = ("kl", "attribution")  # the circuit by change (the paper's) and by cause


class CompareError(SumcircuitError):
    """Runs that cannot be compared as asked (not studies, unfinished, missing a stage, different models)."""


@dataclass(frozen=True)
class CircuitScores:
    """A circuit's picks and the per-layer / per-head scores that ranked them."""

    layers: list[int]
    heads: list[str]
    layer_scores: np.ndarray  # [L]
    head_scores: np.ndarray | None  # [L * H], None when the stage kept no per-head score


@dataclass
class RunProfile:
    """What one study contributes to a comparison."""

    label: str
    folder: Path
    study: dict[str, Any]
    base: dict[str, Any]  # provenance of the base model (spec, model_type, weights_sha256)
    analysis: dict[str, Any]  # the analysis's summary.json
    per_doc: dict[str, np.ndarray]  # the analysis's per-document means and tokens
    doc_ids: list[str]
    circuits: dict[str, CircuitScores]
    control: dict[str, np.ndarray] | None = None
    control_doc_ids: list[str] = field(default_factory=list)
    transfer_from: dict[str, Any] | None = None
    attribution: dict[str, np.ndarray] | None = None  # per-document deltas: attn, mlp [D, L]; heads [D, L*H]
    confirmed: list[int] = field(default_factory=list)  # heads patched exactly (the circuit picks among them)

    @property
    def n_layers(self) -> int:
        """Layers of the studied model."""
        return int(self.analysis["n_layers"])

    @property
    def n_heads(self) -> int:
        """Query heads per layer."""
        return int(self.analysis["n_heads"])

    @property
    def layout_circuit(self) -> Path:
        """The study's KL circuit file (what another study's ``transfer_from`` names)."""
        return StudyLayout(self.folder).circuit_file

    @property
    def model_key(self) -> tuple[Any, ...]:
        """What makes two runs "the same model": base weights (or spec), depth and heads."""
        return (self.base.get("weights_sha256") or self.base.get("spec"), self.n_layers, self.n_heads)


def head_index(name: str, n_heads: int) -> int:
    """``L3.H2`` -> its position ``layer * H + head`` in a flattened ``[L, H]`` grid."""
    site = Site.parse(name)
    return site.layer * n_heads + int(site.index or 0)


def read_per_doc(folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """An analysis folder's per-document means ``[D, L, H]`` and tokens ``[D]``, and its document ids."""
    import json

    from safetensors import safe_open

    path = folder / "per_doc.safetensors"
    try:
        with safe_open(str(path), "numpy") as handle:
            tensors = {k: np.asarray(handle.get_tensor(k), dtype=np.float64) for k in handle.keys()}
            ids = json.loads((handle.metadata() or {}).get("doc_ids", "[]"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: cannot be read ({str(exc)[:120]}); rerun the analysis stage") from None
    missing = [k for k in ("kl_base_tuned", "entropy_tuned", "tokens") if k not in tensors]
    if missing:
        raise CompareError(f"{path}: tensor(s) {', '.join(missing)} missing; rerun the analysis stage")
    return tensors, ids


def _stage(folder: Path, stage: str, file: Path) -> dict[str, Any]:
    data = read_json_if_finished(file)
    if data is None:
        why = incomplete_reason(file.parent) if file.parent.is_dir() else None
        raise CompareError(f"{folder}: stage '{stage}' {'did not finish (' + why + ')' if why else 'is missing'}; "
                           "rerun `sumcircuit reproduce` on it")
    return data


def read_attribution_deltas(layout: StudyLayout, direction: str, n_layers: int,
                            n_heads: int) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """Per-document loss deltas of the attribution stage (exact for blocks and confirmed heads) and the confirmed
    heads, or None when the stage kept none: what re-picking the attribution circuit in a resample needs."""
    from safetensors import safe_open

    summary = read_json_if_finished(layout.attribution / "attribution.json")
    path = layout.attribution / "attribution_neurons.safetensors"
    if summary is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), "numpy") as handle:
            keys = set(handle.keys())

            def column(kind: str, width: int) -> np.ndarray | None:
                names = [f"per_doc.{direction}.{kind}.{layer}" for layer in range(n_layers)]
                if not all(n in keys for n in names):
                    return None
                return np.concatenate([np.asarray(handle.get_tensor(n), dtype=np.float64).reshape(-1, width)
                                       for n in names], axis=1)

            parts = {"attn": column("attn", 1), "mlp": column("mlp", 1), "heads": column("attn_heads", n_heads)}
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: cannot be read ({str(exc)[:120]}); rerun the attribution stage") from None
    if any(v is None for v in parts.values()) or (summary.get("blocks") or {}).get("method") != "exact":
        return None
    confirmed = ((summary.get("confirmed") or {}).get("exact_effect") or {}).get(direction) or {}
    heads = sorted(head_index(name, n_heads) for name in confirmed)
    return {k: v for k, v in parts.items() if v is not None}, heads


def _attribution_heads(layout: StudyLayout, direction: str, n_layers: int, n_heads: int) -> np.ndarray | None:
    rows = read_csv_if_finished(layout.attribution / "attribution.csv", ("direction", "kind", "layer", "head"))
    scores = np.full(n_layers * n_heads, np.nan)
    for row in rows:
        if row["kind"] == "attn_head" and row["direction"] == direction:
            scores[int(row["layer"]) * n_heads + int(row["head"])] = abs(float(row["effect"]))
    return scores if np.isfinite(scores).any() else None


def read_profile(folder: str | Path, label: str | None = None) -> RunProfile:
    """A finished study folder as a :class:`RunProfile` (one-line errors for anything missing or unfinished)."""
    root = Path(folder)
    layout = StudyLayout(root)
    if not root.is_dir():
        raise CompareError(f"{root}: not a folder (give `sumcircuit reproduce` run folders)")
    why = incomplete_reason(root)
    if why is not None:
        raise CompareError(f"{root}: the study has not finished ({why}); rerun `sumcircuit reproduce` to finish it")
    if not layout.manifest.is_file():
        raise CompareError(f"{root}: not a study (no reproduce.json); give `sumcircuit reproduce` run folders")
    evidence = StudyEvidence(root)
    manifest = evidence.manifest()
    analysis = _stage(root, "analysis", layout.analysis / "summary.json")
    per_doc, doc_ids = read_per_doc(layout.analysis)
    n_layers, n_heads = int(analysis["n_layers"]), int(analysis["n_heads"])
    kl_heads = np.average(per_doc["kl_base_tuned"], axis=0, weights=per_doc["tokens"]).reshape(-1)
    circuits: dict[str, CircuitScores] = {}
    for kind, file, stage in (("kl", layout.circuit_file, "circuit"),
                              ("attribution", layout.attribution_circuit_file, "circuit_attribution")):
        data = _stage(root, stage, file)
        head_scores = kl_heads if kind == "kl" and data.get("score") == "kl" else (
            _attribution_heads(layout, str(data.get("direction") or "denoise"), n_layers, n_heads)
            if kind == "attribution" else None)
        scores = np.array([np.nan if s is None else float(s) for s in data.get("scores") or []], dtype=np.float64)
        if scores.size != n_layers:
            raise CompareError(f"{file}: {scores.size} layer scores for a {n_layers}-layer model; rerun its stage")
        circuits[kind] = CircuitScores([int(x) for x in data["layers"]], [str(h) for h in data.get("heads") or []],
                                       scores, head_scores)
    control: dict[str, np.ndarray] | None = None
    control_ids: list[str] = []
    if layout.analysis_of("control").is_dir():
        _stage(root, "analysis_control", layout.analysis_of("control") / "summary.json")
        control, control_ids = read_per_doc(layout.analysis_of("control"))
        if control_ids != doc_ids or not np.array_equal(control["tokens"], per_doc["tokens"]):
            raise CompareError(f"{layout.analysis_of('control')}: not the documents of {layout.analysis}; "
                               "rerun both stages")
    models = (analysis.get("provenance") or {}).get("models") or [{}]
    deltas = read_attribution_deltas(layout, "denoise", n_layers, n_heads)
    return RunProfile(label or root.name, root, dict(manifest.get("study") or {}), dict(models[0]), analysis,
                      per_doc, doc_ids, circuits, control, control_ids,
                      (manifest.get("random_controls") or {}).get("transfer_from"),
                      deltas[0] if deltas else None, deltas[1] if deltas else [])
