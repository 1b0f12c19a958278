"""Decoding's linear layers through oneDNN-packed fp32 weights on the CPU.

A decode step multiplies a handful of rows (the batch) by every weight
matrix. MKL's fp32 GEMM runs those at about half the memory bandwidth on
this kind of CPU; oneDNN's inner-product primitive, given its weight already
reordered into its blocked layout, runs them about 1.6-2x faster (8-16 rows,
``benchmarks/generation_speed.md``). That is what ``torch.compile``'s CPU
weight prepacking does; here it is done eagerly, with no compile and no
recompilation as the KV cache grows.

While :func:`packed_linears` is open, every fp32 ``nn.Linear`` (and GPT-2's
``Conv1D``) on the CPU except the LM head computes through a packed copy of
its weight; the parameters themselves are not touched, and the copies are
dropped on exit. The copies cost memory while generating (the body's fp32
weights once more). Releasing the dense weights meanwhile does not pay:
models loaded from safetensors keep their weights in a file mapping that
stays resident, and unpacking would then make a third copy. The sums run in
another order, so outputs differ from MKL's in the last bits and a greedy
near-tie can pick another token; the texts were measured
(``generation_speed.md``) and the option can be turned off
(``GenerationConfig.packed_weights``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

# How each kind of linear module stores its weight: as (out, in), or as GPT-2's Conv1D (in, out).
# Matched by exact type: a subclass, or a wrapper such as PEFT's LoRA layer, keeps its own forward
# (its base layer, a plain Linear, is packed).
_TRANSPOSED: dict[type[nn.Module], bool] = {nn.Linear: False, Conv1D: True}


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (CPU builds with mkldnn)."""
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return mkldnn and all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


def _forward(packed: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The packed product for fp32 CPU inputs; anything else (an input autocast made bf16) takes ``F.linear``."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return out


def _packable(module: nn.Module, head: nn.Module | None) -> bool:
    """A plain fp32 CPU linear other than the head, not routed already (by an enclosing :func:`packed_linears`)."""
    weight = getattr(module, "weight", None)
    return (type(module) in _TRANSPOSED and module is not head and "forward" not in vars(module)
            and isinstance(weight, nn.Parameter)
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2)


def _pack(module: nn.Module) -> None:
    """Route ``module``'s forward through a packed copy of its weight (an instance attribute, deleted on exit)."""
    weight = module.weight.detach()  # type: ignore[operator]
    dense = weight.t() if _TRANSPOSED[type(module)] else weight
    packed = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous())
    bias_param = getattr(module, "bias", None)
    bias = bias_param.detach() if isinstance(bias_param, torch.Tensor) else None
    forward: Callable[[torch.Tensor], torch.Tensor] = functools.partial(_forward, packed, dense, bias)
    setattr(module, "forward", forward)  # noqa: B010


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run ``model``'s CPU fp32 linear layers (all but the LM head) on packed weights; yields how many.

    Only for inference (no autograd through the packed op): with gradients
    enabled, or when this torch lacks the op, nothing is packed and 0 is
    yielded. The modules get their own forward back on exit, also after an error.
    Nested inside another, it packs nothing again (and yields 0): ``evaluate``
    packs once for all its batches, ``generate_summaries`` once per call when
    called alone.
    """
    if not enabled or torch.is_grad_enabled() or not available():
        yield 0
        return
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    done: list[nn.Module] = []
    try:
        for module in model.modules():
            if _packable(module, head):
                _pack(module)
                done.append(module)
        yield len(done)
    finally:
        for module in done:
            del module.forward
