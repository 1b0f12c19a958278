"""Faithfulness curves: how much of the base-to-tuned loss gap a circuit's top-k layers recover, for every k.

One number per circuit hides how it was built; MIB (the circuit benchmark)
judges a circuit by a curve instead. For each circuit, its layers are added in
the order the circuit ranked them and, for k = 1..K, the attention and MLP
outputs of the first k layers are patched together (``denoise``: the base run
with the tuned model's outputs; ``noise``: the reverse). The area under the
curve (the mean recovery over k) summarises it, with a studentized bootstrap
interval over documents; random layer sets of the same size, in random order,
give the curve a circuit has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np

from sumcircuit.artifacts import atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.causal.config import CausalError, FaithfulnessConfig, PatchConfig
from sumcircuit.causal.inputs import encode_for, finished, load_pair, local_runtime, run_key
from sumcircuit.causal.patching import gap_warning, patch_losses
from sumcircuit.config import coerce_config
from sumcircuit.models import ModelLike
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.provenance import provenance
from sumcircuit.results import Result, typed_rows
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.sites import Site
from sumcircuit.stats import mean_ci, ratio_interval, resample_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = ("curve", "kind", "k", "layers", "effect", "effect_ci_low", "effect_ci_high")


class CurveRow(TypedDict):
    """One point of one curve: the first ``k`` layers of ``curve`` patched together."""

    curve: str
    kind: str  # "circuit" or "random"
    k: int
    layers: str  # "5,2,3": the layers patched, in the circuit's order
    effect: float
    effect_ci_low: float
    effect_ci_high: float


def _orders(cfg: FaithfulnessConfig) -> list[tuple[str, list[int]]]:
    """(name, layers in the circuit's ranking order) per circuit file; names are unique."""
    from sumcircuit.circuit.result import read_circuit

    out: list[tuple[str, list[int]]] = []
    for path in cfg.circuits:
        circuit = read_circuit(path)
        ranked = [int(x) for x in circuit.summary.get("ranked_layers") or []]
        order = [l for l in ranked if l in circuit.layers] + [l for l in circuit.layers if l not in ranked]
        name = Path(path).parent.name if Path(path).name == "circuit.json" else Path(path).stem
        while name in (n for n, _ in out):
            name += "'"
        out.append((name, order))
    return out


def _random_orders(sizes: Sequence[int], n_layers: int, n: int, seed: int) -> list[tuple[str, list[int]]]:
    """``n`` random layer sets of each size, each in a random order (the same seed gives the same sets)."""
    rng = np.random.default_rng(seed)
    return [(f"random{size}.{i + 1}", [int(x) for x in rng.choice(n_layers, size, replace=False)])
            for size in sorted(set(sizes)) for i in range(n)]


def _blocks(layers: Sequence[int]) -> list[Site]:
    return [Site(l, kind) for l in layers for kind in ("attn", "mlp")]


def curve_rows(curves: Sequence[tuple[str, str, list[int]]], losses: Any, cfg: FaithfulnessConfig
               ) -> tuple[list[CurveRow], dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """The curve points (effect with its interval), each curve's area under the curve with its interval, and
    the paired difference of the areas of every two circuits (``"a - b"``).

    Every one is a ratio of document means over the loss gap (the area: the mean
    over k = 1..K of the points), so each gets the studentized ratio interval
    (:func:`~sumcircuit.stats.ratio_interval`) on the same document resamples.
    """
    counts = resample_counts(len(losses.base), cfg.n_bootstrap, cfg.seed)
    gap = losses.base - losses.tuned  # per document

    def part(patched: np.ndarray) -> np.ndarray:  # the numerator of the effect, per document
        return np.asarray(losses.base - patched if cfg.direction == "denoise" else patched - losses.tuned)

    rows: list[CurveRow] = []
    areas: dict[str, dict[str, float]] = {}
    numerators: dict[str, np.ndarray] = {}
    for name, kind, order in curves:
        parts = [part(losses.patched[(cfg.direction, f"{name}@{k}")]) for k in range(1, len(order) + 1)]
        for k, numerator in enumerate(parts, start=1):
            effect, low, high = ratio_interval(numerator, gap, counts, cfg.ci_level)
            rows.append({"curve": name, "kind": kind, "k": k, "layers": ",".join(map(str, order[:k])),
                         "effect": effect, "effect_ci_low": low, "effect_ci_high": high})
        numerators[name] = np.mean(parts, axis=0)
        auc, low, high = ratio_interval(numerators[name], gap, counts, cfg.ci_level)
        areas[name] = {"auc": auc, "ci_low": low, "ci_high": high, "size": len(order)}
    circuits = [name for name, kind, _ in curves if kind == "circuit"]
    differences: dict[str, dict[str, float]] = {}
    for i, a in enumerate(circuits):
        for b in circuits[i + 1:]:
            diff, low, high = ratio_interval(numerators[a] - numerators[b], gap, counts, cfg.ci_level)
            differences[f"{a} - {b}"] = {"difference": diff, "ci_low": low, "ci_high": high}
    return rows, areas, differences


def _against_random(areas: dict[str, dict[str, float]], curves: Sequence[tuple[str, str, list[int]]]
                    ) -> dict[str, dict[str, Any]]:
    """Each circuit's area against the random sets of its size: how many it beats, and the empirical p-value."""
    out: dict[str, dict[str, Any]] = {}
    for name, kind, order in curves:
        if kind != "circuit":
            continue
        null = [areas[n]["auc"] for n, k, o in curves if k == "random" and len(o) == len(order)]
        if null:
            beaten = sum(a < areas[name]["auc"] for a in null)
            out[name] = {"n_random": len(null), "beats": beaten, "random_auc_mean": float(np.mean(null)),
                         "p_value": (1 + sum(a >= areas[name]["auc"] for a in null)) / (1 + len(null))}
    return out


@dataclass(repr=False)
class FaithfulnessResult(Result):
    """Faithfulness curves: ``summary`` (faithfulness.json: areas, comparison with random sets) and the points.

    Example:
        >>> result = sc.faithfulness(base, tuned, data, sc.FaithfulnessConfig(circuits="runs/c.json"))  # doctest: +SKIP
        >>> result.summary["auc"]  # doctest: +SKIP
    """

    kind: ClassVar[str] = "faithfulness"
    main_table: ClassVar[str] = "faithfulness"
    files: ClassVar[tuple[str, ...]] = ("faithfulness.json", "faithfulness.csv", "faithfulness.png")
    summary: dict[str, Any]
    rows: list[CurveRow] = field(default_factory=list)

    def describe(self) -> str:
        areas = self.summary.get("auc") or {}
        circuits = [f"{n} {a['auc']:.2f}" for n, a in areas.items() if n in (self.summary.get("circuits") or {})]
        return f"{self.summary.get('direction')} faithfulness over {self.summary.get('n_docs')} documents: " \
               f"area {', '.join(circuits) or '-'}"

    def tables(self) -> dict[str, list[Any]]:
        return {"faithfulness": list(self.rows)}

    def plot(self) -> Figure:
        """Each circuit's curve with its interval band; the random sets' curves in grey."""
        from sumcircuit import plots

        return plots.faithfulness_figure(self.rows, self.summary)

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``faithfulness.json``, ``faithfulness.csv``, ``faithfulness.png``."""
        from sumcircuit.plots import save_figure

        folder = Path(out)
        atomic_write_csv(folder / "faithfulness.csv", self.rows, COLUMNS)
        save_figure(self.plot(), folder / "faithfulness.png")
        atomic_write_json(folder / "faithfulness.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> FaithfulnessResult:
        """A faithfulness folder back as a result."""
        p = require_complete(folder)
        return cls(read_json(p / "faithfulness.json"), typed_rows(read_csv(p / "faithfulness.csv"), CurveRow))


@writes_output("faithfulness")
def faithfulness(base: ModelLike, tuned: ModelLike, data: Any, config: FaithfulnessConfig | None = None, *,
                 runtime: Runtime | None = None, out: str | Path | None = None,
                 resume: bool = True) -> FaithfulnessResult:
    """Faithfulness curves of circuits (and of random layer sets of the same sizes) between ``base`` and ``tuned``.

    Args:
        base: the model before fine-tuning (a spec, a loaded model, or a result holding one).
        tuned: the fine-tuned model, same architecture.
        data: a :class:`~sumcircuit.data.DataConfig` (or a path, a Dataset, or encoded examples).
        config: the circuit files, random sets, direction and intervals (:class:`FaithfulnessConfig`).
        runtime: device, dtype, progress.
        out: write ``faithfulness.*`` here.
        resume: read back a finished result of the same models, data, circuits and config in ``out``.

    Returns:
        One row per (curve, k) and each curve's area under the curve with its interval.

    Example:
        >>> import sumcircuit as sc
        >>> sc.faithfulness("smollm2-135m-instruct", "runs/full/final", data,
        ...                 sc.FaithfulnessConfig(circuits=("runs/circuit.json",))).summary["auc"]  # doctest: +SKIP
    """
    cfg = coerce_config(FaithfulnessConfig, config)
    if not cfg.circuits:
        raise CausalError("`circuits`: give at least one circuit.json (the curves compare circuits; random sets "
                          "only make the baseline)")
    orders = _orders(cfg)
    rt = local_runtime(coerce_runtime(runtime))
    base_m, tuned_m = load_pair(base, tuned, rt)
    n_layers = base_m.adapter.n_layers
    for name, order in orders:
        if not order or max(order) >= n_layers:
            raise CausalError(f"circuit {name}: layers {order} do not fit the model's {n_layers} layers")
    curves = [(n, "circuit", o) for n, o in orders] + \
             [(n, "random", o) for n, o in _random_orders([len(o) for _, o in orders], n_layers,
                                                           cfg.random_circuits, cfg.seed)]
    encoded, data_prov = encode_for(base_m, data)
    keyed = replace(cfg, circuits=tuple(f"{n}:{','.join(map(str, o))}" for n, o in orders))  # contents, not paths
    key = run_key("faithfulness", [base_m, tuned_m], data_prov, keyed, rt)
    if (done := finished(FaithfulnessResult, out, key, resume)) is not None:
        return done
    groups = [(f"{name}@{k}", _blocks(order[:k])) for name, _, order in curves for k in range(1, len(order) + 1)]
    losses = patch_losses(base_m, tuned_m, encoded, PatchConfig(directions=(cfg.direction,), include_all=False,
                                                                batch_size=cfg.batch_size),
                          groups=groups, progress=rt.progress)
    rows, areas, differences = curve_rows(curves, losses, cfg)
    counts = resample_counts(len(encoded), cfg.n_bootstrap, cfg.seed)
    gap = mean_ci(losses.base - losses.tuned, counts, cfg.ci_level)
    summary: dict[str, Any] = {
        "n_docs": len(encoded), "direction": cfg.direction, "n_layers": n_layers, "gap": gap,
        "circuits": {n: o for n, o in orders}, "auc": areas, "auc_differences": differences,
        "against_random": _against_random(areas, curves),
        "definition": {
            "curve": "effect of patching the attention and MLP outputs of a circuit's first k layers (its ranking "
                     "order) together, k = 1..K; denoise: recovery of the loss gap, noise: share of it lost",
            "auc": "mean effect over k = 1..K (area under the curve, 1 = the whole gap from the first layer on)",
            "random": f"{cfg.random_circuits} random layer sets of each circuit's size, in random order "
                      f"(seed {cfg.seed}); p_value: (1 + random sets with an area >= the circuit's) / (1 + sets)",
            "ci": f"{cfg.ci_level:.0%} studentized bootstrap of a ratio of document means (delta-method standard "
                  f"error), {cfg.n_bootstrap} resamples, paired across k and curves",
        },
        "cost": {**losses.cost.summary(n_layers), "wall_s": losses.wall_s},
        "run_key": key,
        "provenance": provenance(models=[base_m.provenance(), tuned_m.provenance()], **data_prov, seed=cfg.seed,
                                 config=asdict(cfg), dtype=rt.dtype),
    }
    warning = gap_warning(gap)
    if warning:
        summary["warning"] = warning
    result = FaithfulnessResult(summary, rows)
    if out is not None:
        from sumcircuit import distributed as dist

        dist.on_main(lambda: result.save(out))
    return result


def report_lines(result: FaithfulnessResult) -> list[str]:
    """What ``sumcircuit faithfulness`` prints: each circuit's area, against the random sets of its size."""
    s = result.summary
    lines = [f"{s['direction']} over {s['n_docs']} documents (loss gap {s['gap']['mean']:+.4f})"]
    if "warning" in s:
        lines.append(f"warning: {s['warning']}")
    for name, order in s["circuits"].items():
        area = s["auc"][name]
        versus = s["against_random"].get(name)
        line = (f"{name} (layers {', '.join(map(str, order))}): area {area['auc']:.3f} "
                f"[{area['ci_low']:.3f}, {area['ci_high']:.3f}]")
        if versus:
            line += (f"; beats {versus['beats']} of {versus['n_random']} random sets (their mean "
                     f"{versus['random_auc_mean']:.3f}, p = {versus['p_value']:.3f})")
        lines.append(line)
    lines.append("wrote faithfulness.json, faithfulness.csv, faithfulness.png")
    return lines
