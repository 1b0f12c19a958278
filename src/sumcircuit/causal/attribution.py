"""Attribution patching between a base and a fine-tuned model: every head, block and neuron at once.

The pair is its own counterfactual: patching component ``c`` of the receiving
run (base for ``denoise``, tuned for ``noise``) with the other model's
activation changes the summary loss by approximately

    delta_c = (a_c(donor) - a_c(receiver)) . dL/da_c        (gradient in the receiving run)

(Nanda's attribution patching; Syed et al. 2023). One forward of each model
and one backward of the receiver give ``delta_c`` for every component, where
exact patching needs one forward per component. ``L`` is the very loss of
``patch`` (per-document mean CE over the summary tokens), so the estimated
patched loss ``L_receiver + delta_c`` goes through the same recovery formula
and bootstrap as ``patching.csv``, and the two files join row by row.

``method='relp'`` propagates relevance instead of the gradient (:mod:`.relevance`).
``method='atpstar'`` keeps the linear estimate and adds AtP*'s GradDrop scores
(:mod:`.graddrop`), which rank the heads ``confirm`` patches exactly.
``method='ig'`` integrates the gradient along the straight path between the
two models' *weights* (``theta(alpha) = receiver + alpha (donor - receiver)``,
``alpha = k/K``, ``k = 0..K-1``): the activations then move from the receiver's
towards the donor's, as in EAP-IG's interpolation, and ``K = 1`` is exactly
the linear estimate. Both are first-order estimates; ``validate=K`` checks
them against exact patching on the top-K and K random components.

One module because the estimate, its rows (shaped like patching's) and its result class are
one contract with ``patching.csv``; the exact-patching check lives in :mod:`.validation`.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_save_safetensors, atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.causal.config import AttributionConfig
from sumcircuit.causal.inputs import encode_for, finished, load_pair, local_runtime, run_key
from sumcircuit.causal.interventions import (
    RECEIVER,
    Activation,
    CostCounter,
    Interventions,
    batches,
    document_losses,
    grad_through,
    n_batches,
    per_unit,
    sum_over_processes,
)
from sumcircuit.causal.patching import (
    DEFINITIONS,
    ROW_COLUMNS,
    PatchRow,
    effect_of,
    gap_warning,
    patch_losses,
    recovery_intervals,
)
from sumcircuit.config import coerce_config
from sumcircuit.data.encoding import Encoded
from sumcircuit.models import LoadedModel, ModelLike
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.placement import execution_device
from sumcircuit.provenance import provenance
from sumcircuit.results import Result, typed_rows
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.sites import Site
from sumcircuit.stats import mean_ci, resample_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS_OF: dict[str, tuple[str, ...]] = {
    "layer": ("attn", "mlp"), "head": ("attn_heads",), "neuron": ("mlp_neurons",),
    "all": ("attn", "mlp", "attn_heads", "mlp_neurons"),
}
NEURON_ROWS = 1000  # neuron rows in attribution.csv per direction (largest |effect|); all are in the .safetensors


# ---------------------------------------------------------------- the estimate

@dataclass
class AttributionLosses:
    """Per-document losses of both models and, per direction and activation, the estimated deltas.

    ``deltas[direction][(kind, layer)]`` is ``[D, units]``: one column per head / neuron, or one
    column for a whole attention or MLP contribution.
    """

    doc_ids: list[str]
    base: np.ndarray
    tuned: np.ndarray
    deltas: dict[str, dict[Activation, np.ndarray]]
    cost: CostCounter
    wall_s: float
    graddrop: dict[str, dict[Activation, np.ndarray]] = field(default_factory=dict)  # [units] per key (atpstar)


def _units(kind: str, adapter: ArchitectureAdapter) -> int:
    return {"attn_heads": adapter.n_heads, "mlp_neurons": adapter.n_neurons}.get(kind, 1)


def _interpolate_(target: nn.Module, start: nn.Module, end: nn.Module, alpha: float) -> None:
    """``target``'s weights := start + alpha (end - start), in place."""
    with torch.no_grad():
        for t, a, b in zip(target.parameters(), start.parameters(), end.parameters()):
            t.copy_(torch.lerp(a, b, alpha))


def _gradients(model: nn.Module, adapter: ArchitectureAdapter, batch: dict[str, torch.Tensor],
               keys: Sequence[Activation], relp: bool = False) -> tuple[torch.Tensor, dict[Activation, torch.Tensor],
                                                                         dict[Activation, torch.Tensor]]:
    """Per-document losses, the activations and dL/da for each (one forward and one backward).

    Only the activations' gradients are computed (``torch.autograd.grad``), never the weights'.
    ``relp``: relevance-propagation coefficients instead of the gradient (:mod:`.relevance`).
    """
    from contextlib import nullcontext

    from sumcircuit.adapters import get_submodule
    from sumcircuit.causal.relevance import relevance_rules

    live: dict[Activation, torch.Tensor] = {}

    def keep(key: Activation, x: torch.Tensor) -> None:
        live[key] = x

    embed = get_submodule(model, adapter.spec.embed_tokens).register_forward_hook(grad_through)
    rules = relevance_rules(model, adapter) if relp else nullcontext()
    try:
        with torch.enable_grad(), rules, Interventions(model, adapter) as iv:
            for key in keys:
                iv.edit(key, functools.partial(keep, key))
            losses = document_losses(model, batch, grad=True)
            grads = torch.autograd.grad(losses.sum(), [live[k] for k in keys], allow_unused=True)
    finally:
        embed.remove()
    acts = {k: v.detach() for k, v in live.items()}
    return losses.detach().cpu(), acts, {k: (g if g is not None else torch.zeros_like(live[k])).detach()
                                         for k, g in zip(keys, grads)}


def attribution_losses(base: LoadedModel, tuned: LoadedModel, encoded: Sequence[Encoded],
                       cfg: AttributionConfig, *, progress: bool = True) -> AttributionLosses:
    """Estimated patched losses of every component in every direction, per document."""
    adapter = base.adapter
    keys = [(kind, layer) for layer in range(adapter.n_layers) for kind in KINDS_OF[cfg.granularity]]
    models = {"base": base.model, "tuned": tuned.model}
    path_model = copy.deepcopy(base.model) if cfg.method == "ig" and cfg.ig_steps > 1 else None
    device = execution_device(base.model)
    pad = int(base.tokenizer.pad_token_id)
    n = len(encoded)
    losses = {"base": np.zeros(n), "tuned": np.zeros(n)}
    deltas = {d: {k: np.zeros((n, _units(k[0], adapter))) for k in keys} for d in cfg.directions}
    drop_sums = {d: {k: np.zeros((adapter.n_layers, _units(k[0], adapter))) for k in keys}
                 for d in cfg.directions} if cfg.method == "atpstar" else {}
    cost = CostCounter()
    t0 = time.perf_counter()
    for idx, batch in tqdm(batches(encoded, cfg.batch_size, pad, device, shard=True), desc="attribution",
                           total=n_batches(n, cfg.batch_size, shard=True),
                           disable=not progress or not dist.is_main_process()):
        cost.batches += 1
        acts: dict[str, dict[Activation, torch.Tensor]] = {}
        first_grads: dict[str, dict[Activation, torch.Tensor]] = {}
        receivers = {RECEIVER[d] for d in cfg.directions}
        for label, model in models.items():  # a receiver's forward gives its activations and gradients
            if label in receivers:
                batch_losses, acts[label], first_grads[label] = _gradients(model, adapter, batch, keys,
                                                                           relp=cfg.method == "relp")
                cost.backwards += 1
            else:
                store: dict[Activation, torch.Tensor] = {}
                with torch.no_grad(), Interventions(model, adapter) as iv:
                    for key in keys:
                        iv.capture(key, store)
                    batch_losses = document_losses(model, batch)
                acts[label] = store
            losses[label][idx] = batch_losses.numpy()
            cost.add(adapter.n_layers)
        for direction in cfg.directions:
            recv = RECEIVER[direction]
            donor = "tuned" if recv == "base" else "base"
            steps = cfg.ig_steps if cfg.method == "ig" else 1
            grad_sum = dict(first_grads[recv])
            for k in range(1, steps):  # alpha = k / K along the weights
                assert path_model is not None
                _interpolate_(path_model, models[recv], models[donor], k / steps)
                _, _, grads = _gradients(path_model, adapter, batch, keys)
                cost.add(adapter.n_layers)
                cost.backwards += 1
                for key, g in grads.items():
                    grad_sum[key] = grad_sum[key] + g
            for key in keys:
                diff = acts[donor][key] - acts[recv][key]
                per_doc = per_unit((diff * grad_sum[key] / steps).double(), _units(key[0], adapter))
                deltas[direction][key][idx] = per_doc.cpu().numpy()
            if cfg.method == "atpstar":
                _add_dropped(drop_sums[direction], models[recv], adapter, batch, acts[donor], acts[recv], cost)
        del acts
    from sumcircuit.causal.graddrop import graddrop_scores

    scores: dict[str, dict[Activation, np.ndarray]] = {
        d: graddrop_scores({k: sum_over_processes(v) for k, v in per.items()}, n, adapter.n_layers)
        for d, per in drop_sums.items()}
    return AttributionLosses([e.doc_id for e in encoded], sum_over_processes(losses["base"]),
                             sum_over_processes(losses["tuned"]),
                             {d: {k: sum_over_processes(v) for k, v in per.items()} for d, per in deltas.items()},
                             cost.reduced(), time.perf_counter() - t0, scores)


def _add_dropped(sums: dict[Activation, np.ndarray], receiver: nn.Module, adapter: ArchitectureAdapter,
                 batch: dict[str, torch.Tensor], donor_acts: dict[Activation, torch.Tensor],
                 receiver_acts: dict[Activation, torch.Tensor], cost: CostCounter) -> None:
    """GradDrop: add this batch's estimates with each layer's backward dropped to ``sums`` ([L, units] per key)."""
    from sumcircuit.causal.graddrop import dropped_estimates

    diffs = {k: donor_acts[k] - receiver_acts[k] for k in sums}
    dropped = dropped_estimates(receiver, adapter, batch, diffs, {k: _units(k[0], adapter) for k in sums})
    for key, value in dropped.items():
        sums[key] += value.numpy()
    cost.add(adapter.n_layers)
    cost.backwards += adapter.n_layers


# ---------------------------------------------------------------- tables

def _sites_of(key: Activation, units: int) -> list[Site]:
    kind, layer = key
    if kind == "attn_heads":
        return [Site(layer, "attn_head", h) for h in range(units)]
    if kind == "mlp_neurons":
        return [Site(layer, "mlp_neuron", i) for i in range(units)]
    return [Site(layer, kind)]  # type: ignore[arg-type]


def attribution_rows(result: AttributionLosses, cfg: AttributionConfig,
                     neuron_rows: int = NEURON_ROWS) -> tuple[list[PatchRow], dict[str, np.ndarray]]:
    """Rows shaped like patching.csv (largest-|effect| neurons only) and the full neuron maps."""
    counts = resample_counts(len(result.base), cfg.n_bootstrap, cfg.seed)
    rows: list[PatchRow] = []
    neuron_maps: dict[str, np.ndarray] = {}
    gap = result.base.mean() - result.tuned.mean()
    for direction, per_key in result.deltas.items():
        recv = result.base if RECEIVER[direction] == "base" else result.tuned
        neuron_rows_here: list[PatchRow] = []
        for key, delta in per_key.items():
            patched = recv[None, :] + delta.T  # [units, D]
            means = patched.mean(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                recs = (result.base.mean() - means) / gap if gap != 0 else np.full(means.shape, math.nan)
            lows, highs = recovery_intervals(result.base, result.tuned, patched, counts, cfg.ci_level)
            out = neuron_rows_here if key[0] == "mlp_neurons" else rows
            for site, mean, rec, lo, hi in zip(_sites_of(key, delta.shape[1]), means, recs, lows, highs):
                out.append({"direction": direction, **site.to_row(),  # type: ignore[typeddict-item]
                            "loss_base": float(result.base.mean()),
                            "loss_tuned": float(result.tuned.mean()), "loss_patched": float(mean),
                            "recovery": float(rec), "recovery_ci_low": float(lo), "recovery_ci_high": float(hi),
                            "effect": effect_of(direction, float(rec))})
        neurons = [k for k in per_key if k[0] == "mlp_neurons"]
        if neurons:
            stacked = np.stack([per_key[k].mean(axis=0) for k in sorted(neurons, key=lambda k: k[1])])  # [L, N]
            with np.errstate(divide="ignore", invalid="ignore"):
                rec_map = -stacked / gap if direction == "denoise" else stacked / gap
            neuron_maps[f"{direction}.effect"] = rec_map
            if result.graddrop.get(direction):
                neuron_maps[f"{direction}.graddrop"] = np.stack([result.graddrop[direction][k]
                                                                 for k in sorted(neurons, key=lambda k: k[1])])
            neuron_maps[f"{direction}.delta_loss"] = stacked
            neuron_rows_here.sort(key=lambda r: -abs(r["effect"]) if math.isfinite(r["effect"]) else 0.0)
            rows.extend(neuron_rows_here[:neuron_rows])
    neuron_maps = {k: v for k, v in neuron_maps.items() if v.size}
    return rows, neuron_maps


BLOCK_KINDS = ("attn", "mlp")
Target = tuple[Activation, int, Site]  # (activation key, column of its delta table, the site)


def _block_targets(result: AttributionLosses, cfg: AttributionConfig) -> list[Target]:
    """Every attention/MLP block (two per layer): where a first-order estimate fails (L29.mlp on a real
    pair: estimated -3.0, exact +0.8), so they are patched exactly unless asked not to."""
    keys = sorted({k for per in result.deltas.values() for k in per if k[0] in BLOCK_KINDS}, key=lambda k: (k[1], k[0]))
    return [(k, 0, Site(k[1], k[0])) for k in keys] if cfg.blocks == "exact" else []  # type: ignore[arg-type]


def _confirm_targets(result: AttributionLosses, cfg: AttributionConfig, kind: str) -> list[Target]:
    """The ``confirm`` heads (``kind='attn_heads'``) or neurons (``'mlp_neurons'``) of largest estimated
    |effect| in each direction, their union; ranked by GradDrop score where computed (atpstar).

    Heads: the candidates a circuit by cause chooses among, once their exact values are known. Neurons: the
    largest neuron rows are then exact, as AtP* verifies its candidates. None without a gap (every effect NaN).
    """
    gap = result.base.mean() - result.tuned.mean()
    if not cfg.confirm or gap == 0 or not math.isfinite(gap):
        return []
    chosen: dict[str, Target] = {}
    for direction, per_key in result.deltas.items():
        scores = result.graddrop.get(direction)
        ranked = [(float(v), key, i) for key, delta in per_key.items() if key[0] == kind
                  for i, v in enumerate(scores[key] if scores else np.abs(delta.mean(axis=0))) if math.isfinite(v)]
        for _, key, i in sorted(ranked, key=lambda t: -t[0])[:cfg.confirm]:
            site = _sites_of(key, per_key[key].shape[1])[i]
            chosen[site.name] = (key, i, site)
    return list(chosen.values())


def graddrop_table(result: AttributionLosses) -> dict[str, dict[str, float]]:
    """Per direction, every head's and block's GradDrop score, largest first, for attribution.json (the
    neurons' are in the neuron maps); {} unless method atpstar."""
    out: dict[str, dict[str, float]] = {}
    for direction, per_key in result.graddrop.items():
        named = [(site.name, float(v)) for key, values in per_key.items() if key[0] != "mlp_neurons"
                 for site, v in zip(_sites_of(key, len(values)), values)]
        out[direction] = dict(sorted(named, key=lambda kv: -kv[1]))
    return out


def patch_exactly(base: LoadedModel, tuned: LoadedModel, encoded: Sequence[Encoded], cfg: AttributionConfig,
                  result: AttributionLosses, *,
                  progress: bool = True) -> dict[str, Any]:
    """Exact patching of the blocks and of the top ``confirm`` heads and neurons; their exact per-document
    deltas replace the estimates in ``result`` (one patching pass shares the clean runs).

    Returns what ``attribution.json`` records under ``blocks``, ``confirmed``
    (heads) and ``confirmed_neurons``: each site's estimated and exact effect,
    those whose estimate had the wrong sign, and the cost; {} when nothing is patched.
    """
    blocks = _block_targets(result, cfg)
    heads, neurons = _confirm_targets(result, cfg, "attn_heads"), _confirm_targets(result, cfg, "mlp_neurons")
    targets = blocks + heads + neurons
    if not targets:
        return {}
    from sumcircuit.causal.config import PatchConfig

    exact = patch_losses(base, tuned, encoded, PatchConfig(directions=cfg.directions, include_all=False,
                                                           batch_size=cfg.batch_size, seed=cfg.seed),
                         [site for *_, site in targets], progress=progress)
    gap = result.base.mean() - result.tuned.mean()
    estimated: dict[str, dict[str, float]] = {}
    exacts: dict[str, dict[str, float]] = {}
    for direction, per_key in result.deltas.items():
        recv = result.base if RECEIVER[direction] == "base" else result.tuned
        for key, column, site in targets:
            exact_delta = exact.patched[(direction, site.name)] - recv
            for table, delta in ((estimated, per_key[key][:, column]), (exacts, exact_delta)):
                rec = float((result.base.mean() - recv.mean() - delta.mean()) / gap) if gap != 0 else math.nan
                table.setdefault(direction, {})[site.name] = effect_of(direction, rec)
            per_key[key][:, column] = exact_delta

    def record(group: list[Target]) -> dict[str, Any]:
        names = {site.name for *_, site in group}
        est = {d: {n: e for n, e in v.items() if n in names} for d, v in estimated.items()}
        ex = {d: {n: e for n, e in v.items() if n in names} for d, v in exacts.items()}
        return {"sites": len(group), "estimated_effect": est, "exact_effect": ex,
                "estimate_sign_wrong": {d: sorted(n for n, e in ex[d].items() if e * est[d][n] < 0) for d in ex}}

    out: dict[str, Any] = {"cost": {**exact.cost.summary(base.adapter.n_layers), "wall_s": exact.wall_s}}
    if blocks:
        out["blocks"] = {"method": "exact", **record(blocks)}
    if heads:
        out["confirmed"] = {"k": cfg.confirm, **record(heads)}
    if neurons:
        out["confirmed_neurons"] = {"k": cfg.confirm, **record(neurons)}
    return out


# ---------------------------------------------------------------- result

@dataclass(repr=False)
class AttributionResult(Result):
    """Attribution: ``summary`` (attribution.json), rows like patching.csv, the full neuron map.

    Example:
        >>> result = sc.attribute(base, tuned, data)  # doctest: +SKIP
        >>> result.effects("denoise", kind="attn_head")  # doctest: +SKIP
    """

    kind: ClassVar[str] = "attribution"
    main_table: ClassVar[str] = "attribution"
    files: ClassVar[tuple[str, ...]] = ("attribution.json", "attribution.csv", "attribution_neurons.safetensors",
                                        "attribution.png", "attribution_heads.png")
    summary: dict[str, Any]
    rows: list[PatchRow]
    neurons: dict[str, np.ndarray] = field(default_factory=dict)  # "<direction>.effect": [L, N]
    per_doc: dict[str, np.ndarray] = field(default_factory=dict)  # "<direction>.<kind>.<layer>": [D, units]

    def describe(self) -> str:
        gap = self.summary.get("gap") or {}
        return (f"{self.summary.get('method')} attribution of {self.summary.get('granularity')} components over "
                f"{self.summary.get('n_docs')} documents, loss gap {gap.get('mean', float('nan')):+.4f}")

    def tables(self) -> dict[str, list[Any]]:
        return {"attribution": list(self.rows)}

    def plot(self, what: str = "layers") -> Figure:
        """``"layers"``: attention and MLP effects per layer; ``"heads"``: a layer x head heatmap."""
        from sumcircuit import plots

        n_layers, n_heads = int(self.summary.get("n_layers", 0)), int(self.summary.get("n_heads", 0))
        kinds = ("attn", "mlp") if what == "layers" else ("attn_head",)
        if what not in ("layers", "heads"):
            raise ValueError(f"plot {what!r}: choose layers or heads")
        return plots.patching_figure([r for r in self.rows if r["kind"] in kinds],
                                     granularity="layer" if what == "layers" else "head", n_layers=n_layers,
                                     n_heads=n_heads)

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """attribution.json, attribution.csv, attribution_neurons.safetensors, attribution.png (+ heads)."""
        from sumcircuit.plots import save_figure

        folder = Path(out)
        atomic_write_csv(folder / "attribution.csv", self.rows, ROW_COLUMNS)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.neurons.items()}
        tensors.update({f"per_doc.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                        for k, v in self.per_doc.items()})
        if tensors:
            atomic_save_safetensors(tensors, folder / "attribution_neurons.safetensors",
                                    {"layout": "<direction>.effect / .delta_loss: [layers, neurons] means over "
                                               "documents; per_doc.<direction>.<kind>.<layer>: [documents, units]"})
        has_layers = any(r["kind"] in ("attn", "mlp") for r in self.rows)
        has_heads = any(r["kind"] == "attn_head" for r in self.rows)
        if has_layers:
            save_figure(self.plot("layers"), folder / "attribution.png")
        if has_heads:
            save_figure(self.plot("heads"), folder / ("attribution_heads.png" if has_layers else "attribution.png"))
        atomic_write_json(folder / "attribution.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> AttributionResult:
        """An attribution folder back as a result."""
        p = require_complete(folder)
        neurons: dict[str, np.ndarray] = {}
        per_doc: dict[str, np.ndarray] = {}
        if (p / "attribution_neurons.safetensors").is_file():
            from safetensors.numpy import load_file

            for k, v in load_file(str(p / "attribution_neurons.safetensors")).items():
                (per_doc if k.startswith("per_doc.") else neurons)[k.removeprefix("per_doc.")] = v
        return cls(read_json(p / "attribution.json"), typed_rows(read_csv(p / "attribution.csv"), PatchRow),
                   neurons, per_doc)

    def effects(self, direction: str = "denoise", kind: str | None = None) -> dict[str, float]:
        """Component name -> effect (fraction of the loss gap), for one direction (and kind)."""
        return {r["component"]: float(r["effect"]) for r in self.rows
                if r["direction"] == direction and (kind is None or r["kind"] == kind)}


@writes_output("attribute")
def attribute(base: ModelLike, tuned: ModelLike, data: Any, config: AttributionConfig | None = None, *,
              runtime: Runtime | None = None, out: str | Path | None = None, resume: bool = True) -> AttributionResult:
    """Attribution patching of every component between ``base`` and ``tuned`` on ``data``.

    Args:
        base: the model before fine-tuning (a spec, a loaded model, or a result holding one).
        tuned: the fine-tuned model, same architecture.
        data: a :class:`~sumcircuit.data.DataConfig` (or a path, a Dataset, or encoded examples).
        config: granularity, directions, method, validation, intervals (default :class:`AttributionConfig`).
        runtime: device, dtype, progress.
        out: write ``attribution.*`` here.
        resume: read back a finished result of the same models, data and config in ``out``.

    Returns:
        Rows like ``patching.csv`` for every head, attention/MLP contribution and the top neurons, the full
        neuron map, per-document estimates and the summary.

    Example:
        >>> import sumcircuit as sc
        >>> result = sc.attribute("smollm2-135m-instruct", "runs/full/final", data)  # doctest: +SKIP
        >>> result.to_pandas().sort_values("effect").tail()  # doctest: +SKIP
    """
    cfg = coerce_config(AttributionConfig, config)
    rt = local_runtime(coerce_runtime(runtime))
    base_m, tuned_m = load_pair(base, tuned, rt)
    encoded, data_prov = encode_for(base_m, data)
    key = run_key("attribute", [base_m, tuned_m], data_prov, cfg, rt)
    if (done := finished(AttributionResult, out, key, resume)) is not None:
        return done
    result = attribution_losses(base_m, tuned_m, encoded, cfg, progress=rt.progress)
    estimate_rows, neurons = attribution_rows(result, cfg)  # what validation checks: every site as estimated
    exact = patch_exactly(base_m, tuned_m, encoded, cfg, result, progress=rt.progress)
    rows, neurons = attribution_rows(result, cfg) if exact else (estimate_rows, neurons)  # exact where patched
    adapter = base_m.adapter
    gap = mean_ci(result.base - result.tuned, resample_counts(len(encoded), cfg.n_bootstrap, cfg.seed), cfg.ci_level)
    summary: dict[str, Any] = {
        "n_docs": len(encoded), "granularity": cfg.granularity, "directions": list(cfg.directions),
        "method": cfg.method, "ig_steps": cfg.ig_steps if cfg.method == "ig" else 1,
        "n_layers": adapter.n_layers, "n_heads": adapter.n_heads, "n_neurons": adapter.n_neurons,
        "loss_base": float(result.base.mean()), "loss_tuned": float(result.tuned.mean()),
        "gap": gap,
        "neuron_rows_in_csv": NEURON_ROWS,
        "definition": {
            **DEFINITIONS,
            "attribution": "estimated patched loss per document = L_receiver + (a_donor - a_receiver) . dL/da, "
                           "the gradient taken in the receiving run (denoise: base, noise: tuned) of the same "
                           "loss as patch; recovery and effect then as for patching",
            "ig": "method ig: the gradient is averaged over K runs at weights receiver + (k/K)(donor - "
                  "receiver), k = 0..K-1 (K = 1 is the linear estimate)",
            "relp": "method relp: relevance-propagation coefficients in place of the gradient (normalisation "
                    "scales and attention probabilities held constant, act(x)/x through activations, half of a "
                    "gated product to each factor); same cost as linear",
            "neurons": f"attribution.csv holds the {NEURON_ROWS} neurons of largest |effect| per direction; "
                       "attribution_neurons.safetensors holds every neuron",
            "ci": f"{cfg.ci_level:.0%} percentile bootstrap over documents, {cfg.n_bootstrap} resamples, seed "
                  f"{cfg.seed}, paired across base/tuned/estimate",
        },
        "cost": {**result.cost.summary(adapter.n_layers), "wall_s": result.wall_s,
                 "docs_per_s": len(encoded) / result.wall_s if result.wall_s else None},
        "run_key": key,
        "blocks": exact.get("blocks") or {"method": "estimate"},
    }
    for part in ("confirmed", "confirmed_neurons"):
        if part in exact:
            summary[part] = exact[part]
    if result.graddrop:
        summary["graddrop"] = {"definition": "AtP* GradDrop: 1/(L-1) sum_l |mean estimate with layer l's attention "
                                             "and MLP outputs dropped from the backward|, in loss units; ranks the "
                                             "heads --confirm patches (neurons: <direction>.graddrop in "
                                             "attribution_neurons.safetensors)",
                               "scores": graddrop_table(result)}
    if exact:
        summary["cost"]["exact_patching"] = exact["cost"]
    warning = gap_warning(gap)
    if warning:
        summary["warning"] = warning
    if cfg.validate:
        t0 = time.perf_counter()
        from sumcircuit.causal.validation import validate

        summary["validation"] = validate(base_m, tuned_m, encoded, estimate_rows, cfg)
        summary["validation_wall_s"] = time.perf_counter() - t0
    summary["provenance"] = provenance(models=[base_m.provenance(), tuned_m.provenance()], **data_prov,
                                       seed=cfg.seed, config=cfg.to_dict(), dtype=rt.dtype,
                                       processes=dist.world_size())
    per_doc = {f"{d}.{k[0]}.{k[1]}": v for d, per in result.deltas.items() for k, v in per.items()
               if k[0] != "mlp_neurons"}
    res = AttributionResult(summary, rows, neurons, per_doc)
    if out is not None:
        dist.on_main(lambda: res.save(out))
    return res


def report_lines(result: AttributionResult) -> list[str]:
    """What ``sumcircuit attribute`` prints: losses and gap, the largest effects, validation, cost."""
    s = result.summary
    lines = [f"loss base {s['loss_base']:.4f}, tuned {s['loss_tuned']:.4f} (gap {s['gap']['mean']:+.4f} "
             f"[{s['gap']['ci_low']:+.4f}, {s['gap']['ci_high']:+.4f}]) over {s['n_docs']} documents"]
    if "warning" in s:
        lines.append(f"warning: {s['warning']}")
    for direction in s["directions"]:
        top = sorted((r for r in result.rows if r["direction"] == direction),
                     key=lambda r: -abs(float(r["effect"])))[:5]
        lines.append(f"{direction}: largest effects "
                     + ", ".join(f"{r['component']} {float(r['effect']):+.3f}" for r in top))
    exact = {label: s[part] for label, part in (("blocks", "blocks"), ("heads", "confirmed"),
                                                ("neurons", "confirmed_neurons")) if "sites" in s.get(part, {})}
    if exact:
        wrong = sorted({n for part in exact.values() for names in part["estimate_sign_wrong"].values() for n in names})
        lines.append("patched exactly: " + ", ".join(f"{p['sites']} {label}" for label, p in exact.items())
                     + (f"; the estimate had the other sign on {', '.join(wrong)}" if wrong else ""))
    for key, v in s.get("validation", {}).items():
        lines.append(f"validation {key}: pearson {v['pearson']:.3f}, spearman {v['spearman']:.3f}, "
                     f"top-{v['top_k']} overlap {v['top_k_overlap']:.2f} (n={v['n']})")
    cost = s["cost"]
    lines.append(f"{cost['forwards_per_batch']:.0f} forwards and {cost['backwards'] / max(cost['batches'], 1):.0f} "
                 f"backwards per batch, {cost['wall_s']:.1f} s")
    lines.append("wrote attribution.json, attribution.csv, attribution_neurons.safetensors, attribution.png")
    return lines
