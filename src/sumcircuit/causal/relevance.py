"""RelP: attribution patching with relevance-propagation coefficients instead of raw gradients.

Plain attribution multiplies the activation difference by the gradient, and
the gradient of a whole block passes through normalisation scales, attention
patterns and MLP nonlinearities whose local slope says little about a finite
change: on a real pair a block estimated at -3.0 patches to +0.8. RelP
(relevance patching, after AttnLRP's rules) keeps the same two forwards and one
backward but propagates through those parts as LRP does:

- **normalisation**: the scale (``1/rms`` or ``1/sigma``) is held constant, so
  the layer is linear in its input (the LN-rule);
- **attention**: the attention probabilities are held constant in the value
  path, so relevance flows through the values only (the AH-rule);
- **activation functions**: ``act(x)`` passes ``act(x)/x`` (the identity rule:
  relevance is conserved through the nonlinearity);
- **gated MLPs**: ``act(gate) * up`` passes half to each factor (the half rule).

Every rule changes only the backward pass: the forward values are the model's
(up to the attention kernel's rounding). Which module plays which part comes
from the adapter table (``mlp_act``, ``mlp_up``), and normalisation layers are
found by their type.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import eager_mask

from sumcircuit.adapters import ArchitectureAdapter, get_submodule
from sumcircuit.causal.config import CausalError

ATTN_IMPLEMENTATION = "sumcircuit_relp"


def straight_through(value: Tensor, linear: Tensor) -> Tensor:
    """``value`` forward, the gradient of ``linear`` backward (``linear`` equals ``value`` up to rounding)."""
    return value.detach() + (linear - linear.detach())


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is not ~0 (0 there): a coefficient, never a NaN."""
    safe = denominator.abs() > 1e-12
    return torch.where(safe, numerator / torch.where(safe, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


def _frozen_norm(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """LN-rule: the normalisation as the linear map it is once its scale is fixed (``y = c * x``, or centred)."""
    x = args[0]
    bias = getattr(module, "bias", None)
    centred = isinstance(module, nn.LayerNorm)
    x64 = x.double() - (x.double().mean(-1, keepdim=True) if centred else 0.0)
    y64 = output.double() - (bias.double() if centred and bias is not None else 0.0)
    coefficient = _ratio(y64, x64).detach()  # diag(w / scale), the scale held constant
    linear = x.double() - (x.double().mean(-1, keepdim=True) if centred else 0.0)
    return straight_through(output, (linear * coefficient).to(output.dtype))


def _identity_rule(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """``act(x)`` passes ``act(x)/x``: relevance goes through the nonlinearity in proportion."""
    x = args[0]
    return straight_through(output, x * _ratio(output, x).detach())


def _relp_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """Eager attention whose probabilities are constants in the backward (the AH-rule)."""
    if kwargs.get("s_aux") is not None:
        raise CausalError("RelP: attention sinks are not supported")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs.detach(), value).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the RelP attention and the eager (additive) mask it reads, once."""
    from sumcircuit.capture import register_attention_implementation

    return register_attention_implementation(ATTN_IMPLEMENTATION, _relp_attention, eager_mask)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@contextmanager
def relevance_rules(model: nn.Module, adapter: ArchitectureAdapter) -> Iterator[None]:
    """Inside, a backward through ``model`` propagates relevance (RelP) instead of the gradient.

    Everything is undone on exit: hooks removed, the attention implementation restored.
    """
    from sumcircuit.capture import _configs

    name = register_attention()
    configs = _configs([model])
    previous = [(c, c._attn_implementation_internal) for c in configs]
    handles = [m.register_forward_hook(_frozen_norm) for m in model.modules() if _is_norm(m)]
    try:
        for config in configs:
            config._attn_implementation_internal = name
        for layer in range(adapter.n_layers):
            block = adapter.block(model, layer)
            handles.append(get_submodule(block, adapter.spec.mlp_act).register_forward_hook(_identity_rule))
            if adapter.spec.mlp_up is not None:
                handles += _half_rule(block, adapter)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for config, value in previous:
            config._attn_implementation_internal = value


def _half_rule(block: nn.Module, adapter: ArchitectureAdapter) -> list[Any]:
    """``act(gate) * up`` passes half of the relevance to each factor (the product as the down projection's input)."""
    seen: dict[str, Tensor] = {}

    def keep(part: str, _module: nn.Module, _args: Any, output: Tensor) -> None:
        seen[part] = output

    def halve(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        product = args[0]
        a, u = seen.pop("act", None), seen.pop("up", None)
        if a is None or u is None or a.shape != product.shape:
            return args
        half = 0.5 * (a * u.detach() + a.detach() * u)
        return (straight_through(product, half), *args[1:])

    spec = adapter.spec
    assert spec.mlp_up is not None
    return [get_submodule(block, spec.mlp_act).register_forward_hook(lambda m, a, o: keep("act", m, a, o)),
            get_submodule(block, spec.mlp_up).register_forward_hook(lambda m, a, o: keep("up", m, a, o)),
            get_submodule(block, spec.mlp_output).register_forward_pre_hook(halve)]
