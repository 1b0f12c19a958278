"""Ablation: remove a circuit (heads, or attention/MLP of layers) and read it against random sets.

Heads or whole attention / MLP contributions are replaced by zero or by their
data-set mean; the rise of the teacher-forced summary loss is the effect, and
random sets of the same size give its null distribution (empirical p-value).
Per batch: 1 clean forward (caching block outputs) + 1 ablated forward per
set, each computing only the layers from the set's first layer on.

One module because the targets, their random controls, the mean values and the effects with
their p-value are one computation; ROUGE under ablation lives in :mod:`.ablation_rouge`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.causal.config import AblationConfig, CausalError, LayerPart
from sumcircuit.causal.inputs import encode_for, finished, load_one, local_runtime, run_key
from sumcircuit.causal.interventions import (
    CostCounter,
    Interventions,
    batches,
    block_activations,
    check_site,
    clean_run,
    n_batches,
    run_intervened,
    site_value,
    sum_over_processes,
)
from sumcircuit.circuit.result import read_circuit
from sumcircuit.config import coerce_config
from sumcircuit.data.config import coerce_data
from sumcircuit.data.encoding import Encoded
from sumcircuit.models import LoadedModel, ModelLike
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.placement import execution_device
from sumcircuit.provenance import provenance
from sumcircuit.results import Result, typed_rows
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.sites import Site, parse_sites
from sumcircuit.stats import empirical_p_value, mean_ci, resample_counts, resampled_means, scalar_interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class AblationRow(TypedDict):
    """One row of ``ablation.csv``: the circuit (``set`` = circuit) or one random set."""

    set: str
    members: str
    size: int
    loss_clean: float
    loss_ablated: float
    effect: float
    effect_ci_low: float
    effect_ci_high: float


class AblationDocRow(TypedDict):
    """One row of ``ablation_per_doc.csv``."""

    doc_id: str
    set: str
    loss_clean: float
    loss_ablated: float


def layer_sites(layers: Sequence[int], component: LayerPart) -> list[Site]:
    """The attention and/or MLP sites of ``layers``."""
    kinds: tuple[Literal["attn", "mlp"], ...] = ("attn", "mlp") if component == "both" else (component,)
    return [Site(layer, kind) for layer in layers for kind in kinds]


def ablation_targets(cfg: AblationConfig, adapter: ArchitectureAdapter) -> list[Site]:
    """The sites a config ablates (from its heads, layers or circuit), checked against the model."""
    if cfg.circuit and not cfg.heads and not cfg.layers:
        circuit = read_circuit(cfg.circuit)
        if cfg.circuit_part == "heads":
            if not circuit.heads:
                raise CausalError(f"circuit {cfg.circuit}: has no heads (select them with "
                                  "`sumcircuit circuit --top-heads K`)")
            cfg = replace(cfg, heads=tuple(circuit.heads))
        else:
            cfg = replace(cfg, layers=tuple(circuit.layers))
    if bool(cfg.heads) == bool(cfg.layers):
        raise CausalError("give exactly one of heads, layers or circuit")
    if cfg.heads:
        return [check_site(s, adapter, "heads") for s in parse_sites(cfg.heads)]
    for layer in cfg.layers:
        check_site(Site(layer, "attn"), adapter, "layers")
    return layer_sites(sorted(set(cfg.layers)), cfg.component)


def random_sets(targets: Sequence[Site], adapter: ArchitectureAdapter, n: int, seed: int,
                pool: str = "all") -> list[list[Site]]:
    """``n`` random sets of the same size: as many heads, or as many layers (same block kinds).

    Drawn uniformly without replacement within a set, independently across
    sets, from all heads/layers (``pool='all'``, the circuit is one possible
    draw) or from those outside the circuit (``'complement'``).
    """
    rng = np.random.default_rng(seed)
    units: list[Any]
    chosen: set[Any]
    if targets and targets[0].kind == "attn_head":
        units = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
        chosen = {(c.layer, c.index) for c in targets}
        k = len(chosen)
        make: Callable[[list[Any]], list[Site]] = lambda picks: sorted(Site(l, "attn_head", h) for l, h in picks)
    else:
        units = list(range(adapter.n_layers))
        chosen = {c.layer for c in targets}
        k = len(chosen)
        kinds = sorted({c.kind for c in targets})
        make = lambda picks: sorted(Site(l, kind) for l in picks for kind in kinds)
    if pool == "complement":
        units = [u for u in units if u not in chosen]
    if k > len(units):
        raise CausalError(f"cannot draw random sets of {k} from a pool of {len(units)} "
                          f"({'heads' if targets[0].kind == 'attn_head' else 'layers'}, control_pool {pool})")
    return [make([units[i] for i in sorted(rng.choice(len(units), size=k, replace=False))]) for _ in range(n)]


def dataset_means(model: nn.Module, adapter: ArchitectureAdapter, encoded: Sequence[Encoded],
                  components: Sequence[Site], batch_size: int, pad_token_id: int,
                  device: str | torch.device, progress: bool = True) -> dict[Site, torch.Tensor]:
    """Mean activation of each component over all non-padding tokens of the data set (float64 sums).

    Under N processes each sums its own batches; sums and counts are then
    combined over processes before dividing, so every process ablates with the
    data-set mean, not its shard's.
    """
    sites = sorted({c.activation for c in components})
    sums: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    for _, batch in tqdm(batches(encoded, batch_size, pad_token_id, device, shard=True), desc="mean activations",
                         total=n_batches(len(encoded), batch_size, shard=True), leave=False,
                         disable=not progress or not dist.is_main_process()):
        mask = batch["attention_mask"].bool()
        store: dict[tuple[str, int], torch.Tensor] = {}
        with Interventions(model, adapter) as iv, torch.no_grad():
            for site in sites:
                iv.capture(site, store, reduce=functools.partial(_masked_sum, mask=mask))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False, logits_to_keep=1)
        for site, value in store.items():
            sums[site] = sums[site] + value if site in sums else value
        count += int(mask.sum())
    sums, count = _combine_sums(sums, count, device)
    means: dict[Site, torch.Tensor] = {}
    for c in components:
        means[c] = site_value(c, sums[c.activation] / count, adapter).float()
    return means


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask].double().sum(0)


def _combine_sums(sums: dict[tuple[str, int], torch.Tensor], count: int,
                  device: str | torch.device) -> tuple[dict[tuple[str, int], torch.Tensor], int]:
    """Per-site sums and the token count added over processes (in rank order, float64)."""
    if not dist.is_distributed():
        return sums, count
    parts = dist.all_gather_objects(({k: v.cpu() for k, v in sums.items()}, count))
    total: dict[tuple[str, int], torch.Tensor] = {}
    for part_sums, _ in parts:  # a process without batches contributes nothing
        for site, value in part_sums.items():
            total[site] = total[site] + value if site in total else value
    return {k: v.to(device) for k, v in total.items()}, sum(c for _, c in parts)


def ablation_values(components: Sequence[Site], mode: str,
                     means: Mapping[Site, torch.Tensor], device: str | torch.device) -> dict[Site, torch.Tensor]:
    """What replaces each site: zero, or its data-set mean."""
    if mode == "zero":
        return {c: torch.zeros((), device=device) for c in components}
    return {c: means[c] for c in components}


@dataclass
class AblationLosses:
    """Per-document losses: ``clean [D]`` and ``ablated [S, D]`` for the circuit (row 0) and each random set."""

    doc_ids: list[str]
    sets: list[list[Site]]
    clean: np.ndarray
    ablated: np.ndarray
    cost: CostCounter
    wall_s: float
    means: dict[Site, torch.Tensor] = field(default_factory=dict)



def ablation_losses(loaded: LoadedModel, encoded: Sequence[Encoded], cfg: AblationConfig, *,
                    progress: bool = True) -> AblationLosses:
    """Ablate the target set (and the random controls) and collect per-document losses."""
    model, adapter = loaded.model, loaded.adapter
    targets = ablation_targets(cfg, adapter)
    sets = [targets] + random_sets(targets, adapter, cfg.random_controls, cfg.seed, cfg.control_pool)
    device = execution_device(model)
    pad = int(loaded.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    means: dict[Site, torch.Tensor] = {}
    if cfg.mode == "mean":
        needed = sorted({c for s in sets for c in s})
        means = {c: v.to(device) for c, v in
                 dataset_means(model, adapter, encoded, needed, cfg.batch_size, pad, device, progress).items()}
    clean = np.zeros(len(encoded))
    ablated = np.zeros((len(sets), len(encoded)))
    cost = CostCounter()
    with torch.no_grad():
        for idx, batch in tqdm(batches(encoded, cfg.batch_size, pad, device, shard=True), desc="ablation",
                               total=n_batches(len(encoded), cfg.batch_size, shard=True),
                               disable=not progress or not dist.is_main_process()):
            cost.batches += 1
            losses, cache = clean_run(model, adapter, batch, block_activations(adapter), cost)
            clean[idx] = losses.numpy()
            blocks = {layer: cache[("resid_post", layer)] for layer in range(adapter.n_layers)}
            for s, comps in enumerate(sets):
                values = ablation_values(comps, cfg.mode, means, device)
                ablated[s, idx] = run_intervened(model, adapter, batch, values, blocks, cost).numpy()
    clean, ablated = sum_over_processes(clean), sum_over_processes(ablated)
    return AblationLosses([e.doc_id for e in encoded], sets, clean, ablated, cost.reduced(),
                          time.perf_counter() - t0, {k: v.cpu() for k, v in means.items()})


def summarize_ablation(result: AblationLosses, cfg: AblationConfig) -> dict[str, Any]:
    """Effects (mean loss increase) with CIs, the random-control distribution and the p-value.

    The p-value's CI comes from the same document resamples applied to the
    circuit and every control (paired): it shows how much the conclusion
    depends on which documents were scored.
    """
    counts = resample_counts(len(result.clean), cfg.n_bootstrap, cfg.seed)
    effects = result.ablated - result.clean[None, :]  # [S, D]
    rows: list[AblationRow] = []
    for s, comps in enumerate(result.sets):
        eff = mean_ci(effects[s], counts, cfg.ci_level)
        rows.append({"set": "circuit" if s == 0 else f"random_{s - 1}",
                     "members": " ".join(c.name for c in comps), "size": len(comps),
                     "loss_clean": float(result.clean.mean()), "loss_ablated": float(result.ablated[s].mean()),
                     "effect": eff["mean"], "effect_ci_low": eff["ci_low"], "effect_ci_high": eff["ci_high"]})
    out: dict[str, Any] = {
        "circuit": {**rows[0], "members": [c.name for c in result.sets[0]]},
        "n_docs": len(result.clean),
        "loss_clean": mean_ci(result.clean, counts, cfg.ci_level),
        "effect_definition": "mean over documents of (ablated loss - clean loss); loss = mean CE over "
                             "summary tokens (labels != -100) of one document; CIs: percentile "
                             f"bootstrap over documents ({cfg.n_bootstrap} resamples, seed {cfg.seed})",
    }
    if len(result.sets) > 1:
        rand = effects[1:].mean(axis=1)
        boot = resampled_means(effects, counts)  # [S, n_boot]
        boot_p = np.array([empirical_p_value(boot[0, b], boot[1:, b]) for b in range(boot.shape[1])])
        p_lo, p_hi = scalar_interval(boot_p, cfg.ci_level)
        circuit_effect = float(effects[0].mean())
        out["random_controls"] = {
            "n": len(result.sets) - 1, "pool": cfg.control_pool, "seed": cfg.seed,
            "effect_mean": float(rand.mean()), "effect_std": float(rand.std(ddof=1)) if rand.size > 1 else 0.0,
            "effect_quantiles": {str(q): float(np.quantile(rand, q)) for q in (0.025, 0.25, 0.5, 0.75, 0.975)},
            "p_value": empirical_p_value(circuit_effect, rand),
            "p_value_ci_low": p_lo, "p_value_ci_high": p_hi,
            "circuit_percentile": float(np.mean(rand < circuit_effect)),
            "p_value_definition": "(1 + #{random effect >= circuit effect}) / (N + 1), one-sided "
                                  "(is the circuit's effect larger than random sets of the same size); "
                                  "its CI recomputes it on the document resamples",
        }
    return {"summary": out, "rows": rows}


def describe_targets(targets: Sequence[Site]) -> str:
    """The target set in words, for the summary and the plot title."""
    if targets[0].kind == "attn_head":
        return "heads " + ",".join(c.name for c in targets)
    kinds = "+".join(sorted({c.kind for c in targets}))
    return f"{kinds} of layers " + ",".join(map(str, sorted({c.layer for c in targets})))


# ---------------------------------------------------------------- result

@dataclass(repr=False)
class AblationResult(Result):
    """An ablation: ``summary`` (ablation.json), one row per set, per-document losses, the sets as Sites.

    Example:
        >>> result = sc.ablate(tuned, data, sc.AblationConfig(layers=(2, 3, 5), random_controls=20))  # doctest: +SKIP
        >>> result.effect, result.p_value  # doctest: +SKIP
    """

    kind: ClassVar[str] = "ablation"
    main_table: ClassVar[str] = "ablation"
    files: ClassVar[tuple[str, ...]] = ("ablation.json", "ablation.csv", "ablation_per_doc.csv", "ablation.png")
    summary: dict[str, Any]
    rows: list[AblationRow]
    per_doc: list[AblationDocRow]
    sets: list[list[Site]] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.summary.get('mode')}-ablation of {self.summary.get('target')}: effect {self.effect:+.4f}"
        if self.p_value is not None:
            text += f", p = {self.p_value:.3f} against {len(self.sets) - 1} random sets"
        return text + f", {self.summary.get('n_docs')} documents"

    def tables(self) -> dict[str, list[Any]]:
        return {"ablation": list(self.rows), "ablation_per_doc": list(self.per_doc)}

    @property
    def effect(self) -> float:
        """The circuit's effect: mean rise of the summary loss when it is ablated."""
        return float(self.summary["effect"])

    @property
    def p_value(self) -> float | None:
        """Empirical p-value against the random sets (None without random controls)."""
        return self.summary.get("p_value")

    def plot(self) -> Figure:
        """The circuit's effect (with CI) against the histogram of random same-size sets."""
        from sumcircuit import plots

        return plots.ablation_figure(self.rows, title=f"{self.summary.get('mode', '')}-ablation of "
                                                      f"{self.summary.get('target', '')}")

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``ablation.json``, ``ablation.csv``, ``ablation_per_doc.csv``, ``ablation.png``."""
        from sumcircuit.plots import save_figure

        folder = Path(out)
        atomic_write_csv(folder / "ablation.csv", self.rows, list(self.rows[0]))
        atomic_write_csv(folder / "ablation_per_doc.csv", self.per_doc,
                         ["doc_id", "set", "loss_clean", "loss_ablated"])
        save_figure(self.plot(), folder / "ablation.png")
        atomic_write_json(folder / "ablation.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> AblationResult:
        """An ablation folder back as a result."""
        p = require_complete(folder)
        rows = typed_rows(read_csv(p / "ablation.csv"), AblationRow)
        return cls(read_json(p / "ablation.json"), rows, typed_rows(read_csv(p / "ablation_per_doc.csv"),
                                                                    AblationDocRow),
                   [parse_sites(str(r["members"]).split()) for r in rows])


@writes_output("ablate")
def ablate(model: ModelLike, data: Any, config: AblationConfig | None = None, *, runtime: Runtime | None = None,
           out: str | Path | None = None, resume: bool = True) -> AblationResult:
    """Ablate a circuit (and random controls) of ``model`` on ``data``.

    Args:
        model: the model whose components are removed (a spec, a loaded model, or a result holding one).
        data: a :class:`~sumcircuit.data.DataConfig` (or a path, a Dataset, or encoded examples).
        config: what to ablate (heads, layers or a circuit file), how, and the random controls.
        runtime: device, dtype, progress.
        out: write ``ablation.*`` here.
        resume: read back a finished result of the same model, data and config in ``out``.

    Returns:
        The circuit's effect with its interval, one row per set, per-document losses and the p-value.

    Example:
        >>> import sumcircuit as sc
        >>> sc.ablate("runs/full/final", data, sc.AblationConfig(layers="2,3,5", random_controls=20))  # doctest: +SKIP
    """
    cfg = coerce_config(AblationConfig, config)
    rt = local_runtime(coerce_runtime(runtime))
    loaded = load_one(model, rt)
    encoded, data_prov = encode_for(loaded, data)
    key = run_key("ablate", [loaded], data_prov, cfg, rt)
    if (done := finished(AblationResult, out, key, resume)) is not None:
        return done
    result = ablation_losses(loaded, encoded, cfg, progress=rt.progress)
    tables = summarize_ablation(result, cfg)
    summary = tables["summary"]
    controls = summary.get("random_controls", {})
    summary.update({"effect": summary["circuit"]["effect"], "effect_ci_low": summary["circuit"]["effect_ci_low"],
                    "effect_ci_high": summary["circuit"]["effect_ci_high"], "p_value": controls.get("p_value"),
                    "target": describe_targets(result.sets[0]), "mode": cfg.mode,
                    "cost": {**result.cost.summary(loaded.adapter.n_layers), "wall_s": result.wall_s},
                    "run_key": key})
    if cfg.rouge:
        if "data_config" not in data_prov:
            raise CausalError("rouge=True needs data as a DataConfig (the references are read from it)")
        from sumcircuit.causal.ablation_rouge import rouge_under_ablation

        summary["rouge"] = rouge_under_ablation(loaded, coerce_data(data), cfg, result.sets[0], result.means,
                                                rt.progress)
    summary["provenance"] = provenance(models=[loaded.provenance()], **data_prov, seed=cfg.seed,
                                       config=cfg.to_dict(), circuit=cfg.circuit, dtype=rt.dtype,
                                       processes=dist.world_size())
    per_doc = [AblationDocRow(doc_id=d, set=row["set"], loss_clean=float(result.clean[j]),
                              loss_ablated=float(result.ablated[s, j]))
               for s, row in enumerate(tables["rows"]) for j, d in enumerate(result.doc_ids)]
    res = AblationResult(summary, tables["rows"], per_doc, result.sets)
    if out is not None:
        dist.on_main(lambda: res.save(out))
    return res


def report_lines(result: AblationResult) -> list[str]:
    """What ``sumcircuit ablate`` prints: the effect, the random controls, the files."""
    summary = result.summary
    c = summary["circuit"]
    lines = [f"{summary['mode']}-ablation of {summary['target']}: loss {summary['loss_clean']['mean']:.4f} -> "
             f"{c['loss_ablated']:.4f}, effect {c['effect']:+.4f} "
             f"[{c['effect_ci_low']:+.4f}, {c['effect_ci_high']:+.4f}] over {summary['n_docs']} documents"]
    if "random_controls" in summary:
        rc = summary["random_controls"]
        lines.append(f"random sets (n={rc['n']}): mean effect {rc['effect_mean']:+.4f}; p = {rc['p_value']:.3f} "
                     f"[{rc['p_value_ci_low']:.3f}, {rc['p_value_ci_high']:.3f}]")
    lines.append("wrote ablation.json, ablation.csv, ablation_per_doc.csv, ablation.png")
    return lines
