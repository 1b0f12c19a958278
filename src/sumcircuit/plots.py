"""Every figure sumcircuit draws, in one place, returned as a matplotlib ``Figure``.

Figures are built with matplotlib's object API (``Figure`` and its axes),
never through ``pyplot``: no backend is switched and no figure is registered
globally, so a notebook's inline plotting keeps working after any call that
saves a plot, and a figure is freed when it is no longer referenced.
:func:`save_figure` writes a PNG atomically; :func:`figure_base64` embeds one
in the HTML report.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from sumcircuit.artifacts import atomic_write_bytes


def png_bytes(fig: Figure, dpi: int = 120) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG, atomically (a report never embeds half a file).

    Args:
        fig: a figure (every result's ``plot()`` returns one).
        path: the PNG file to write.
        dpi: resolution.

    Returns:
        ``path``.

    Example:
        >>> sc.save_figure(analysis.plot("heads"), "heads.png")  # doctest: +SKIP
    """
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return Path(path)


def figure_base64(fig: Figure, dpi: int = 110) -> str:
    """The figure as base64 PNG, for an ``<img src="data:...">``."""
    return base64.b64encode(png_bytes(fig, dpi)).decode("ascii")


# ---------------------------------------------------------------- analysis

def _grid(rows: Sequence[Mapping[str, Any]], value: str) -> list[list[float]]:
    n_layers = int(max(int(r["layer"]) for r in rows)) + 1
    n_heads = int(max(int(r["head"]) for r in rows)) + 1
    grid = [[math.nan] * n_heads for _ in range(n_layers)]
    for r in rows:
        grid[int(r["layer"])][int(r["head"])] = float(r[value])
    return grid


def head_heatmaps(heads: Sequence[Mapping[str, Any]]) -> Figure:
    """Entropy change and KL(base || tuned) per head (rows: layers, columns: heads)."""
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, key, title, cmap in ((axes[0], "entropy_delta", "entropy change (tuned - base, nats)", "RdBu_r"),
                                 (axes[1], "kl_base_tuned", "KL(base || tuned) (nats)", "viridis")):
        grid = _grid(heads, key)
        if cmap == "RdBu_r":
            bound = max(1e-9, max(abs(v) for row in grid for v in row if not math.isnan(v)))
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-bound, vmax=bound)
        else:
            im = ax.imshow(grid, aspect="auto", cmap=cmap)
        ax.set(title=title, xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax)
    return fig


def layer_bars(layers: Sequence[Mapping[str, Any]]) -> Figure:
    """Per layer: mean KL, residual-norm change, CKA and relative weight change."""
    keys = [("kl_base_tuned", "mean KL(base||tuned)"), ("actmag_rel_change", "residual norm rel. change"),
            ("cka", "linear CKA base vs tuned"), ("weight_change_attn", "rel. weight change (attn)"),
            ("weight_change_mlp", "rel. weight change (MLP)")]
    keys = [(k, t) for k, t in keys if layers and k in layers[0]]
    fig = Figure(figsize=(3.4 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    xs = [int(r["layer"]) for r in layers]
    for ax, (key, title) in zip(axes[0], keys):
        ax.bar(xs, [float(r[key]) for r in layers], color="tab:blue")
        ax.set(title=title, xlabel="layer")
    return fig


def neuron_histogram(values: np.ndarray, flips: int | None, threshold: float | None) -> Figure:
    """Histogram of every neuron's standardized change (clipped to +-10), log scale."""
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    ax.hist(np.clip(values, -10, 10), bins=100, color="tab:gray")
    if threshold is not None:
        for t in (-threshold, threshold):
            ax.axvline(t, color="tab:red", linestyle="--")
    ax.set(title=f"standardized neuron change (Cohen's d, clipped to ±10); sign flips: "
                 f"{flips if flips is not None else 'n/a'}", xlabel="standardized change", ylabel="neurons")
    ax.set_yscale("log")
    return fig


# ---------------------------------------------------------------- training

def training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Training loss (left) and validation loss (right) per optimizer step, one line per run."""
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    for name, log in runs.items():
        train = [(r["step"], r["loss"]) for r in log if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r and "step" in r]
        if train:
            axes[0].plot(*zip(*train), label=name)
        if val:
            axes[1].plot(*zip(*val), marker="o", label=name)
    axes[0].set(title="training loss (summary tokens)", xlabel="optimizer step")
    axes[1].set(title="validation loss", xlabel="optimizer step")
    for ax in axes:
        ax.legend()
    return fig


def tracking_plot(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Mean attention KL between the start and the model being trained, per layer, during training."""
    per_step: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        per_step[(int(r["step"]), int(r["layer"]))].append(float(r["kl_base_tuned"]))
    layers = sorted({layer for _, layer in per_step})
    steps = sorted({step for step, _ in per_step})
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for i, layer in enumerate(layers):
        ax.plot(steps, [sum(per_step[(s, layer)]) / len(per_step[(s, layer)]) if per_step[(s, layer)]
                        else math.nan for s in steps], color=cmap(i / max(1, len(layers) - 1)),
                label=f"L{layer}" if len(layers) <= 12 else None)
    ax.set(title="attention KL(start || current) per layer during training", xlabel="step",
           ylabel="mean KL over heads")
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return fig


# ---------------------------------------------------------------- causal

def _err(rows: Sequence[Mapping[str, Any]], key: str = "effect") -> np.ndarray:
    """Asymmetric error bars from the CI columns (0 where the CI is missing)."""
    lo = np.array([float(r[key]) - float(r[f"{key}_ci_low"]) for r in rows])
    hi = np.array([float(r[f"{key}_ci_high"]) - float(r[key]) for r in rows])
    return np.asarray(np.nan_to_num(np.abs(np.vstack([lo, hi]))))


_TITLES = {"denoise": "denoise: base run, tuned activation patched in\n(recovery of the loss gap)",
           "noise": "noise: tuned run, base activation patched in\n(fraction of the gap lost)"}


def _with_effect_ci(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Effect CIs: the recovery CI for denoise, mirrored (1 - recovery) for noise."""
    out = []
    for r in rows:
        r = dict(r)
        lo, hi = float(r["recovery_ci_low"]), float(r["recovery_ci_high"])
        r["effect_ci_low"], r["effect_ci_high"] = (lo, hi) if r["direction"] == "denoise" else (1 - hi, 1 - lo)
        out.append(r)
    return out


def patching_figure(rows: Sequence[Mapping[str, Any]], *, granularity: str, n_layers: int, n_heads: int) -> Figure:
    """Per-layer effect with 95% CIs (layer/block), or a layer x head heatmap (head), one panel per direction."""
    rows = _with_effect_ci(rows)
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    fig = Figure(figsize=(6.5 * max(1, len(directions)), 4.2))
    axes = fig.subplots(1, max(1, len(directions)), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        mine = [r for r in rows if r["direction"] == direction]
        everything = [r for r in mine if r["kind"] == "all"]
        if granularity == "head":  # rows: only the layers whose heads were patched
            head_rows = [r for r in mine if r["kind"] in ("attn_head", "head")]
            layers = sorted({int(r["layer"]) for r in head_rows}) or list(range(n_layers))
            grid = np.full((len(layers), n_heads), np.nan)
            for r in head_rows:
                grid[layers.index(int(r["layer"])), int(r["head"])] = float(r["effect"])
            limit = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
            image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                              origin="lower", interpolation="nearest")
            fig.colorbar(image, ax=ax, label="effect (fraction of the loss gap)")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            if everything:  # a number, not a line: the y axis here is layers, not effects
                ax.set_title(f"{_TITLES.get(direction, direction)}; all {len(head_rows)} heads at once: "
                             f"{float(everything[0]['effect']):.2f}", fontsize=9)
                continue
        else:
            for kind, marker in (("attn", "o"), ("mlp", "s"), ("resid_post", "D"), ("block", "D")):
                series = sorted((r for r in mine if r["kind"] == kind), key=lambda r: int(r["layer"]))
                if series:
                    ax.errorbar([int(r["layer"]) for r in series], [float(r["effect"]) for r in series],
                                yerr=_err(series), marker=marker, ms=4, capsize=2, lw=1, label=kind)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_xlabel("layer")
            ax.set_ylabel("effect (fraction of the loss gap)")
        if everything:
            ax.axhline(float(everything[0]["effect"]), color="black", ls="--", lw=0.8,
                       label=f"all at once: {float(everything[0]['effect']):.2f}")
        if granularity != "head" or everything:
            ax.legend(fontsize=8)
        ax.set_title(_TITLES.get(direction, direction), fontsize=9)
    return fig


def faithfulness_figure(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> Figure:
    """Effect of patching each circuit's first k layers, k = 1..K, with its band; random sets in grey."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        curves.setdefault(str(r["curve"]), []).append(r)
    random_label = "random layer sets"
    for name, points in curves.items():
        points = sorted(points, key=lambda r: int(r["k"]))
        ks = [int(r["k"]) for r in points]
        effects = [float(r["effect"]) for r in points]
        if points[0]["kind"] == "random":
            ax.plot(ks, effects, color="grey", lw=0.7, alpha=0.6, label=random_label)
            random_label = "_nolegend_"
            continue
        area = (summary.get("auc") or {}).get(name) or {}
        line = ax.plot(ks, effects, marker="o", lw=1.6, label=f"{name}: area {area.get('auc', float('nan')):.2f}")[0]
        ax.fill_between(ks, [float(r["effect_ci_low"]) for r in points], [float(r["effect_ci_high"]) for r in points],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axhline(1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("layers patched together (k, in the circuit's order)")
    ax.set_ylabel("recovery of the loss gap" if summary.get("direction") == "denoise" else "share of the gap lost")
    ax.set_title(f"faithfulness ({summary.get('direction')}), 95% bands over documents", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def ablation_figure(rows: Sequence[Mapping[str, Any]], *, title: str) -> Figure:
    """The circuit's effect (with CI) against the histogram of random same-size sets."""
    circuit = next(r for r in rows if r["set"] == "circuit")
    random = np.array([float(r["effect"]) for r in rows if r["set"] != "circuit"])
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    if random.size:
        ax.hist(random, bins=max(5, min(40, random.size // 3)), color="#9ab", edgecolor="white",
                label=f"random sets (n={random.size})")
    effect = float(circuit["effect"])
    ax.axvline(effect, color="crimson", lw=2, label=f"circuit: {effect:.3g}")
    ax.axvspan(float(circuit["effect_ci_low"]), float(circuit["effect_ci_high"]), color="crimson",
               alpha=0.15, label="circuit 95% CI")
    ax.set_xlabel("mean increase in summary loss (nats/token)")
    ax.set_ylabel("random sets")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def circuit_figure(scores: Sequence[float], selected: Sequence[int], stability: Mapping[int, float] | None, *,
                   title: str) -> Figure:
    """Per-layer score, selected layers highlighted and labelled with their stability."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    colors = ["crimson" if i in selected else "#9ab" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    for layer in selected:
        if stability and stability.get(layer) is not None:
            ax.annotate(f"{stability[layer]:.2f}", (layer, scores[layer]), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    return fig


def overlap_figure(matrices: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], runs: Sequence[str]) -> Figure:
    """One heatmap per (circuit, level): Jaccard between runs, each cell labelled with the null's 95th percentile."""
    names = list(matrices)
    fig = Figure(figsize=(3.6 * max(1, len(names)), 3.4))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names))))
    for ax, name in zip(axes, names):
        jac = np.array(matrices[name]["jaccard"], dtype=float)
        q95 = np.array(matrices[name]["null_q95"], dtype=float)
        ax.imshow(np.ma.masked_invalid(jac), vmin=0, vmax=1, cmap=colormaps["viridis"])
        for i, j in np.ndindex(jac.shape):
            if i != j:
                text = "n/a" if not np.isfinite(jac[i, j]) else f"{jac[i, j]:.2f}\nnull95 {q95[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if np.isfinite(jac[i, j]) and jac[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(runs)), list(runs), rotation=30, fontsize=7)
        ax.set_yticks(range(len(runs)), list(runs), fontsize=7)
        ax.set_title(f"{name} (Jaccard)", fontsize=9)
    fig.tight_layout()
    return fig


def depth_profiles_figure(profiles: Sequence[Mapping[str, Any]], control: Sequence[Mapping[str, Any]]) -> Figure:
    """Per-layer KL (and, where run, the KL specific to summarization) of each run against relative depth."""
    fig = Figure(figsize=(10, 3.6))
    left, mid, right = fig.subplots(1, 3)
    for name, rows in _by_run(profiles).items():
        depth = [float(r["relative_depth"]) for r in rows]
        left.plot(depth, [float(r["kl"]) for r in rows], marker=".", label=name)
        mid.plot(depth, [float(r["entropy_delta"]) for r in rows], marker=".", label=name)
    for name, rows in _by_run(control).items():
        depth = [float(r["relative_depth"]) for r in rows]
        line = right.plot(depth, [float(r["kl_specific"]) for r in rows], marker=".", label=name)[0]
        right.fill_between(depth, [float(r["kl_specific_ci_low"]) for r in rows],
                           [float(r["kl_specific_ci_high"]) for r in rows], color=line.get_color(), alpha=0.15)
    for ax, title in ((left, "KL(base || tuned) per layer"), (mid, "entropy change per layer (nats)"),
                      (right, "KL specific to summarization\n(minus the control task, 95% band)")):
        ax.set_xlabel("relative depth")
        ax.set_title(title, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", lw=0.6)
    fig.tight_layout()
    return fig


def _by_run(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[str(r["run"])].append(r)
    return {k: sorted(v, key=lambda r: float(r["relative_depth"])) for k, v in out.items()}
