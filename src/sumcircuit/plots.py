"""PNG plots of causal results, for the report to embed.

Agg backend (no display needed); every figure is written atomically so a
report never embeds half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sumcircuit.artifacts import atomic_write_bytes  # noqa: E402


def _save(fig: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _err(rows: Sequence[Mapping[str, Any]], key: str = "effect") -> np.ndarray:
    """Asymmetric error bars from the CI columns (0 where the CI is missing)."""
    lo = np.array([float(r[key]) - float(r[f"{key}_ci_low"]) for r in rows])
    hi = np.array([float(r[f"{key}_ci_high"]) - float(r[key]) for r in rows])
    return np.nan_to_num(np.abs(np.vstack([lo, hi])))


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


def plot_patching(rows: Sequence[Mapping[str, Any]], path: str | Path, *, granularity: str,
                  n_layers: int, n_heads: int) -> None:
    """Per-layer effect with 95% CIs (layer/block), or a layer x head heatmap (head)."""
    rows = _with_effect_ci(rows)
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    fig, axes = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.2), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        mine = [r for r in rows if r["direction"] == direction]
        everything = [r for r in mine if r["kind"] == "all"]
        if granularity == "head":
            grid = np.full((n_layers, n_heads), np.nan)
            for r in mine:
                if r["kind"] in ("attn_head", "head"):
                    grid[int(r["layer"]), int(r["head"])] = float(r["effect"])
            limit = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
            image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                              origin="lower", interpolation="nearest")
            fig.colorbar(image, ax=ax, label="effect")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
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
    _save(fig, path)


def plot_ablation(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str) -> None:
    """The circuit's effect (with CI) against the histogram of random same-size sets."""
    circuit = next(r for r in rows if r["set"] == "circuit")
    random = np.array([float(r["effect"]) for r in rows if r["set"] != "circuit"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    _save(fig, path)


def plot_circuit(scores: Sequence[float], selected: Sequence[int], stability: Mapping[int, float] | None,
                 path: str | Path, *, title: str) -> None:
    """Per-layer change score, selected layers highlighted and labelled with their stability."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colors = ["crimson" if i in selected else "#9ab" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    for layer in selected:
        if stability and stability.get(layer) is not None:
            ax.annotate(f"{stability[layer]:.2f}", (layer, scores[layer]), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
