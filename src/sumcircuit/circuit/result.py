"""A selected circuit: :class:`Circuit`, its file (``circuit.json``) and :func:`read_circuit` (strict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from sumcircuit.artifacts import atomic_write_json, read_json
from sumcircuit.circuit.config import CircuitError
from sumcircuit.outputs import claim_file
from sumcircuit.results import Result
from sumcircuit.sites import Site, SiteError, parse_sites

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class CircuitLayerRow(TypedDict):
    """One layer of a circuit's score table."""

    layer: int
    score: float | None
    rank: int | None
    selected: bool
    stability: float | None


class CircuitHeadRow(TypedDict):
    """One selected head."""

    component: str
    layer: int
    kind: str
    head: int | str
    neuron: int | str
    stability: float | None


@dataclass(repr=False)
class Circuit(Result):
    """A selected circuit: its layers, its heads as :class:`Site` s, and everything circuit.json holds.

    Example:
        >>> circuit = sc.select_circuit(analysis, sc.CircuitConfig(top_layers=3, top_heads=8))  # doctest: +SKIP
        >>> circuit.layers, [h.name for h in circuit.heads]  # doctest: +SKIP
    """

    kind: ClassVar[str] = "circuit"
    main_table: ClassVar[str] = "layers"
    files: ClassVar[tuple[str, ...]] = ("circuit.json",)
    layers: list[int]
    heads: list[Site]
    summary: dict[str, Any]

    def describe(self) -> str:
        heads = f", heads {', '.join(h.name for h in self.heads)}" if self.heads else ""
        return f"layers {self.layers}{heads} by {self.summary.get('score', '?')}"

    def tables(self) -> dict[str, list[Any]]:
        scores = self.summary.get("scores") or []
        ranked = self.summary.get("ranked_layers") or []
        rank = {int(l): i for i, l in enumerate(ranked)}
        stability = self.summary.get("stability") or {}
        layers = [CircuitLayerRow(layer=l, score=s, rank=rank.get(l), selected=l in self.layers,
                                  stability=stability.get(str(l))) for l, s in enumerate(scores)]
        head_stab = self.summary.get("head_stability") or {}
        heads = [{**h.to_row(), "stability": head_stab.get(h.name)} for h in self.heads]
        return {"layers": layers, "heads": heads}

    def model_layers(self) -> list[int]:
        """The circuit's layers (what targeted LoRA adapts)."""
        return list(self.layers)

    def plot(self) -> Figure:
        """Per-layer score, selected layers highlighted and labelled with their stability."""
        from sumcircuit import plots

        scores = [s if s is not None else float("nan") for s in self.summary.get("scores") or []]
        stability = {int(k): v for k, v in (self.summary.get("stability") or {}).items()}
        return plots.circuit_figure(scores, self.layers, stability,
                                    title=f"{self.summary.get('score')} score per layer")

    def save(self, out: str | Path) -> Path:
        """``circuit.json`` (``out`` is the file, or a folder to write it in)."""
        with claim_file(circuit_file(out), names=("circuit.json",)) as path:
            atomic_write_json(path, self.summary)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Circuit:
        """A circuit file, or a folder holding ``circuit.json`` (see :func:`read_circuit`)."""
        path = Path(folder)
        return read_circuit(path if path.suffix == ".json" else path / "circuit.json")


def circuit_file(out: str | Path) -> Path:
    """Where a circuit goes: ``out`` itself when it names a .json file, else ``out/circuit.json``."""
    path = Path(out)
    return path if path.suffix == ".json" else path / "circuit.json"


def read_circuit(path: str | Path) -> Circuit:
    """A circuit file, strictly checked: integer layers, heads as names (``L2.H3``) or ``[layer, head]`` pairs.

    Files of earlier versions (heads as ``[l, h]`` lists, stability keyed ``"2.3"``) load too.
    Wrong types are refused, never coerced.

    Args:
        path: a ``circuit.json`` written by ``sumcircuit circuit`` (or by hand).

    Returns:
        The circuit.

    Example:
        >>> import sumcircuit as sc
        >>> sc.read_circuit("runs/demo/circuit/circuit.json").layers  # doctest: +SKIP
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
