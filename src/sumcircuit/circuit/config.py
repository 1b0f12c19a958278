"""How a circuit is chosen: :class:`CircuitConfig` and the registry of scores (no torch, no numpy).

A score ranks layers (and, where it is defined per head, heads) by how much
fine-tuning changed them (read from an analysis) or by how much they cause
the change (read from an attribution). Each score is one registration with
its definition in words, which every circuit file states beside its picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sumcircuit.config import NON_NEGATIVE, POSITIVE, Config, option
from sumcircuit.errors import SumcircuitError
from sumcircuit.registry import Registry


class CircuitError(SumcircuitError):
    """An analysis folder that cannot be read, or a score / K that does not fit it."""


@dataclass(frozen=True)
class CircuitScore:
    """One way to rank layers and heads.

    Args:
        name: the score's name (``--score``).
        definition: what it is, in words (written into circuit.json).
        source: ``"analysis"`` (change) or ``"attribution"`` (cause).
        layer: ``fn(head_stats, layer_stats) -> [..., L]`` (or ``"module:fn"``); leading axes are resamples.
        head: ``fn(head_stats) -> [..., L*H]`` (or ``"module:fn"``), None when defined per layer only.
        needs: the per-document statistics its bootstrap stability needs (``per_doc.safetensors`` keys).
        per_document: False for a score with no per-document variation (its stability is undefined).

    Example:
        >>> CircuitScore("attn-weights", "relative weight change of attention",
        ...              layer=lambda heads, layers: layers["weight_change_attn"])  # doctest: +SKIP
    """

    name: str
    definition: str
    source: Literal["analysis", "attribution"] = "analysis"
    layer: str | Callable[..., Any] | None = None
    head: str | Callable[..., Any] | None = None
    needs: tuple[str, ...] = ()
    per_document: bool = True


CIRCUIT_SCORES: Registry[CircuitScore] = Registry("circuit score")


def register_circuit_score(score: CircuitScore, *, replace: bool = False) -> CircuitScore:
    """Make ``score`` a choice of ``select_circuit`` and ``sumcircuit circuit --score``.

    Args:
        score: the score's declaration.
        replace: replace a score of that name.

    Returns:
        ``score``.

    Example:
        >>> register_circuit_score(CircuitScore("cka-drop", "1 - CKA per layer", layer=my_fn))  # doctest: +SKIP
    """
    return CIRCUIT_SCORES.register(score.name, score, replace=replace)


_S = "sumcircuit.circuit.scores"
for _score in (
        CircuitScore("kl", "per layer, the mean over its heads of KL(base || tuned) between the two models' attention "
                           "distributions (heads.csv kl_base_tuned); per head, that head's value",
                     layer=f"{_S}:kl_layers", head=f"{_S}:kl_heads", needs=("kl_base_tuned",)),
        CircuitScore("kl-sym", "as kl, with the symmetric (KL(base||tuned) + KL(tuned||base)) / 2",
                     layer=f"{_S}:kl_sym_layers", head=f"{_S}:kl_sym_heads", needs=("kl_base_tuned", "kl_tuned_base")),
        CircuitScore("entropy", "per layer, the mean over its heads of |entropy_tuned - entropy_base| (the absolute "
                                "value of each head's mean entropy change, heads.csv entropy_delta); per head, that "
                                "value",
                     layer=f"{_S}:entropy_layers", head=f"{_S}:entropy_heads", needs=("entropy_base", "entropy_tuned")),
        CircuitScore("activation", "|actmag_rel_change|: absolute relative change of the layer's mean activation "
                                   "magnitude (layers.csv)",
                     layer=f"{_S}:activation_layers", needs=("actmag_rel_change",)),
        CircuitScore("weights", "weight_change_attn + weight_change_mlp (layers.csv): how far fine-tuning moved the "
                                "layer's weights", layer=f"{_S}:weights_layers", per_document=False),
        CircuitScore("combined", "mean over the available scores among kl, entropy, activation, weights of the "
                                 "normalised rank (L-1-rank)/(L-1), rank 0 = most changed, ties averaged; 1 = ranked "
                                 "first by every score. Heads: over kl and entropy",
                     layer=f"{_S}:combined_layers", head=f"{_S}:combined_heads",
                     needs=("kl_base_tuned", "entropy_base", "entropy_tuned", "actmag_rel_change")),
        CircuitScore("attribution", "causal: per layer, |effect| of its attention plus its MLP contribution, both "
                                    "patched exactly; per head, |exact effect| among the heads of largest estimated "
                                    "effect that `sumcircuit attribute --confirm K` patched exactly (denoise direction "
                                    "unless only noise was computed)", source="attribution")):
    register_circuit_score(_score)


def score_names() -> tuple[str, ...]:
    """Every registered score's name (the CLI's choices)."""
    return CIRCUIT_SCORES.names()


@dataclass(frozen=True)
class CircuitConfig(Config):
    """How many layers and heads to pick, by which score, and how stability is measured.

    Example:
        >>> import sumcircuit as sc
        >>> sc.CircuitConfig(score="entropy", top_layers=2).top_layers
        2
    """

    score: str | None = option(None, help="the ranking (default: kl for an analysis, attribution for an "
                                          "attribution): " + "; ".join(f"{s.name}: {s.definition}"
                                                                       for _, s in CIRCUIT_SCORES.items()),
                               choices=score_names)
    top_layers: int = option(3, help="layers to select", bound=POSITIVE)
    top_heads: int = option(0, help="also select this many heads (scores defined per head only; default: none)",
                            bound=NON_NEGATIVE)
    n_bootstrap: int = option(1000, help="document resamples for the stability estimate", bound=POSITIVE)
    seed: int = option(0, help="bootstrap seed", bound=NON_NEGATIVE)
    direction: Literal["denoise", "noise"] | None = option(
        None, help="with an attribution: which direction's effects rank (default: denoise if present)")
