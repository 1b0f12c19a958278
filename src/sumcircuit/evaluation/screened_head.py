"""Greedy decoding's LM head in bf16 where that provably picks the same token as fp32.

On a CPU a decode step at batch 8 spends about a fifth of its time in the
LM head (vocabulary x hidden, the model's largest matrix), and fp32 GEMMs with
8 rows run far below the memory bandwidth. Greedy decoding only needs the
arg-max, so :class:`ScreenedHead` computes every logit in bf16 (a bf16 copy
of the head: half the bytes, AVX-512 BF16 dot products), bounds each one's
error, and recomputes in fp32 every token whose bound reaches the best
token's lower bound. The tokens left with a bf16 value cannot be the arg-max:

    |fp32 logit - bf16 logit|  <=  c * |x|_2 * |w_j|_2  +  2^-8 * |bf16 logit| / (1 - 2^-8)

(rounding x and w to bf16 costs at most 2^-8 each relative, the fp32
accumulation of d products at most d * 2^-24, the bf16 result 2^-8
relative; |x|.|w_j| bounds sum |x_i w_ji| by Cauchy-Schwarz; ``c`` carries
a factor 2 of margin). So the chosen token is the one an fp32 head picks; only
logits that cannot win keep their bf16 value, and any monotone soft-capping
after the head keeps the order. Beam search and sampling read every logit:
they keep the plain head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significand bits, round to nearest)
_U_FP32 = 2.0 ** -24


def error_coefficient(d: int) -> float:
    """``c`` of the bound: input and weight rounding plus fp32 accumulation of ``d`` products, doubled."""
    rounding = 2 * _U_BF16 + _U_BF16 ** 2
    accumulation = d * _U_FP32 / (1 - d * _U_FP32) * (1 + _U_BF16) ** 2
    return 2.0 * (rounding + accumulation)


class ScreenedHead(nn.Module):
    """An fp32 ``nn.Linear`` head that returns exact fp32 logits for every token that could be the
    arg-max and bf16 values (provably lower) for the rest."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head
        weight = head.weight.detach()
        self.low = weight.to(torch.bfloat16)
        self.row_norm = weight.float().norm(dim=1)
        self.coefficient = error_coefficient(weight.shape[1])
        self.candidates = 0  # fp32 columns recomputed, summed over calls (for the benchmark)
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1]).float()
        approx = F.linear(x.to(torch.bfloat16), self.low).float()
        bound = (self.coefficient * x.norm(dim=1, keepdim=True) * self.row_norm
                 + _U_BF16 / (1 - _U_BF16) * approx.abs())
        if self.head.bias is not None:
            approx = approx + self.head.bias.float()
        floor = (approx - bound).max(dim=1, keepdim=True).values
        columns = ((approx + bound) >= floor).any(dim=0).nonzero().squeeze(1)
        weight = self.head.weight.index_select(0, columns)
        bias = self.head.bias.index_select(0, columns) if self.head.bias is not None else None
        approx[:, columns] = F.linear(x.to(weight.dtype), weight, bias).float()
        self.candidates += int(columns.numel())
        self.calls += 1
        return approx.reshape(*shape[:-1], -1).to(self.head.weight.dtype)


def can_screen(head: nn.Module) -> bool:
    """An fp32 linear head on the CPU: the case the bound is written for. bf16/fp16 models gain nothing,
    and CUDA's bf16 GEMMs may reduce in bf16 (``allow_bf16_reduced_precision_reduction``), which the
    bound does not cover."""
    return (isinstance(head, nn.Linear) and head.weight.dtype == torch.float32
            and head.weight.device.type == "cpu")


@contextmanager
def screened_head(model: nn.Module) -> Iterator[ScreenedHead | None]:
    """Swap the model's output embeddings for a :class:`ScreenedHead` while greedy decoding runs."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or not can_screen(head):
        yield None
        return
    screened = ScreenedHead(head)
    model.set_output_embeddings(screened)  # type: ignore[operator]
    try:
        yield screened
    finally:
        model.set_output_embeddings(head)  # type: ignore[operator]
