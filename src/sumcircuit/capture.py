"""Capture machinery: both models run layer by layer in lockstep; statistics come from their one softmax.

An attention function registered in ``transformers``' ``AttentionInterface``
replaces SDPA while a capture runs. The base model's forward pass runs in a
greenlet and the tuned model's in the caller's; they take turns, so at
every layer the tuned model's attention call sees both models' post-RoPE
query, key and value. One pass over tiles of query rows then gives, per model,
``d = s - max(s)``, ``e = exp(d)`` and ``z = sum e`` once, and from them::

    output   = (e @ V) / z                            (the layer's attention output)
    H(p)     = log z - sum_j e_j d_j / z              (p = e / z, lp = d - log z)
    KL(p||r) =  sum_j p_j lp_j - sum_j p_j lr_j       (r: the other model's row, same keys)

No ``[T, T]`` matrix exists (a tile is ``rows x T``), no softmax is computed
twice, and nothing is kept across layers: the base's neuron inputs and block
outputs (forward hooks) wait one layer for their tuned partners. On CUDA the
same statistics come from one fused attention call per model that returns the
log-sum-exp (:func:`fused_paired_attention`), and no tile is written out at all.

One module because the lockstep, the attention function and the tile statistics share one invariant
(both models at the same layer and rows): split, each part would have to state it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Protocol

import torch
from greenlet import getcurrent, greenlet
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis.config import KernelMode
from sumcircuit.errors import SumcircuitError
from sumcircuit.kernels import KernelError, attention_lse, attention_path, fused_failed, tile_kernel

ATTN_IMPLEMENTATION = "sumcircuit_stats"
_NEG = torch.finfo(torch.float32).min


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


@dataclass(frozen=True)
class AttentionInputs:
    """One model's attention call: post-RoPE ``query`` [B, Hq, T, D], ``key``/``value`` [B, Hkv, Tk, D]."""

    query: Tensor
    key: Tensor
    value: Tensor
    scale: float


@dataclass(frozen=True)
class PairRows:
    """Per query row statistics of one layer of the two models: ``values[i]`` is ``NAMES[i]``, [B, Hq, T] fp32."""

    NAMES: ClassVar[tuple[str, ...]] = ("entropy_base", "entropy_tuned", "kl_base_tuned", "kl_tuned_base")
    values: Tensor  # [4, B, Hq, T]; KL(base||tuned) is p = base

    def __getattr__(self, name: str) -> Tensor:
        if name in PairRows.NAMES:
            return self.values[PairRows.NAMES.index(name)]
        raise AttributeError(name)


def _grouped_pair(base: Tensor, tuned: Tensor, n_kv: int, scales: tuple[float, float]) -> Tensor:
    """Both models' ``[B, H, T, D]`` queries -> fp32 ``[2*B*Hkv, T*n_rep, D]``, scaled; rows (position, head of the group).

    Query heads that share a key head become one matrix, so grouped-query keys
    are never repeated, and a tile of positions is a contiguous slice. Both
    models go in one batch: one GEMM call for both keeps 2 cores busy where
    ``B*Hkv`` alone is odd (3 KV heads: 1.4x faster).
    """
    b, h, t, d = base.shape
    grouped = torch.empty(2, b, n_kv, t, h // n_kv, d, dtype=torch.float32, device=base.device)
    for i, (x, scale) in enumerate(zip((base, tuned), scales)):  # scaled while regrouped: one pass
        torch.mul(x.float().view(b, n_kv, h // n_kv, t, d).transpose(2, 3), scale, out=grouped[i])
    return grouped.view(2 * b * n_kv, t * (h // n_kv), d)


def _ungrouped(x: Tensor, b: int, n_kv: int, t: int) -> Tensor:
    """Rows ``[..., B*Hkv, T*n_rep, F]`` -> ``[..., B, T, H, F]`` (the inverse of the grouping)."""
    lead = x.shape[:-3]
    x = x.reshape(*lead, b, n_kv, t, -1, x.shape[-1])  # [..., B, Hkv, T, n_rep, F]
    return x.movedim(-4, -3).flatten(-3, -2)  # [..., B, T, Hkv, n_rep, F] -> [..., B, T, H, F]


def _scores(q: Tensor, k_t: Tensor, rows: slice, kv_end: int, n_rep: int, mask: RowMask, batch: int,
            buffer: Tensor) -> Tensor:
    """Both models' score tiles ``[2, B*Hkv, c*n_rep, kv_end]`` of query positions ``rows``, in ``buffer``.

    An additive mask is added here; the causal limit is the tile kernel's
    (it skips the keys past it). ``buffer`` is flat and reused by every tile
    of the layer: a fresh tile per step would be fresh pages for the
    allocator to fault in.
    """
    c = rows.stop - rows.start
    scores = buffer[:q.shape[0] * c * n_rep * kv_end].view(q.shape[0], c * n_rep, kv_end)
    torch.bmm(q[:, rows.start * n_rep:rows.stop * n_rep], k_t[:, :, :kv_end], out=scores)
    if mask.additive is not None:
        add = mask.additive[:, :, rows, :kv_end]  # [B or 1, 1, c, kv]
        scores.view(2, batch, -1, c, n_rep, kv_end).add_(add[..., None, :])
    return scores.view(2, -1, c * n_rep, kv_end)


_CPU_TILE_SCORE_ROWS = 1152  # batch x heads x positions per tile; measured on AVX-512 with the compiled kernel
_ACCELERATOR_TILE_BYTES = 256 * 2**20  # one fp32 tile; few, large tiles keep kernel launches off the clock


def tile_rows(query: Tensor, kv_len: int, rows_per_tile: int | None = None) -> int:
    """Query positions per score tile: ``rows_per_tile`` if given, else sized for the device.

    CPU tiles are small (a fixed number of score rows over batch and heads)
    so they stay in cache; on an accelerator a tile is bounded by bytes
    instead, so a layer takes a handful of kernel launches.
    """
    if rows_per_tile is not None:
        return rows_per_tile
    heads = query.shape[0] * query.shape[1]
    if query.device.type == "cpu":
        return max(8, _CPU_TILE_SCORE_ROWS // heads)
    return max(64, _ACCELERATOR_TILE_BYTES // max(heads * kv_len * 4, 1))


class Workspace:
    """Flat scratch buffers reused across tiles and layers, grown on demand.

    A fresh score tile per step would be fresh pages for the allocator to
    fault in: at T = 1024 that is a few MB per tile, every tile of every layer.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, device: torch.device) -> Tensor:
        """A buffer of ``numel`` elements on ``device``, reused across layers and batches."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self._buffers[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf


def _expanded(x: Tensor, n_rep: int) -> Tensor:
    """``[B, Hkv, T, F]`` -> ``[B, Hkv * n_rep, T, F]``: each key head once per query head of its group."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def fused_paired_attention(base: AttentionInputs, tuned: AttentionInputs,
                           mask: RowMask) -> tuple[Tensor, Tensor, PairRows]:
    """:func:`paired_attention` from one fused attention call per model (:func:`sumcircuit.kernels.attention_lse`).

    Model ``m``'s call attends with its own scores over the values
    ``[V_m | K_m | K_o - K_m]`` (``o``: the other model) and returns
    ``O = [P V_m | A | D]`` and ``lse_m``. With scaled queries ``q``
    (``s = q . k``), ``sum p_m s_m = q_m . A``, so::

        H(p_m)       = lse_m - q_m . A
        KL(p_m||p_o) = (q_m - q_o) . A - q_o . D + lse_o - lse_m

    All terms are differences of like quantities: a model compared with
    itself gives ``q_m - q_o = 0`` and ``D = P 0 = 0`` exactly, so KL is
    exactly 0. Masked keys carry a finite very negative bias and ``p = 0``
    there, so no bias term enters ``sum p s``.
    """
    d, d_v = base.query.shape[-1], base.value.shape[-1]
    n_rep = base.query.shape[1] // base.key.shape[1]
    queries = [x.query.float() * x.scale for x in (base, tuned)]
    keys = [x.key.float() for x in (base, tuned)]
    outs, self_keys, key_diffs, lse = [], [], [], []
    for m, x in enumerate((base, tuned)):
        values = torch.cat([x.value.float(), keys[m], keys[1 - m] - keys[m]], dim=-1)
        out, lse_m = attention_lse(queries[m], _expanded(keys[m], n_rep), _expanded(values, n_rep),
                                   mask.additive, mask.causal)
        outs.append(out[..., :d_v].transpose(1, 2).to(x.query.dtype))  # [B, T, H, Dv], the model's layout
        self_keys.append(out[..., d_v:d_v + d])
        key_diffs.append(out[..., d_v + d:])
        lse.append(lse_m)
    q, a, diff = queries, self_keys, key_diffs
    rows = [lse[m] - (q[m] * a[m]).sum(-1) for m in (0, 1)]  # entropies
    rows += [((q[m] - q[1 - m]) * a[m]).sum(-1) - (q[1 - m] * diff[m]).sum(-1) + (lse[1 - m] - lse[m])
             for m in (0, 1)]  # KL(base||tuned), KL(tuned||base)
    return outs[0], outs[1], PairRows(torch.stack(rows))


def paired_attention(base: AttentionInputs, tuned: AttentionInputs, mask: RowMask,
                     rows_per_tile: int | None = None, kernel: KernelMode = "auto",
                     workspace: Workspace | None = None) -> tuple[Tensor, Tensor, PairRows]:
    """Both models' attention outputs ``[B, T, Hq, Dv]`` and their row statistics, one softmax each.

    Query positions go in tiles (:func:`tile_rows`). Per tile each model's
    scores ``s`` give ``e = exp(s - max s)`` and its row sum ``z`` once
    (:func:`sumcircuit.kernels.tile_kernel`: C++ or eager as ``kernel``
    says, the causal limit applied there); the output is ``(e @ V) / z``, entropy ``-sum p lp`` and
    ``KL(base||tuned) = sum p_b (lp_b - lp_t)``, all from the same tiles: no
    ``T x T`` matrix, no second softmax. Statistics are fp32 whatever the
    model dtype; outputs are cast back to it. Where ``kernel`` means the fused
    path (:func:`sumcircuit.kernels.attention_path`) it is
    :func:`fused_paired_attention` instead; under ``auto`` a kernel that refuses
    the shape warns once and the tiles take over.
    """
    if base.query.shape != tuned.query.shape or base.key.shape != tuned.key.shape:
        raise CaptureError(f"the models' attention shapes differ ({tuple(base.query.shape)} vs "
                           f"{tuple(tuned.query.shape)}): statistics need matching heads")
    if attention_path(kernel, base.query.device) == "fused":
        try:
            return fused_paired_attention(base, tuned, mask)
        except KernelError as exc:
            if kernel != "auto":
                raise
            fused_failed(exc)
    b, h_q, t_q, _ = base.query.shape
    h_kv, t_k = base.key.shape[1], base.key.shape[2]
    n_rep, offset = h_q // h_kv, t_k - t_q  # query position i is key position i + offset
    device, d_v, n = base.query.device, base.value.shape[-1], b * h_kv
    stats = tile_kernel(kernel, device)
    work = workspace if workspace is not None else Workspace()
    queries = _grouped_pair(base.query, tuned.query, h_kv, (base.scale, tuned.scale))
    # [2*B*Hkv, D, Tk] laid out contiguously (one copy): a GEMM reads it ~1.4x faster than the transposed view
    keys = torch.empty(2, b, h_kv, base.key.shape[-1], t_k, device=device)
    values = torch.empty(2, b, h_kv, t_k, d_v, device=device)
    for i, x in enumerate((base, tuned)):
        keys[i].copy_(x.key.transpose(2, 3))
        values[i].copy_(x.value)
    keys, values = keys.flatten(0, 2), values.flatten(0, 2)
    outs = torch.empty(2, b, t_q, h_q, d_v, device=device)  # each model's output in its final layout
    dots = torch.empty(4, n, t_q * n_rep, device=device)
    step = tile_rows(base.query, t_k, rows_per_tile)
    tile_numel = 2 * n * min(step, t_q) * n_rep
    scores_buffer = work.get("scores", tile_numel * t_k, device)
    out_buffer = work.get("out", tile_numel * d_v, device)
    for r0 in range(0, t_q, step):
        rows = slice(r0, min(t_q, r0 + step))
        c = rows.stop - rows.start
        kv_end = min(t_k, rows.stop + offset) if mask.causal else t_k
        scores = _scores(queries, keys, rows, kv_end, n_rep, mask, b, scores_buffer)
        causal_from = rows.start + offset if mask.causal else None  # row i sees keys <= causal_from + i // n_rep
        # the tiles now hold exp(s - max), z their row sums
        dots[:, :, rows.start * n_rep:rows.stop * n_rep], z = stats(scores[0], scores[1], causal_from, n_rep)
        tile_out = out_buffer[:2 * n * c * n_rep * d_v].view(2 * n, c * n_rep, d_v)
        grouped = torch.bmm(scores.flatten(0, 1), values[:, :kv_end], out=tile_out).view(2, b, h_kv, c, n_rep, d_v)
        # (e @ V) / z, divided while moved to [B, c, H, Dv]: one pass
        torch.div(grouped.transpose(2, 3), z.view(2, b, h_kv, c, n_rep, 1).transpose(2, 3),
                  out=outs[:, :, rows].view(2, b, c, h_kv, n_rep, d_v))
    rows_stats = _ungrouped(dots[..., None], b, h_kv, t_q)[..., 0].transpose(-1, -2)  # [4, B, H, T]
    self_b, cross_b, self_t, cross_t = rows_stats.unbind(0)
    # Like terms first: a model compared with itself gives exactly 0.
    pair = PairRows(torch.stack([-self_b, -self_t, self_b - cross_b, self_t - cross_t]))
    return outs[0].to(base.query.dtype), outs[1].to(tuned.query.dtype), pair


# ---------------------------------------------------------------- the two models in lockstep

class PairSink(Protocol):
    """Receives one layer of both models at a time (tensors valid only during the call)."""

    def on_attention(self, layer: int, rows: PairRows) -> None:
        """Both models' attention row statistics of one layer."""

    def on_neurons(self, layer: int, base: Tensor, tuned: Tensor) -> None:
        """Both models' MLP neuron activations of one layer."""

    def on_hidden(self, layer: int, base: Tensor, tuned: Tensor) -> None:
        """Both models' block outputs of one layer."""


_ACTIVE: dict[int, tuple[_Lockstep, int]] = {}  # id(attention module) -> run, layer


class _Lockstep:
    """The base model's forward pass in a greenlet, the tuned one's in the caller's, taking turns.

    The base runs up to its attention call of layer L and switches over; the
    tuned model runs up to its own layer L, computes both attentions in one
    pass (:func:`paired_attention`) and switches back. Neuron inputs and block
    outputs of the base wait one layer for their tuned partners. So both
    models' tensors meet one layer at a time and nothing is kept across layers.
    Greenlets rather than threads: both passes share one OS thread, hence one
    OpenMP team (a second, spinning team slows small ops 2-4x), the caller's
    torch state (no-grad, device) and no lock handoffs.
    """

    def __init__(self, sink: PairSink, windows: list[int | None], rows_per_tile: int | None,
                 kernel: KernelMode = "auto") -> None:
        self.sink, self.windows, self.rows_per_tile, self.kernel = sink, windows, rows_per_tile, kernel
        self.workspace = Workspace()  # one set of tile buffers for every layer
        self._base: greenlet | None = None
        self._pending: tuple[int, AttentionInputs] | None = None
        self._base_out: Tensor | None = None
        self._stash: dict[tuple[str, int], Tensor] = {}

    def _in_base(self) -> bool:
        return self._base is not None and getcurrent() is self._base

    def run(self, run_base: Callable[[], object], run_tuned: Callable[[], object]) -> None:
        self._base = greenlet(run_base)
        try:
            self._base.switch()  # the base runs up to its first attention call (errors surface here)
            run_tuned()
            if not self._base.dead:
                raise CaptureError("the base model called attention more often than the tuned model")
        finally:
            if not self._base.dead:
                self._base.throw()  # GreenletExit: unwind the suspended base pass (its finally blocks run)

    # -- what the patched attention and the hooks call
    def attend(self, layer: int, inputs: AttentionInputs, attention_mask: Tensor | None) -> Tensor:
        if self._in_base():
            assert self._base is not None and self._base.parent is not None
            self._pending = (layer, inputs)
            self._base.parent.switch()  # the tuned model's turn; it switches back with our output
            out, self._base_out = self._base_out, None
            if out is None:
                raise CaptureError(f"the tuned model did not reach attention of layer {layer}")
            return out
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != layer:
            raise CaptureError(f"the models reached attention of layer {layer} out of step")
        q = inputs.query
        mask = row_mask(attention_mask, q.shape[2], inputs.key.shape[2], self.windows[layer], q.device)
        out_b, out_t, rows = paired_attention(pending[1], inputs, mask, self.rows_per_tile, self.kernel,
                                              self.workspace)
        self.sink.on_attention(layer, rows)
        self._base_out = out_b
        assert self._base is not None
        self._base.switch()  # the base goes on to its next attention call, or to its end
        return out_t

    def meet(self, kind: str, layer: int, value: Tensor) -> None:
        """Pair the base's ``kind`` tensor of ``layer`` with the tuned model's."""
        if self._in_base():
            self._stash[(kind, layer)] = value
            return
        base = self._stash.pop((kind, layer), None)
        if base is None:
            raise CaptureError(f"the tuned model's {kind} of layer {layer} has no base partner")
        (self.sink.on_neurons if kind == "neurons" else self.sink.on_hidden)(layer, base, value)


def _stats_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Plain SDPA for modules outside a capture; inside one, both models' attention in one pass."""
    entry = _ACTIVE.get(id(module))
    if entry is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, is_causal=is_causal, **kwargs)
        return out, None
    if kwargs.get("softcap") is not None:
        raise CaptureError("attention logit soft-capping is not supported by the statistics path")
    if kwargs.get("s_aux") is not None:
        raise CaptureError("attention sinks are not supported by the statistics path")
    run, layer = entry
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return run.attend(layer, AttentionInputs(query.detach(), key.detach(), value.detach(), scale),
                      attention_mask), None


_REGISTERED: set[str] = set()


def register_attention_implementation(name: str, attention: Any, mask: Any) -> str:
    """Register an attention function and the mask builder it reads with ``transformers``, once per name."""
    if name not in _REGISTERED:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
        _REGISTERED.add(name)
    return name


def register_attention() -> str:
    """Register the statistics attention (and SDPA's mask builder) under one name, once."""
    return register_attention_implementation(ATTN_IMPLEMENTATION, _stats_attention, sdpa_mask)


# ---------------------------------------------------------------- installing

def unwrap(model: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def body(model: nn.Module) -> nn.Module:
    """The decoder without the LM head: analysis needs no logits."""
    inner = unwrap(model)
    return getattr(inner, "base_model", inner)


def _configs(models: Sequence[nn.Module]) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    for model in models:
        for module in model.modules():
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig):
                seen.setdefault(id(config), config)
    return list(seen.values())


def _neuron_hook(run: _Lockstep, layer: int, _module: nn.Module, args: tuple[Any, ...]) -> None:
    run.meet("neurons", layer, args[0].detach())


def _hidden_hook(run: _Lockstep, layer: int, _module: nn.Module, _args: Any, output: Any) -> None:
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    run.meet("hidden", layer, hidden.detach())


@contextmanager
def _installed(models: Sequence[PreTrainedModel], adapter: ArchitectureAdapter, run: _Lockstep) -> Iterator[None]:
    """The statistics attention and the pairing hooks on ``models``; everything undone in ``finally``."""
    name = register_attention()
    configs = _configs(models)
    previous = [(c, c._attn_implementation_internal) for c in configs]
    was_training = [(m, m.training) for model in models for m in model.modules()]
    handles = []
    hooked: set[int] = set()  # a model compared with itself is hooked once
    try:
        for config in configs:
            config._attn_implementation_internal = name
        for model in models:
            model.eval()
            for layer in range(adapter.n_layers):
                attention = adapter.attention(model, layer)
                if id(attention) in hooked:
                    continue
                hooked.add(id(attention))
                _ACTIVE[id(attention)] = (run, layer)
                handles.append(adapter.mlp_output(model, layer).register_forward_pre_hook(
                    partial(_neuron_hook, run, layer)))
                handles.append(adapter.block(model, layer).register_forward_hook(
                    partial(_hidden_hook, run, layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for key in hooked:
            _ACTIVE.pop(key, None)
        for config, value in previous:
            config._attn_implementation_internal = value
        for module, training in was_training:
            module.training = training


def run_pair(base: nn.Module, tuned: nn.Module, adapter: ArchitectureAdapter, sink: PairSink,
             inputs: dict[str, Any], rows_per_tile: int | None = None, kernel: KernelMode = "auto") -> None:
    """Run both model bodies on ``inputs`` in lockstep, handing every layer of both to ``sink``.

    Each layer's attention is computed once per model, outputs and statistics
    together; hidden states match a plain forward pass within SDPA's own
    tolerance (the output comes from an exact softmax, not SDPA's kernel).
    Train mode, hooks and the attention implementation are restored even on
    error, so a model being fine-tuned can be analyzed between steps.
    """
    run = _Lockstep(sink, [adapter.sliding_window(i) for i in range(adapter.n_layers)], rows_per_tile, kernel)
    with _installed([unwrap(base), unwrap(tuned)], adapter, run):
        run.run(lambda: body(base)(**inputs), lambda: body(tuned)(**inputs))
