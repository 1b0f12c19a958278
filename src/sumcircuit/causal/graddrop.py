"""GradDrop (AtP*, Kramár et al. 2024): attribution scores that one cancelling path cannot hide.

A component can matter through two paths whose first-order effects cancel
(say, directly on the logits and through a later layer that undoes it); its
linear estimate is then ~0 and it is never patched: a false negative. GradDrop
repeats the backward ``L`` times, each time with the gradient through one
layer's residual contributions (its attention and MLP outputs) set to zero,
and scores a component by ``1/(L-1) sum_l |estimate with layer l dropped|``.
A cancellation through layer ``l`` shows up in the runs that drop ``l``.

The score is a magnitude for *ranking* which components to patch exactly (the
signed estimate stays the linear one); it costs one forward and ``L``
backwards of each receiving model per batch (the graph is kept between them).

AtP*'s other fix, the QK fix, recomputes a head's attention softmax exactly
when its queries or keys are patched, instead of linearising through it.
Patching a head's *output* with the donor's actual output (what sumcircuit
patches) already does that and more: the linear estimate is
``dL/dz . (z_donor - z_receiver)`` with the exact output difference, which
equals the QK-fixed estimate plus the (query/key x value) cross term. So the
linear estimate of an ``attn_head`` is AtP*'s estimate at this granularity.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sumcircuit.adapters import ArchitectureAdapter, get_submodule
from sumcircuit.causal.interventions import Activation, Interventions, document_losses, grad_through, per_unit

GATED_KINDS = ("attn", "mlp")  # a layer's residual contributions: dropping both drops the layer from the backward


class _Drop:
    """Which layer's contributions the next backward drops (None: none)."""

    layer: int | None = None


class _Gate(torch.autograd.Function):
    """Identity forward; zero gradient backward while ``state.layer == layer``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: int, state: _Drop) -> torch.Tensor:
        ctx.layer, ctx.state = layer, state
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (torch.zeros_like(grad) if ctx.state.layer == ctx.layer else grad), None, None


def dropped_estimates(model: torch.nn.Module, adapter: ArchitectureAdapter, batch: Mapping[str, torch.Tensor],
                      diffs: Mapping[Activation, torch.Tensor], units: Mapping[Activation, int]
                      ) -> dict[Activation, torch.Tensor]:
    """Per activation ``[L, units]``: the linear estimate with layer ``l``'s backward dropped, summed over the
    batch's documents (one forward, ``L`` backwards)."""
    state = _Drop()
    live: dict[Activation, torch.Tensor] = {}

    def keep(key: Activation, x: torch.Tensor) -> None:
        live[key] = x

    def gate(layer: int, x: torch.Tensor) -> torch.Tensor:
        return _Gate.apply(x, layer, state)  # type: ignore[no-untyped-call,no-any-return]

    keys: Sequence[Activation] = list(diffs)
    embed = get_submodule(model, adapter.spec.embed_tokens).register_forward_hook(grad_through)
    out: dict[Activation, torch.Tensor] = {k: torch.zeros(adapter.n_layers, units[k], dtype=torch.float64)
                                           for k in keys}
    try:
        with torch.enable_grad(), Interventions(model, adapter) as iv:
            for key in keys:  # captured before the gate, so a layer's own components are dropped with it
                iv.edit(key, functools.partial(keep, key))
            for layer in range(adapter.n_layers):
                for kind in GATED_KINDS:
                    iv.edit((kind, layer), functools.partial(gate, layer))
            total = document_losses(model, batch, grad=True).sum()
            inputs = [live[k] for k in keys]
            for layer in range(adapter.n_layers):
                state.layer = layer
                grads = torch.autograd.grad(total, inputs, retain_graph=layer < adapter.n_layers - 1,
                                            allow_unused=True)
                for key, g in zip(keys, grads):
                    if g is not None:
                        out[key][layer] = per_unit((diffs[key] * g).double(), units[key]).sum(dim=0).cpu()
    finally:
        embed.remove()
    return out


def graddrop_scores(sums: Mapping[Activation, np.ndarray], n_docs: int, n_layers: int) -> dict[Activation, np.ndarray]:
    """``[L, units]`` sums over documents -> ``1/(L-1) sum_l |mean over documents|`` per unit."""
    return {k: np.abs(v / max(n_docs, 1)).sum(axis=0) / max(n_layers - 1, 1) for k, v in sums.items()}
