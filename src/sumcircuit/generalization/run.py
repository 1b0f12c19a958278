"""``compare``: circuits of several finished studies side by side, with nulls, intervals, control and transfer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sumcircuit.config import coerce_config
from sumcircuit.generalization.config import CompareConfig
from sumcircuit.generalization.control import control_claims, specific_change
from sumcircuit.generalization.overlap import relative_depth
from sumcircuit.generalization.profile import CIRCUIT_KINDS, CompareError, RunProfile, read_profile
from sumcircuit.generalization.result import CompareResult
from sumcircuit.generalization.stats import OverlapRow, overlap_matrix, pair_rows
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import provenance
from sumcircuit.study.evidence import StudyEvidence, score_tables
from sumcircuit.study.verdicts import paired_table_diff, paired_verdict

RunLike = str | Path


def _depths(layers: Sequence[int], n_layers: int) -> str:
    depth = relative_depth(n_layers)
    return ", ".join(f"{depth[layer]:.2f}" for layer in layers)


def run_row(run: RunProfile) -> dict[str, Any]:
    """One row of ``runs.csv``: the model, data, entropy-shift share and both circuits at relative depth."""
    s = run.analysis
    share_ci = s.get("share_heads_entropy_decreased_ci") or [None, None]
    kl, cause = run.circuits["kl"].layers, run.circuits["attribution"].layers
    return {"run": run.label, "folder": str(run.folder), "model": run.study.get("model") or "",
            "model_type": run.base.get("model_type") or "", "base_weights": (run.base.get("weights_sha256") or "")[:16],
            "data": run.study.get("data") or "", "eval_data": run.study.get("eval_data") or run.study.get("data") or "",
            "n_layers": run.n_layers, "n_heads": run.n_heads, "n_docs": s.get("n_docs"),
            "share_heads_entropy_decreased": s.get("share_heads_entropy_decreased"), "share_ci_low": share_ci[0],
            "share_ci_high": share_ci[1], "mean_kl_base_tuned": s.get("mean_kl_base_tuned"),
            "kl_layers": ",".join(map(str, kl)), "kl_layers_depth": _depths(kl, run.n_layers),
            "cause_layers": ",".join(map(str, cause)), "cause_layers_depth": _depths(cause, run.n_layers),
            "control": run.control is not None,
            "transfer_from": (run.transfer_from or {}).get("circuit") or ""}


def profile_rows(run: RunProfile) -> list[dict[str, Any]]:
    """Per-layer KL score, attribution score and mean entropy change at relative depth."""
    tokens = run.per_doc["tokens"]
    delta = np.average(run.per_doc["entropy_tuned"] - run.per_doc["entropy_base"], axis=0, weights=tokens) \
        if "entropy_base" in run.per_doc else np.full((run.n_layers, run.n_heads), np.nan)
    depth = relative_depth(run.n_layers)
    return [{"run": run.label, "layer": layer, "relative_depth": float(depth[layer]),
             "kl": float(run.circuits["kl"].layer_scores[layer]),
             "attribution": float(run.circuits["attribution"].layer_scores[layer]),
             "entropy_delta": float(delta[layer].mean())} for layer in range(run.n_layers)]


def _source_label(circuit: str, runs: Sequence[RunProfile]) -> str:
    for run in runs:
        if Path(circuit).resolve() == run.layout_circuit.resolve():
            return run.label
    return circuit


def transfer_rows(run: RunProfile, runs: Sequence[RunProfile]) -> list[dict[str, Any]]:
    """The transferred circuit's ROUGE-1 on this run's data against its own circuit and its random sets."""
    if not run.transfer_from:
        return []
    evidence = StudyEvidence(run.folder)
    transfer = evidence.scores("transfer")
    randoms = [evidence.scores(m) for m in evidence.layout.random_methods()]
    comparisons = [("transferred vs own circuit", evidence.scores("targeted"))]
    rows = []
    for name, other in comparisons + [("transferred vs random layers (mean of sets)", None)]:
        tables = score_tables(transfer, other) if other is not None else score_tables(transfer, *randoms)
        if tables is None:
            continue
        a = tables[0]
        b = tables[1] if other is not None else np.mean(tables[1:], axis=0)
        diff, low, high = interval = paired_table_diff(a, b)
        verdict, _, limited = paired_verdict(a, b, interval)
        rows.append({"run": run.label, "source": _source_label(run.transfer_from["circuit"], runs),
                     "source_layers": ",".join(map(str, run.transfer_from.get("layers") or [])),
                     "own_layers": ",".join(map(str, run.circuits["kl"].layers)), "comparison": name,
                     "mean_a": float(a.mean()), "mean_b": float(b.mean()), "difference": diff, "ci_low": low,
                     "ci_high": high, "n_seeds": a.shape[0], "n_docs": a.shape[1],
                     "verdict": {"supported": "transferred better", "contradicted": "transferred worse"}.get(
                         verdict, verdict), "limited_by": limited})
    return rows


def _check_runs(runs: Sequence[RunLike], labels: Sequence[str] | None) -> list[str]:
    if len(runs) < 2:
        raise CompareError("compare needs at least two study folders")
    resolved = [Path(r).resolve() for r in runs]
    if len(set(resolved)) != len(resolved):
        raise CompareError("the same study folder is given twice")
    names = list(labels) if labels else [Path(r).name for r in runs]
    if len(names) != len(runs):
        raise CompareError(f"`labels`: {len(names)} labels for {len(runs)} runs")
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names, start=1)]
    return names


def compare_profiles(profiles: Sequence[RunProfile], cfg: CompareConfig) -> CompareResult:
    """The comparison of already-read runs (see :func:`compare`)."""
    rng = np.random.default_rng(cfg.seed)
    overlap: list[OverlapRow] = []
    for a, b in itertools.combinations(profiles, 2):
        for circuit in CIRCUIT_KINDS:
            for level in cfg.levels:
                row = pair_rows(a, b, circuit, level, cfg, rng)
                if row is not None:
                    overlap.append(row)
    if "heads" in cfg.levels and not any(r["level"] == "heads" for r in overlap):
        if cfg.levels == ("heads",):
            models = ", ".join(f"{p.label}: {p.study.get('model')}" for p in profiles)
            raise CompareError(f"`levels`: heads compare only runs of the same model ({models}); use layers, which "
                               "compares models at relative depth")
    control: list[dict[str, Any]] = []
    control_heads: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    for run in profiles:
        if run.control is None:
            continue
        rows, heads, headline = specific_change(run.per_doc, run.control, run.circuits["kl"].layers,
                                                n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, ci_level=cfg.ci_level)
        control += [{"run": run.label, **r} for r in rows]
        control_heads += [{"run": run.label, **r} for r in heads]
        claims += [dict(vars(c)) for c in control_claims(run.label, headline)]
    transfer = [row for run in profiles for row in transfer_rows(run, profiles)]
    labels = [p.label for p in profiles]
    matrices = {f"{c}/{lv}": {"jaccard": overlap_matrix(overlap, labels, c, lv),
                              "null_q95": overlap_matrix(overlap, labels, c, lv, "null_q95")}
                for c in CIRCUIT_KINDS for lv in cfg.levels}
    summary = {
        "runs": labels, "matrices": matrices,
        "definitions": {
            "jaccard": "|A & B| / |A | B| of two circuits' picks (layers, or heads); layers of models of different "
                       "depth: the top-k of each per-layer score profile interpolated at min(L) relative depths",
            "null": f"{cfg.n_permutations} pairs of uniformly random circuits of the same sizes; p_value = (1 + null "
                    ">= observed) / (1 + n); spearman_p: the same with one score profile permuted",
            "interval": f"{cfg.ci_level:.0%} percentile bootstrap over each run's analysis documents "
                        f"({cfg.n_bootstrap} resamples, circuits re-picked in each; KL circuit only; one fine-tune "
                        "per study, so no interval over training seeds); describes stability, coverage not checked",
            "control": "per document, KL(base || summarization) - KL(base || control) per layer (mean over heads) "
                       "and entropy(summarization) - entropy(control) per head; token-weighted means with a "
                       "studentized ratio bootstrap interval",
            "transfer": "targeted LoRA on another study's KL circuit, trained and evaluated on this study's data, "
                        "paired over training seeds x documents against this study's own circuit and random sets "
                        "(two-way studentized bootstrap, the study's verdict rules)",
        },
        "config": asdict(cfg),
        "provenance": provenance(seed=cfg.seed, config=asdict(cfg), runs=[
            {"run": p.label, "folder": str(p.folder), "model": p.base, "data": (p.analysis.get("provenance") or {})
             .get("data"), "study": p.study} for p in profiles]),
    }
    tables = {"runs": [run_row(p) for p in profiles], "overlap": [dict(r) for r in overlap],
            "profiles": [r for p in profiles for r in profile_rows(p)], "control": control,
              "control_heads": control_heads, "transfer": transfer,
            "claims": claims}
    return CompareResult(summary, tables)


@writes_output("compare", "out")
def _compare_into(runs: Sequence[RunLike], cfg: CompareConfig, labels: Sequence[str] | None,
                  out: str | Path | None) -> CompareResult:
    names = _check_runs(runs, labels)
    result = compare_profiles([read_profile(r, n) for r, n in zip(runs, names)], cfg)
    if out is not None:
        result.save(out)
    return result


def compare(runs: Sequence[RunLike], config: CompareConfig | dict[str, Any] | None = None, *,
            labels: Sequence[str] | None = None, out: str | Path | None = None) -> CompareResult:
    """Compare the circuits, entropy shift, control task and transfer of several finished studies.

    Args:
        runs: two or more ``reproduce`` folders (different domains, models or tasks).
        config: nulls, resamples and levels (:class:`CompareConfig`).
        labels: names of the runs in every table (default: the folder names).
        out: write ``compare.json``, the CSV tables, figures and ``compare.html`` here.

    Returns:
        Tables ``runs``, ``overlap`` (Jaccard and Spearman with nulls and intervals), ``profiles`` (relative
        depth), ``control`` (the change specific to summarization), ``transfer`` and ``claims``.

    Example:
        >>> import sumcircuit as sc
        >>> sc.compare(["runs/cnndm", "runs/dialogsum"], out="runs/compare").to_pandas("overlap")  # doctest: +SKIP
    """
    return _compare_into(list(runs), coerce_config(CompareConfig, config, "config"), labels, out)
