"""The report's figures as HTML: inline PNGs (viewable offline) with captions that say what is plotted."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sumcircuit import plots


def img(b64: str, alt: str, caption: str = "") -> str:
    """One inline PNG (base64) with its caption."""
    figcaption = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">{figcaption}</figure>'


def _figure(fig: Figure, alt: str, caption: str) -> str:
    return img(plots.figure_base64(fig), alt, caption)


def head_heatmaps(heads: Sequence[Mapping[str, Any]]) -> str:
    """The per-head heatmaps, embedded with their caption."""
    return _figure(plots.head_heatmaps(heads), "per-head heatmaps of entropy change and KL",
                   "Per head (rows: layers, columns: heads), token-weighted over the analysed documents. Left: "
                   "attention entropy of the tuned model minus the base model (blue: more focused after tuning). "
                   "Right: KL(base || tuned) of the attention distributions.")


def layer_bars(layers: Sequence[Mapping[str, Any]]) -> str:
    """The per-layer bars, embedded with their caption."""
    return _figure(plots.layer_bars(layers), "per-layer change bar charts",
                   "Per layer: mean attention KL over heads, relative change of the residual-stream norm, linear CKA "
                   "between the two models' hidden states (1 = same representation up to rotation and scale), and the "
                   "relative Frobenius change of attention and MLP weights.")


def neuron_histogram(stats_path: Path, threshold: float | None) -> str:
    """The neuron-change histogram from stats.safetensors, embedded with its caption."""
    from safetensors.torch import load_file

    tensors = load_file(str(stats_path))
    if "neurons.standardized_change" not in tensors:
        return "<p>No standardized neuron change in stats.safetensors.</p>"
    values = tensors["neurons.standardized_change"].flatten().float().numpy()
    flips = int(tensors["neurons.sign_flip"].sum().item()) if "neurons.sign_flip" in tensors else None
    return _figure(plots.neuron_histogram(values, flips, threshold), "neuron change histogram",
                   "Standardized change (Cohen's d, tuned vs base) of every MLP neuron's mean activation; dashed lines: "
                   "the threshold counted as 'changed'. Log scale.")


def training_curves(runs: Mapping[str, list[dict[str, Any]]]) -> str:
    """Training and validation curves, embedded with their caption."""
    return _figure(plots.training_curves(runs), "training and validation loss curves",
                   "Loss on summary tokens per optimizer step (left) and on the held-out validation slice (right) for "
                   "the first training seed of each method; early stopping keeps the best validation checkpoint.")


def tracking_plot(rows: Sequence[Mapping[str, Any]]) -> str:
    """Attention change during training, embedded with its caption."""
    return _figure(plots.tracking_plot(rows), "interpretability tracking during training",
                   "Mean attention KL between the starting model and the model being trained, per layer, during the "
                   "full fine-tune.")
