"""Activation patching between a base and a tuned model on the same inputs.

``denoise`` runs the base model with one component's activation taken from
the tuned model (is the component sufficient?), ``noise`` the reverse (is it
necessary?). The fraction of the base-to-tuned loss gap that a patch
recovers is read per layer (attention and MLP contributions), per head or per
whole block, with bootstrap CIs over documents. Per batch: 2 clean forwards
plus one forward per component and direction, each replaying the unchanged
prefix from the clean cache.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.causal.config import DIRECTIONS, CausalError, Granularity, PatchConfig
from sumcircuit.causal.inputs import encode_for, finished, load_pair, local_runtime, run_key
from sumcircuit.causal.interventions import (
    RECEIVER,
    CostCounter,
    batches,
    block_activations,
    check_pair,
    check_site,
    clean_run,
    n_batches,
    run_intervened,
    site_value,
    sum_over_processes,
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
from sumcircuit.stats import mean_ci, percentile_interval, resample_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GRANULARITIES: tuple[Granularity, ...] = ("layer", "head", "block")
ALL = "all"
ROW_COLUMNS = ["direction", "component", "layer", "kind", "head", "neuron", "loss_base", "loss_tuned",
               "loss_patched", "recovery", "recovery_ci_low", "recovery_ci_high", "effect"]

DEFINITIONS = {
    "loss": "per document, mean CE over summary tokens (labels != -100); aggregated as the mean over documents",
    "recovery": "(L_base - L_patched) / (L_base - L_tuned) on losses averaged over documents "
                "(a ratio of means, not a mean of per-document ratios); 0 = base, 1 = tuned",
    "denoise": "run the base model with this component's activation taken from the tuned model; "
               "effect = recovery (is the component sufficient?)",
    "noise": "run the tuned model with this component's activation taken from the base model; "
             "effect = 1 - recovery = fraction of the gap lost (is it necessary?)",
    "components": "L{l}.H{h}: head h's slice of the attention output projection's input (TransformerLens "
                  "blocks.l.attn.hook_z); L{l}.attn / L{l}.mlp: what the attention / MLP block adds to the "
                  "residual stream, after the block's post-norm in Gemma 2/3 (hook_attn_out / hook_mlp_out); "
                  "L{l}.resid_post: the decoder block's output (hook_resid_post); 'all': every listed "
                  "component at once (embeddings, final norm and LM head are never patched, so 'all' is "
                  "< 1 if fine-tuning changed them)",
}


class PatchRow(TypedDict):
    """One row of ``patching.csv`` (and of ``attribution.csv``): a component patched in one direction."""

    direction: str
    component: str
    layer: int | str
    kind: str
    head: int | str
    neuron: int | str
    loss_base: float
    loss_tuned: float
    loss_patched: float
    recovery: float
    recovery_ci_low: float
    recovery_ci_high: float
    effect: float


class PatchDocRow(TypedDict):
    """One row of ``patching_per_doc.csv``."""

    doc_id: str
    direction: str
    component: str
    loss_base: float
    loss_tuned: float
    loss_patched: float


def patch_sites(adapter: ArchitectureAdapter, granularity: str, layers: Sequence[int] = ()) -> list[Site]:
    """The sites patched at a granularity: attn and mlp per layer, each head, or each block."""
    if granularity not in GRANULARITIES:
        raise CausalError(f"granularity {granularity}: choose one of {', '.join(GRANULARITIES)}")
    chosen = list(layers) or list(range(adapter.n_layers))
    for layer in chosen:
        check_site(Site(layer, "attn"), adapter, "layer")
    if granularity == "layer":
        return [s for l in chosen for s in (Site(l, "attn"), Site(l, "mlp"))]
    if granularity == "block":
        return [Site(l, "resid_post") for l in chosen]
    return [Site(l, "attn_head", h) for l in chosen for h in range(adapter.n_heads)]


def check_directions(directions: Sequence[str]) -> None:
    """Refuse a direction that is not denoise or noise."""
    for d in directions:
        if d not in DIRECTIONS:
            raise CausalError(f"direction {d}: choose one of {', '.join(DIRECTIONS)} or both")


@dataclass
class PatchLosses:
    """Per-document losses: ``base``, ``tuned`` ``[D]``; ``patched[(direction, name)] [D]``."""

    doc_ids: list[str]
    components: list[Site]
    base: np.ndarray
    tuned: np.ndarray
    patched: dict[tuple[str, str], np.ndarray]
    cost: CostCounter
    wall_s: float


def patch_losses(base: LoadedModel, tuned: LoadedModel, encoded: Sequence[Encoded], cfg: PatchConfig,
                 sites: Sequence[Site] | None = None, *, progress: bool = True,
                 groups: Sequence[tuple[str, Sequence[Site]]] | None = None) -> PatchLosses:
    """Patch every site in every direction (``sites``: these instead of the granularity's).

    ``groups``: named sets of sites, each patched at once, instead of one site at a time
    (the faithfulness curve patches a circuit's top-k components together).
    """
    check_pair(base, tuned)
    check_directions(cfg.directions)
    adapter = base.adapter
    if groups is not None:
        sets: list[tuple[str, list[Site]]] = [(name, list(members)) for name, members in groups]
        comps = list(dict.fromkeys(c for _, members in sets for c in members))
    else:
        comps = list(sites) if sites is not None else patch_sites(adapter, cfg.granularity, cfg.layers)
        sets = [(c.name, [c]) for c in comps]
        if cfg.include_all:
            sets.append((ALL, comps))
    device = execution_device(base.model)
    pad = int(base.tokenizer.pad_token_id)
    activations = sorted({c.activation for c in comps} | set(block_activations(adapter)))
    models = {"base": base.model, "tuned": tuned.model}
    n = len(encoded)
    losses = {"base": np.zeros(n), "tuned": np.zeros(n)}
    patched: dict[tuple[str, str], np.ndarray] = {(d, name): np.zeros(n) for d in cfg.directions for name, _ in sets}
    cost = CostCounter()
    t0 = time.perf_counter()
    with torch.no_grad():
        for idx, batch in tqdm(batches(encoded, cfg.batch_size, pad, device, shard=True), desc="patching",
                               total=n_batches(n, cfg.batch_size, shard=True),
                               disable=not progress or not dist.is_main_process()):
            cost.batches += 1
            caches = {}
            for label, model in models.items():
                batch_losses, caches[label] = clean_run(model, adapter, batch, activations, cost)
                losses[label][idx] = batch_losses.numpy()
            for direction in cfg.directions:
                recv = RECEIVER[direction]
                donor = caches["tuned" if recv == "base" else "base"]
                blocks = ({l: caches[recv][("resid_post", l)] for l in range(adapter.n_layers)}
                          if cfg.replay_prefix else None)
                for name, members in tqdm(sets, desc=direction, leave=False,
                                          disable=not progress or not dist.is_main_process()):
                    values = {c: site_value(c, donor[c.activation], adapter) for c in members}
                    patched[(direction, name)][idx] = run_intervened(
                        models[recv], adapter, batch, values, blocks, cost).numpy()
            del caches
    losses = {k: sum_over_processes(v) for k, v in losses.items()}
    patched = {k: sum_over_processes(v) for k, v in patched.items()}
    return PatchLosses([e.doc_id for e in encoded], comps, losses["base"], losses["tuned"], patched,
                       cost.reduced(), time.perf_counter() - t0)


def recovery(loss_base: np.ndarray, loss_tuned: np.ndarray, loss_patched: np.ndarray) -> float:
    """``(L_base - L_patched) / (L_base - L_tuned)`` on the means over documents."""
    gap = loss_base.mean() - loss_tuned.mean()
    return float((loss_base.mean() - loss_patched.mean()) / gap) if gap != 0 else float("nan")


def recovery_intervals(loss_base: np.ndarray, loss_tuned: np.ndarray, loss_patched: np.ndarray,
                       counts: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap of the recovery (a ratio of means) of many components at once.

    ``loss_patched`` is ``[C, D]``; documents are resampled once, paired across base, tuned and patched.
    """
    n = counts.shape[1]
    b, t = counts @ loss_base / n, counts @ loss_tuned / n  # [R]
    p = np.atleast_2d(loss_patched) @ counts.T / n  # [C, R]
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = (b[None, :] - p) / (b - t)[None, :]
    return percentile_interval(rec, ci, axis=1)


def recovery_ci(loss_base: np.ndarray, loss_tuned: np.ndarray, loss_patched: np.ndarray,
                counts: np.ndarray, ci: float) -> tuple[float, float]:
    """The interval of one component's recovery (:func:`recovery_intervals` of one row)."""
    low, high = recovery_intervals(loss_base, loss_tuned, loss_patched, counts, ci)
    return float(low[0]), float(high[0])


def effect_of(direction: str, rec: float) -> float:
    """The effect of a recovery: the recovery itself (denoise), or the share of the gap lost (noise)."""
    return rec if direction == "denoise" else 1.0 - rec


def summarize_patching(result: PatchLosses, cfg: PatchConfig) -> dict[str, Any]:
    """One row per (direction, component): mean losses, recovery with a bootstrap CI over documents."""
    counts = resample_counts(len(result.base), cfg.n_bootstrap, cfg.seed)
    by_name = {c.name: c for c in result.components}
    rows = []
    for (direction, name), loss in result.patched.items():
        comp = by_name.get(name)
        rec = recovery(result.base, result.tuned, loss)
        lo, hi = recovery_ci(result.base, result.tuned, loss, counts, cfg.ci_level)
        where = comp.to_row() if comp else {"component": ALL, "layer": "", "kind": ALL, "head": "", "neuron": ""}
        rows.append({"direction": direction, **where,
                     "loss_base": float(result.base.mean()), "loss_tuned": float(result.tuned.mean()),
                     "loss_patched": float(loss.mean()), "recovery": rec,
                     "recovery_ci_low": lo, "recovery_ci_high": hi, "effect": effect_of(direction, rec)})
    gap_ci = mean_ci(result.base - result.tuned, counts, cfg.ci_level)
    summary: dict[str, Any] = {
        "n_docs": len(result.base), "granularity": cfg.granularity, "directions": list(cfg.directions),
        "loss_base": mean_ci(result.base, counts, cfg.ci_level), "loss_tuned": mean_ci(result.tuned, counts, cfg.ci_level),
        "gap": gap_ci,
        "definition": {**DEFINITIONS,
                       "ci": f"{cfg.ci_level:.0%} percentile bootstrap over documents, {cfg.n_bootstrap} resamples, "
                             f"seed {cfg.seed}, paired across base/tuned/patched"},
    }
    warning = gap_warning(gap_ci)
    if warning:
        summary["warning"] = warning
    return {"summary": summary, "rows": rows}


def gap_warning(gap_ci: Mapping[str, float]) -> str | None:
    """Every recovery fraction divides by the base-tuned gap: say so when the gap is not clearly positive."""
    if gap_ci["ci_low"] <= 0 <= gap_ci["ci_high"] or gap_ci["mean"] <= 0:
        return ("the base-tuned loss gap is not clearly positive (CI includes 0 or tuned is worse): recovery "
                "ratios are unstable and hard to interpret")
    return None


@dataclass(repr=False)
class PatchResult(Result):
    """Patching: ``summary`` (patching.json), one row per (direction, component), per-document losses.

    Example:
        >>> result = sc.patch(base, tuned, data, sc.PatchConfig(granularity="head"))  # doctest: +SKIP
        >>> result.to_pandas().sort_values("effect").tail()  # doctest: +SKIP
    """

    kind: ClassVar[str] = "patching"
    main_table: ClassVar[str] = "patching"
    files: ClassVar[tuple[str, ...]] = ("patching.json", "patching.csv", "patching_per_doc.csv", "patching.png")
    summary: dict[str, Any]
    rows: list[PatchRow]
    per_doc: list[PatchDocRow] = field(default_factory=list)

    def describe(self) -> str:
        gap = self.summary.get("gap") or {}
        return (f"{self.summary.get('granularity')} patching over {self.summary.get('n_docs')} documents, loss gap "
                f"{gap.get('mean', float('nan')):+.4f}")

    def tables(self) -> dict[str, list[Any]]:
        return {"patching": list(self.rows), "patching_per_doc": list(self.per_doc)}

    def plot(self) -> Figure:
        """Per-layer effect with 95% CIs (layer/block), or a layer x head heatmap (head)."""
        from sumcircuit import plots

        return plots.patching_figure(self.rows, granularity=self.summary.get("granularity", "layer"),
                                     n_layers=int(self.summary.get("n_layers", 0)),
                                     n_heads=int(self.summary.get("n_heads", 0)))

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``patching.json``, ``patching.csv``, ``patching_per_doc.csv``, ``patching.png``."""
        from sumcircuit.plots import save_figure

        folder = Path(out)
        atomic_write_csv(folder / "patching.csv", self.rows, ROW_COLUMNS)
        atomic_write_csv(folder / "patching_per_doc.csv", self.per_doc,
                         ["doc_id", "direction", "component", "loss_base", "loss_tuned", "loss_patched"])
        save_figure(self.plot(), folder / "patching.png")
        atomic_write_json(folder / "patching.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> PatchResult:
        """A patching folder back as a result."""
        p = require_complete(folder)
        return cls(read_json(p / "patching.json"), typed_rows(read_csv(p / "patching.csv"), PatchRow),
                   typed_rows(read_csv(p / "patching_per_doc.csv"), PatchDocRow))


@writes_output("patch")
def patch(base: ModelLike, tuned: ModelLike, data: Any, config: PatchConfig | None = None, *,
          runtime: Runtime | None = None, out: str | Path | None = None, resume: bool = True) -> PatchResult:
    """Activation patching between ``base`` and ``tuned`` on ``data``.

    Args:
        base: the model before fine-tuning (a spec, a loaded model, or a result holding one).
        tuned: the fine-tuned model, same architecture.
        data: a :class:`~sumcircuit.data.DataConfig` (or a path, a Dataset, or encoded examples).
        config: granularity, directions, layers, intervals (default :class:`PatchConfig`).
        runtime: device, dtype, progress.
        out: write ``patching.*`` here.
        resume: read back a finished result of the same models, data and config in ``out`` instead of
            computing it again.

    Returns:
        One row per (direction, component) with recovery and its interval, per-document losses, summary.

    Example:
        >>> import sumcircuit as sc
        >>> sc.patch("smollm2-135m-instruct", "runs/full/final", data,
        ...          sc.PatchConfig(layers=(20,), directions="denoise")).to_pandas()  # doctest: +SKIP
    """
    cfg = coerce_config(PatchConfig, config)
    rt = local_runtime(coerce_runtime(runtime))
    base_m, tuned_m = load_pair(base, tuned, rt)
    encoded, data_prov = encode_for(base_m, data)
    key = run_key("patch", [base_m, tuned_m], data_prov, cfg, rt)
    if (done := finished(PatchResult, out, key, resume)) is not None:
        return done
    result = patch_losses(base_m, tuned_m, encoded, cfg, progress=rt.progress)
    tables = summarize_patching(result, cfg)
    summary = tables["summary"]
    summary.update({"n_layers": base_m.adapter.n_layers, "n_heads": base_m.adapter.n_heads, "run_key": key})
    summary["cost"] = {**result.cost.summary(base_m.adapter.n_layers), "wall_s": result.wall_s,
                       "docs_per_s": len(encoded) / result.wall_s if result.wall_s else None}
    summary["provenance"] = provenance(models=[base_m.provenance(), tuned_m.provenance()], **data_prov,
                                       seed=cfg.seed, config=cfg.to_dict(), dtype=rt.dtype,
                                       processes=dist.world_size())
    per_doc = [PatchDocRow(doc_id=d, direction=direction, component=name, loss_base=float(result.base[j]),
                           loss_tuned=float(result.tuned[j]), loss_patched=float(loss[j]))
               for (direction, name), loss in result.patched.items() for j, d in enumerate(result.doc_ids)]
    res = PatchResult(summary, tables["rows"], per_doc)
    if out is not None:
        dist.on_main(lambda: res.save(out))
    return res


def report_lines(result: PatchResult) -> list[str]:
    """What ``sumcircuit patch`` prints: losses and gap, any warning, the cost."""
    s = result.summary
    lines = [f"loss base {s['loss_base']['mean']:.4f}, tuned {s['loss_tuned']['mean']:.4f} "
             f"(gap {s['gap']['mean']:+.4f} [{s['gap']['ci_low']:+.4f}, {s['gap']['ci_high']:+.4f}]) "
             f"over {s['n_docs']} documents"]
    if "warning" in s:
        lines.append(f"warning: {s['warning']}")
    cost = s["cost"]
    lines.append(f"{cost['forwards_per_batch']:.0f} forwards per batch ({cost['full_forward_equivalents_per_batch']:.1f} "
                 f"full-forward equivalents), {cost['wall_s']:.1f} s")
    lines.append("wrote patching.json, patching.csv, patching_per_doc.csv, patching.png")
    return lines
