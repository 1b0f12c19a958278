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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_write_csv, atomic_write_json
from sumcircuit.causal.interventions import (
    RECEIVER,
    CausalError,
    CostCounter,
    batches,
    block_activations,
    check_pair,
    check_site,
    clean_run,
    encode_examples,
    n_batches,
    run_intervened,
    site_value,
    sum_over_processes,
)
from sumcircuit.data import DataConfig, Encoded
from sumcircuit.models import LoadedModel, ensure_loaded
from sumcircuit.options import DIRECTIONS, GRANULARITIES
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import provenance
from sumcircuit.results import Result
from sumcircuit.sites import Site
from sumcircuit.stats import mean_ci, percentile_interval, resample_counts

Granularity = Literal["layer", "head", "block"]
Direction = Literal["denoise", "noise"]
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


@dataclass(frozen=True)
class PatchConfig:
    """Activation patching between a base and a tuned model of the same architecture."""

    granularity: Granularity = "layer"  # layer: attn and mlp per layer | head | block: resid_post
    directions: tuple[Direction, ...] = DIRECTIONS  # type: ignore[assignment]
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


def patch_sites(adapter: ArchitectureAdapter, granularity: str, layers: Sequence[int] = ()) -> list[Site]:
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
                 sites: Sequence[Site] | None = None) -> PatchLosses:
    """Patch every site in every direction (``sites``: these instead of the granularity's)."""
    check_pair(base, tuned)
    check_directions(cfg.directions)
    adapter = base.adapter
    comps = list(sites) if sites is not None else patch_sites(adapter, cfg.granularity, cfg.layers)
    sets: list[tuple[str, list[Site]]] = [(c.name, [c]) for c in comps]
    if cfg.include_all:
        sets.append((ALL, comps))
    device = next(base.model.parameters()).device
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
                               total=n_batches(n, cfg.batch_size, shard=True), disable=not dist.is_main_process()):
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
                for name, members in tqdm(sets, desc=direction, leave=False, disable=not dist.is_main_process()):
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
    return rec if direction == "denoise" else 1.0 - rec


def summarize_patching(result: PatchLosses, cfg: PatchConfig) -> dict[str, Any]:
    """One row per (direction, component): mean losses, recovery with a bootstrap CI over documents."""
    counts = resample_counts(len(result.base), cfg.n_bootstrap, cfg.seed)
    by_name = {c.name: c for c in result.components}
    rows = []
    for (direction, name), loss in result.patched.items():
        comp = by_name.get(name)
        rec = recovery(result.base, result.tuned, loss)
        lo, hi = recovery_ci(result.base, result.tuned, loss, counts, cfg.ci)
        where = comp.to_row() if comp else {"component": ALL, "layer": "", "kind": ALL, "head": "", "neuron": ""}
        rows.append({"direction": direction, **where,
                     "loss_base": float(result.base.mean()), "loss_tuned": float(result.tuned.mean()),
                     "loss_patched": float(loss.mean()), "recovery": rec,
                     "recovery_ci_low": lo, "recovery_ci_high": hi, "effect": effect_of(direction, rec)})
    gap_ci = mean_ci(result.base - result.tuned, counts, cfg.ci)
    summary: dict[str, Any] = {
        "n_docs": len(result.base), "granularity": cfg.granularity, "directions": list(cfg.directions),
        "loss_base": mean_ci(result.base, counts, cfg.ci), "loss_tuned": mean_ci(result.tuned, counts, cfg.ci),
        "gap": gap_ci,
        "definition": {**DEFINITIONS,
                       "ci": f"{cfg.ci:.0%} percentile bootstrap over documents, {cfg.n_bootstrap} resamples, "
                             f"seed {cfg.seed}, paired across base/tuned/patched"},
    }
    if gap_ci["ci_low"] <= 0 <= gap_ci["ci_high"] or gap_ci["mean"] <= 0:
        summary["warning"] = ("the base-tuned loss gap is not clearly positive (CI includes 0 or "
                              "tuned is worse): recovery ratios are unstable and hard to interpret")
    return {"summary": summary, "rows": rows}


@dataclass
class PatchResult(Result):
    """Patching: ``summary`` (patching.json), one row per (direction, component), per-document losses."""

    kind: ClassVar[str] = "patching"
    main_table: ClassVar[str] = "patching"
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    per_doc: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"patching": self.rows, "patching_per_doc": self.per_doc}

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``patching.json``, ``patching.csv``, ``patching_per_doc.csv``, ``patching.png``."""
        from sumcircuit.plots import plot_patching

        folder = Path(out)
        atomic_write_csv(folder / "patching.csv", self.rows, ROW_COLUMNS)
        atomic_write_csv(folder / "patching_per_doc.csv", self.per_doc,
                         ["doc_id", "direction", "component", "loss_base", "loss_tuned", "loss_patched"])
        plot_patching(self.rows, folder / "patching.png", granularity=self.summary.get("granularity", "layer"),
                      n_layers=int(self.summary.get("n_layers", 0)), n_heads=int(self.summary.get("n_heads", 0)))
        atomic_write_json(folder / "patching.json", self.summary)
        return folder


def load_pair(base: str | LoadedModel, tuned: str | LoadedModel, device: str, dtype: str,
              trust_remote_code: bool) -> tuple[LoadedModel, LoadedModel]:
    """Both models (specs are loaded, loaded models pass through); rank 0 fills caches first."""
    with dist.main_process_first():
        pair = [ensure_loaded(m, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
                for m in (base, tuned)]
    check_pair(pair[0], pair[1])
    return pair[0], pair[1]


def encode_for(loaded: LoadedModel, data: DataConfig | Sequence[Encoded]) -> tuple[list[Encoded], dict[str, Any]]:
    """Encoded examples and what to cite about them, from a DataConfig or already encoded examples."""
    if isinstance(data, DataConfig):
        encoded, source = encode_examples(loaded.tokenizer, data)
        return encoded, {"data": source.provenance(), "data_config": asdict(data)}
    return list(data), {"data": "in-memory encoded examples"}


@writes_output("patch")
def patch(base: str | LoadedModel, tuned: str | LoadedModel, data: DataConfig | Sequence[Encoded],
          config: PatchConfig | None = None, *, out: str | Path | None = None) -> PatchResult:
    """Activation patching between ``base`` and ``tuned`` on ``data``; save to ``out`` if given."""
    cfg = config or PatchConfig()
    dist.setup(cfg.device)
    cfg = replace(cfg, device=dist.local_device(cfg.device))
    base_m, tuned_m = load_pair(base, tuned, cfg.device, cfg.dtype, cfg.trust_remote_code)
    encoded, data_prov = encode_for(base_m, data)
    result = patch_losses(base_m, tuned_m, encoded, cfg)
    tables = summarize_patching(result, cfg)
    summary = tables["summary"]
    summary.update({"n_layers": base_m.adapter.n_layers, "n_heads": base_m.adapter.n_heads})
    summary["cost"] = {**result.cost.summary(base_m.adapter.n_layers), "wall_s": result.wall_s,
                       "docs_per_s": len(encoded) / result.wall_s if result.wall_s else None}
    summary["provenance"] = provenance(models=[base_m.provenance(), tuned_m.provenance()], **data_prov,
                                       seed=cfg.seed, config=asdict(cfg), processes=dist.world_size())
    per_doc = [{"doc_id": d, "direction": direction, "component": name, "loss_base": float(result.base[j]),
                "loss_tuned": float(result.tuned[j]), "loss_patched": float(loss[j])}
               for (direction, name), loss in result.patched.items() for j, d in enumerate(result.doc_ids)]
    res = PatchResult(summary, tables["rows"], per_doc)
    if out is not None:
        dist.on_main(lambda: res.save(out))
    return res
