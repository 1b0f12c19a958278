"""Capture machinery: attention statistics and activations without storing attention maps.

An attention function registered in ``transformers``' ``AttentionInterface``
keeps the model's own SDPA path for the output (so hidden states are exactly
those of a plain SDPA forward pass) and hands the post-RoPE query and key it
receives to a *sink*. Forward hooks hand over MLP neuron activations (the
input of ``adapter.mlp_output``) and block outputs (the residual stream).

Attention statistics never materialize a ``[T, T]`` matrix. For a row with
scores ``s_j = scale * q.k_j`` and ``p = softmax(s)``::

    H(p)     = lse(s) - sum_j p_j s_j       = lse(s) - scale * q . (P K)
    KL(p||r) = (lse(s') - lse(s)) + sum_j p_j s_j - sum_j p_j s'_j

where ``r = softmax(s')`` is the other model's row; ``sum_j p_j s'_j`` is
``scale' * q' . (P K')``. ``P K`` is an attention output whose *values are
the keys*, so a fused attention kernel that also returns the log-sum-exp
gives every statistic exactly, in the kernel's memory (no ``T x T`` tensor).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.errors import SumcircuitError

ATTN_IMPLEMENTATION = "sumcircuit_stats"
_NEG = torch.finfo(torch.float32).min
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class CaptureError(SumcircuitError):
    """The model's attention cannot be captured exactly (e.g. logit soft-capping)."""


# ---------------------------------------------------------------- the kernel

@dataclass(frozen=True)
class RowMask:
    """Which keys each query row sees: an additive fp32 mask (0 / very negative) or causal."""

    additive: Tensor | None  # [B or 1, 1, Tq, Tk]; None means plain causal
    causal: bool


def row_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, window: int | None,
             device: torch.device) -> RowMask:
    """Normalize whatever mask the model passed into one exact form.

    SDPA masks arrive as bool (True = attend) or None (causal implied). Sliding
    windows normally come inside the mask; if none arrived but the layer has a
    window shorter than the sequence, the window is rebuilt from the adapter.
    """
    if attention_mask is None:
        if window is None or kv_len <= window:
            return RowMask(None, causal=True)
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_idx = torch.arange(kv_len, device=device)[None, :]
        allowed = (k_idx <= q_idx) & (k_idx > q_idx - window)
        attention_mask = allowed[None, None]
    if attention_mask.dtype != torch.bool:  # additive float mask: 0 where allowed, hugely negative elsewhere
        allowed = attention_mask > -1e4  # exp(-1e4) == 0 in every float type
        if bool((attention_mask[allowed] != 0).any()):
            raise CaptureError("additive attention biases (e.g. ALiBi) are not supported by the statistics path")
        attention_mask = allowed
    additive = torch.zeros(attention_mask.shape, dtype=torch.float32, device=device)
    return RowMask(additive.masked_fill_(~attention_mask.to(device), _NEG), causal=False)


def attention_expectations(q: Tensor, k: Tensor, values: Sequence[Tensor], mask: RowMask,
                           scale: float, backend: str = "auto",
                           chunk: int = 256) -> tuple[list[Tensor], Tensor]:
    """``([P @ v for v in values], lse)`` for ``P = softmax(scale q k^T + mask)``, in fp32.

    ``q``, ``k`` and every value are ``[B, H, T, D]`` with the same H and D.
    On CPU the fused flash kernel returns the log-sum-exp with the output, so no
    ``T x T`` matrix exists; elsewhere (or with ``backend='math'``) query rows are
    processed in chunks of ``chunk``, bounding memory at ``B*H*chunk*T`` floats.
    """
    if backend not in ("auto", "flash", "math"):
        raise ValueError(f"unknown attention backend {backend!r}")
    use_flash = backend != "math" and q.device.type == "cpu" and _CPU_FLASH is not None
    if backend == "flash" and not use_flash:
        raise CaptureError("the fused CPU flash kernel is not available here; use backend 'math'")
    if use_flash:
        outs, lse = [], None
        for v in values:
            assert _CPU_FLASH is not None
            out, lse = _CPU_FLASH(q, k, v, 0.0, mask.causal, attn_mask=mask.additive, scale=scale)
            outs.append(out)
        assert lse is not None
        return outs, lse
    return _math_expectations(q, k, values, mask, scale, chunk)


def _math_expectations(q: Tensor, k: Tensor, values: Sequence[Tensor], mask: RowMask, scale: float,
                       chunk: int) -> tuple[list[Tensor], Tensor]:
    """Chunked reference: one wide matmul ``P @ [v1 | v2 | ...]`` per chunk of query rows."""
    t_q, t_k = q.shape[2], k.shape[2]
    wide = torch.cat(list(values), dim=-1)
    outs, lses = [], []
    for r0 in range(0, t_q, chunk):
        r1 = min(t_q, r0 + chunk)
        # causal: rows r0..r1 see at most keys < r1 + (t_k - t_q)
        kv_end = min(t_k, r1 + t_k - t_q) if mask.causal else t_k
        scores = torch.matmul(q[:, :, r0:r1], k[:, :, :kv_end].transpose(-1, -2)).mul_(scale)
        if mask.causal:
            q_idx = torch.arange(r0, r1, device=q.device)[:, None] + (t_k - t_q)
            scores.masked_fill_(torch.arange(kv_end, device=q.device)[None, :] > q_idx, float("-inf"))
        elif mask.additive is not None:
            scores.add_(mask.additive[..., r0:r1, :kv_end])
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = scores.sub_(lse).exp_()
        outs.append(torch.matmul(probs, wide[:, :, :kv_end]))
        lses.append(lse.squeeze(-1))
    out = torch.cat(outs, dim=2)
    return list(out.split([v.shape[-1] for v in values], dim=-1)), torch.cat(lses, dim=2)


def expected_score(q: Tensor, pk: Tensor, scale: float) -> Tensor:
    """``sum_j p_j s_j`` per row from ``P K``: ``scale * q . (P K)``, [B, H, T]."""
    return torch.linalg.vecdot(q, pk).mul_(scale)


# ---------------------------------------------------------------- sinks

@dataclass
class AttentionCall:
    """What the attention function hands to a sink: fp32 post-RoPE q and k, per query head."""

    layer: int
    query: Tensor  # [B, Hq, T, D]
    key: Tensor  # [B, Hkv, T, D] (not repeated: the sink repeats when it needs to)
    n_rep: int
    mask: RowMask
    scale: float


class CaptureSink(Protocol):
    def on_attention(self, call: AttentionCall) -> None: ...

    def on_neurons(self, layer: int, acts: Tensor) -> None: ...

    def on_hidden(self, layer: int, hidden: Tensor) -> None: ...


_SINKS: dict[int, tuple[CaptureSink, int, int | None]] = {}  # id(attention module) -> sink, layer, window


def _stats_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """SDPA for the output (unchanged numerics), then the statistics on the side."""
    entry = _SINKS.get(id(module))
    if entry is not None and kwargs.get("softcap") is not None:
        raise CaptureError("attention logit soft-capping is not supported by the statistics path")
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, is_causal=is_causal, **kwargs)
    if entry is not None:
        sink, layer, window = entry
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        mask = row_mask(attention_mask, query.shape[2], key.shape[2], window, query.device)
        n_rep = query.shape[1] // key.shape[1]
        sink.on_attention(AttentionCall(layer, query.detach().float(), key.detach().float(), n_rep,
                                        mask, scale))
    return out, None


_REGISTERED = False


def register_attention() -> str:
    """Register the statistics attention (and SDPA's mask builder) under one name, once."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _stats_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _REGISTERED = True
    return ATTN_IMPLEMENTATION


def expand_kv(key: Tensor, n_rep: int) -> Tensor:
    """Grouped-query keys repeated to one per query head (statistics are per *query* head)."""
    return repeat_kv(key, n_rep)


# ---------------------------------------------------------------- installing

def unwrap(model: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def body(model: nn.Module) -> nn.Module:
    """The decoder without the LM head: analysis needs no logits."""
    inner = unwrap(model)
    return getattr(inner, "base_model", inner)


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _neuron_hook(sink: CaptureSink, layer: int, _module: nn.Module, args: tuple[Any, ...]) -> None:
    sink.on_neurons(layer, args[0].detach())


def _hidden_hook(sink: CaptureSink, layer: int, _module: nn.Module, _args: Any, output: Any) -> None:
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    sink.on_hidden(layer, hidden.detach())


@contextmanager
def capturing(model: nn.Module, adapter: ArchitectureAdapter, sink: CaptureSink) -> Iterator[None]:
    """Route ``model``'s attention, MLP inputs and block outputs to ``sink`` inside the block.

    Everything is undone in ``finally`` (attention implementation, hooks, train
    mode), so a model being fine-tuned can be analyzed between steps.
    """
    inner = unwrap(model)
    name = register_attention()
    configs = _configs(inner)
    previous = [(c, c._attn_implementation_internal) for c in configs]
    was_training = [(m, m.training) for m in inner.modules()]
    handles = []
    attention_ids = []
    try:
        inner.eval()
        for config in configs:
            config._attn_implementation_internal = name
        for layer in range(adapter.n_layers):
            attention = adapter.attention(inner, layer)
            _SINKS[id(attention)] = (sink, layer, adapter.sliding_window(layer))
            attention_ids.append(id(attention))
            handles.append(adapter.mlp_output(inner, layer).register_forward_pre_hook(
                partial(_neuron_hook, sink, layer)))
            handles.append(adapter.block(inner, layer).register_forward_hook(
                partial(_hidden_hook, sink, layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for key in attention_ids:
            _SINKS.pop(key, None)
        for config, value in previous:
            config._attn_implementation_internal = value
        for module, training in was_training:
            module.training = training
