"""Query/value-exact LoRA through PEFT, for every architecture family.

The paper adapts the query and value projections only. LLaMA-style models
have separate ``q_proj``/``v_proj`` modules, so PEFT's ``target_modules`` +
``layers_to_transform`` say exactly that. GPT-2 computes ``[q | k | v]`` with
one fused ``c_attn``; PEFT on ``c_attn`` would also adapt k. So, on the
adapted layers only, the fused module is replaced by :class:`SplitQKV`: three
projections holding the column blocks of the fused weight, whose concatenated
output is the fused output (bitwise on CPU; a split GEMM reduces over the same
inputs). PEFT then adapts ``c_attn.q_proj`` and ``c_attn.v_proj``; ``k_proj``
is an untouched copy of the k block. Merging folds the parts back into one
fused module, so a merged model is a plain model of its family again.

One module because the split of GPT-2's fused q|k|v, the injection, the head-row restriction and
the merge must agree tensor by tensor; spread over modules, that agreement would be implicit.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from sumcircuit.adapters import ArchitectureAdapter, FusedQKV, get_submodule
from sumcircuit.artifacts import read_json
from sumcircuit.errors import ModelError
from sumcircuit.sites import Site

ADAPTER_META = "sumcircuit_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PARTS = ("q_proj", "k_proj", "v_proj")


# ---------------------------------------------------------------- fused q|k|v splitting

def _linear_parts(adapter: ArchitectureAdapter) -> tuple[int, int, int]:
    """Output sizes of q, k, v (k and v are smaller under grouped-query attention)."""
    q = adapter.n_heads * adapter.head_dim
    kv = adapter.n_kv_heads * adapter.head_dim
    return q, kv, kv


def _slice_module(fused: Any, start: int, end: int, layout: str) -> nn.Module:
    """A projection computing output columns [start, end) of ``fused``, with copied weights."""
    weight, bias = fused.weight, getattr(fused, "bias", None)
    if layout == "conv1d":
        assert bias is not None  # Conv1D always has a bias
        part: nn.Module = Conv1D(end - start, weight.shape[0])
        part.weight = nn.Parameter(weight.detach()[:, start:end].clone(), weight.requires_grad)
        part.bias = nn.Parameter(bias.detach()[start:end].clone(), bias.requires_grad)
    else:
        part = nn.Linear(weight.shape[1], end - start, bias=bias is not None,
                         device=weight.device, dtype=weight.dtype)
        part.weight = nn.Parameter(weight.detach()[start:end].clone(), weight.requires_grad)
        if bias is not None:
            part.bias = nn.Parameter(bias.detach()[start:end].clone(), bias.requires_grad)
    return part


class SplitQKV(nn.Module):
    """A fused q|k|v projection as three projections with the same concatenated output.

    Exists so PEFT can target q and v without touching k. ``weight``/``bias``
    give the *effective* fused parameters (LoRA deltas included), so code that
    reads ``c_attn.weight`` (weight-change statistics) sees the true weights.
    """

    def __init__(self, fused: nn.Module, sizes: tuple[int, int, int], layout: str) -> None:
        super().__init__()
        self.layout = layout
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        for i, name in enumerate(PARTS):
            self.add_module(name, _slice_module(fused, bounds[i], bounds[i + 1], layout))

    q_proj: Any
    k_proj: Any
    v_proj: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def part_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Effective (weight, bias) of q, k, v in the fused layout, active LoRA deltas added."""
        out = []
        for name in PARTS:
            module = getattr(self, name)
            base = getattr(module, "base_layer", module)
            weight = base.weight.detach()
            if module is not base and not module.merged and not module.disable_adapters:
                for active in module.active_adapters:  # a PEFT LoRA layer wraps the part
                    if active in module.lora_A:
                        weight = weight + module.get_delta_weight(active).detach().to(weight.dtype)
            bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
            out.append((weight, bias))
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight, re-assembled from the three parts."""
        dim = 1 if self.layout == "conv1d" else 0
        return torch.cat([w for w, _ in self.part_weights()], dim=dim)

    @property
    def bias(self) -> torch.Tensor | None:
        """The fused bias, re-assembled from the three parts."""
        biases = [b for _, b in self.part_weights()]
        return None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]

    def fused(self) -> nn.Module:
        """One plain fused module with the effective weights (call after merging LoRA)."""
        weight, bias = self.weight, self.bias
        if self.layout == "conv1d":
            module: nn.Module = Conv1D(weight.shape[1], weight.shape[0])
        else:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        module.weight = nn.Parameter(weight.clone())
        if bias is not None:
            module.bias = nn.Parameter(bias.clone())
        return module.to(weight.device)


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_path, _, name = dotted.rpartition(".")
    setattr(get_submodule(root, parent_path) if parent_path else root, name, module)


def split_fused_qkv(model: nn.Module, adapter: ArchitectureAdapter, layers: list[int]) -> int:
    """Replace the fused q|k|v module of ``layers`` by :class:`SplitQKV`. Returns how many."""
    qkv = adapter.spec.qkv
    if not isinstance(qkv, FusedQKV):
        return 0
    done = 0
    for layer in layers:
        block = adapter.block(model, layer)
        fused: Any = get_submodule(block, qkv.module)
        if isinstance(fused, SplitQKV):
            continue
        sizes = _linear_parts(adapter)
        out_features = fused.weight.shape[1] if qkv.weight_layout == "conv1d" else fused.weight.shape[0]
        if sum(sizes) != out_features:
            raise ModelError(f"layer {layer}: fused q|k|v output has {out_features} features, expected "
                             f"{'+'.join(map(str, sizes))} from the config")
        _set_submodule(block, qkv.module, SplitQKV(fused, sizes, qkv.weight_layout))
        done += 1
    return done


def fuse_split_qkv(model: nn.Module, adapter: ArchitectureAdapter) -> int:
    """Undo :func:`split_fused_qkv` (after a LoRA merge): plain fused modules again."""
    qkv = adapter.spec.qkv
    if not isinstance(qkv, FusedQKV):
        return 0
    done = 0
    for layer in range(adapter.n_layers):
        block = adapter.block(model, layer)
        module = get_submodule(block, qkv.module)
        if isinstance(module, SplitQKV):
            _set_submodule(block, qkv.module, module.fused())
            done += 1
    return done


# ---------------------------------------------------------------- PEFT configuration

@dataclass(frozen=True)
class LoraTargets:
    """What PEFT is told for one family: module suffixes, the layer-list name, the layout."""

    modules: tuple[str, str]  # q and v, relative to a decoder block
    layers_pattern: str  # the ModuleList's attribute name ("h", "layers")
    fan_in_fan_out: bool  # Conv1D stores weights as [in, out]
    split_fused: bool


def lora_targets(adapter: ArchitectureAdapter) -> LoraTargets:
    """The q and v module names LoRA targets in this family."""
    qkv = adapter.spec.qkv
    pattern = adapter.spec.layers.rsplit(".", 1)[-1]
    if isinstance(qkv, FusedQKV):
        return LoraTargets((f"{qkv.module}.q_proj", f"{qkv.module}.v_proj"), pattern,
                           qkv.weight_layout == "conv1d", True)
    return LoraTargets((qkv.q, qkv.v), pattern, False, False)


def expected_lora_params(adapter: ArchitectureAdapter, n_layers: int, rank: int) -> int:
    """rank x (d_in + d_out) for q and for v, per adapted layer (v is d -> kv_dim under GQA)."""
    d = adapter.hidden_size
    q_out, _, v_out = _linear_parts(adapter)
    return n_layers * rank * ((d + q_out) + (d + v_out))


def check_layers(adapter: ArchitectureAdapter, layers: list[int]) -> list[int]:
    """``layers`` if each exists in the model, else a one-line error."""
    if not layers:
        raise ModelError("no layers to adapt")
    for layer in layers:
        if not 0 <= layer < adapter.n_layers:
            raise ModelError(f"layer {layer} out of range: the model has {adapter.n_layers} layers "
                             f"(valid: 0..{adapter.n_layers - 1})")
    return sorted(set(layers))


def lora_config(adapter: ArchitectureAdapter, layers: list[int], rank: int, alpha: float,
                dropout: float) -> Any:
    """PEFT's LoraConfig for q/v on exactly ``layers``."""
    from peft import LoraConfig

    targets = lora_targets(adapter)
    # PEFT annotates lora_alpha as int; a float alpha works and is what the configs hold
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",  # type: ignore[arg-type]
                      target_modules=list(targets.modules), layers_to_transform=list(layers),
                      layers_pattern=targets.layers_pattern, fan_in_fan_out=targets.fan_in_fan_out,
                      task_type="CAUSAL_LM")


def matched_layers(peft_model: Any, adapter: ArchitectureAdapter) -> dict[int, list[str]]:
    """Layer -> matched module suffixes, from PEFT's own record of what it adapted."""
    pattern = re.compile(rf"(?:^|.*?\.){re.escape(adapter.spec.layers)}\.(\d+)\.(.+)$")
    found: dict[int, list[str]] = {}
    for name in peft_model.base_model.targeted_module_names:
        match = pattern.match(name)
        if match is None:
            raise ModelError(f"LoRA adapted a module outside the decoder layers: {name}")
        found.setdefault(int(match.group(1)), []).append(match.group(2))
    return {k: sorted(v) for k, v in sorted(found.items())}


def verify_matched(peft_model: Any, adapter: ArchitectureAdapter, layers: list[int]) -> None:
    """Fail loudly unless PEFT adapted exactly q and v on exactly ``layers``."""
    want = {layer: sorted(lora_targets(adapter).modules) for layer in layers}
    got = matched_layers(peft_model, adapter)
    if got != want:
        raise ModelError(f"LoRA matched {got or 'nothing'} but {want} was asked "
                         f"(family {adapter.family}, layers pattern '{adapter.spec.layers}')")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters; tied weights count once."""
    params = list(model.parameters())  # parameters() deduplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def inject_lora(model: PreTrainedModel, adapter: ArchitectureAdapter, layers: list[int], *,
                rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> Any:
    """Wrap ``model`` (in place) with q/v LoRA on ``layers``; verify matches and parameter count.

    Call before enabling gradient checkpointing: PEFT hooks the embeddings to
    require grad when checkpointing is already on, which would make every
    layer below the lowest adapted one compute gradients for nothing.
    """
    from peft import get_peft_model

    layers = check_layers(adapter, layers)
    if lora_targets(adapter).split_fused:
        split_fused_qkv(model, adapter, layers)
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(adapter, layers, rank, alpha, dropout))
    except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
        raise ModelError(f"LoRA matched no module for layers {layers}: {exc}") from exc
    verify_matched(peft_model, adapter, layers)
    trainable, _ = count_params(peft_model)
    expected = expected_lora_params(adapter, len(layers), rank)
    if trainable != expected:
        raise ModelError(f"LoRA has {trainable} trainable parameters, expected {expected} "
                         f"({len(layers)} layers x rank {rank} x (d_in + d_out) for q and v)")
    return peft_model


# ---------------------------------------------------------------- head-level LoRA

def head_rows(adapter: ArchitectureAdapter, heads: Sequence[int]) -> tuple[list[int], list[int]]:
    """Output rows of q (the chosen query heads) and of v (their key/value heads).

    Under grouped-query attention query head h reads key/value head
    ``h // (n_heads / n_kv_heads)`` (transformers' ``repeat_kv`` order), so
    adapting head h's values means adapting that shared KV head's v rows.
    """
    hd, group = adapter.head_dim, adapter.n_heads // adapter.n_kv_heads
    for head in heads:
        if not 0 <= head < adapter.n_heads:
            raise ModelError(f"head {head} out of range: the model has {adapter.n_heads} heads per layer")
    q_heads = sorted(set(heads))
    kv_heads = sorted({h // group for h in q_heads})
    return ([r for h in q_heads for r in range(h * hd, (h + 1) * hd)],
            [r for g in kv_heads for r in range(g * hd, (g + 1) * hd)])


def heads_by_layer(heads: Sequence[Site]) -> dict[int, list[int]]:
    """Layer -> head indices, from ``attn_head`` sites."""
    out: dict[int, list[int]] = {}
    for site in heads:
        if site.kind != "attn_head" or site.index is None:
            raise ModelError(f"{site.name} is not an attention head (expected names like L2.H3)")
        out.setdefault(site.layer, []).append(site.index)
    return {layer: sorted(set(v)) for layer, v in sorted(out.items())}


def expected_head_lora_params(adapter: ArchitectureAdapter, heads: Sequence[Site], rank: int) -> int:
    """Per adapted layer: A of q and of v (rank x d each) plus the rank-wide B rows of the chosen heads."""
    total = 0
    for chosen in heads_by_layer(heads).values():
        q_rows, v_rows = head_rows(adapter, chosen)
        total += rank * (2 * adapter.hidden_size + len(q_rows) + len(v_rows))
    return total


def _lora_layer(block: nn.Module, suffix: str) -> Any:
    module: Any = get_submodule(block, suffix)
    if not hasattr(module, "lora_B"):
        raise ModelError(f"{suffix} carries no LoRA layer: inject LoRA on this layer first")
    return module


def restrict_lora_to_heads(peft_model: Any, adapter: ArchitectureAdapter, heads: Sequence[Site]) -> int:
    """Let LoRA change only the q rows of ``heads`` and the v rows of their KV heads; return the trainable count.

    PEFT has no per-row targets, so the rows of every other head are masked in
    LoRA's B: they start at zero (PEFT's initialisation) and a gradient hook
    zeroes their gradient, so AdamW (moments and decoupled weight decay alike)
    keeps them exactly zero: those heads' projections stay bitwise the base
    model's. The count returned is of the parameters that can change.
    """
    model = peft_model.get_base_model()
    q_suffix, v_suffix = lora_targets(adapter).modules
    trainable = 0
    for layer, chosen in heads_by_layer(heads).items():
        block = adapter.block(model, layer)
        for suffix, rows in zip((q_suffix, v_suffix), head_rows(adapter, chosen)):
            module = _lora_layer(block, suffix)
            for name in module.active_adapters:
                weight_b = module.lora_B[name].weight  # [out_features, rank] for Linear and Conv1D alike
                mask = torch.zeros(weight_b.shape[0], 1, dtype=weight_b.dtype, device=weight_b.device)
                mask[rows] = 1
                with torch.no_grad():
                    weight_b.mul_(mask)
                weight_b.register_hook(lambda grad, m=mask: grad * m)
                trainable += module.lora_A[name].weight.numel() + len(rows) * weight_b.shape[1]
    return trainable


# ---------------------------------------------------------------- saved adapters

def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter folder's own metadata (ours, or PEFT's adapter_config.json), checked."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    meta_path = folder / ADAPTER_META
    meta = _read_json_file(meta_path) if meta_path.is_file() else {}
    config = _read_json_file(folder / "adapter_config.json")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":  # prompt tuning, IA3, ...: nothing to merge into the weights sumcircuit compares
        raise ModelError(f"{folder / 'adapter_config.json'}: peft_type {kind!r}; sumcircuit loads LoRA adapters only "
                         "(they merge into the model's weights)")
    meta.setdefault("base_model", config.get("base_model_name_or_path"))
    meta.setdefault("layers", config.get("layers_to_transform"))
    return meta


def is_qv_adapter(adapter_dir: str | Path, adapter: ArchitectureAdapter) -> bool:
    """An exact q/v adapter of this family (as ``sumcircuit finetune`` writes them, GPT-2 q|k|v split).

    Those are applied by :func:`apply_adapter` and checked tensor by tensor;
    any other PEFT adapter goes through PEFT's own loader.
    """
    targets = _read_json_file(Path(adapter_dir) / "adapter_config.json").get("target_modules")
    wanted = set(lora_targets(adapter).modules)
    return isinstance(targets, (list, tuple)) and set(targets) == wanted


def apply_adapter(model: PreTrainedModel, adapter: ArchitectureAdapter, adapter_dir: str | Path) -> Any:
    """Load a saved q/v LoRA adapter onto ``model`` (in place), splitting fused q|k|v as in training.

    Every tensor in the adapter file is checked to be in the model afterwards:
    PEFT only warns about keys it could not place.
    """
    from peft import PeftModel

    folder = Path(adapter_dir)
    meta = read_adapter_meta(folder)
    layers = check_layers(adapter, [int(x) for x in meta.get("layers") or range(adapter.n_layers)])
    if lora_targets(adapter).split_fused:
        split_fused_qkv(model, adapter, layers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"could not apply adapter {folder}: {exc}") from exc
    verify_matched(peft_model, adapter, layers)
    check_all_loaded(peft_model, folder)
    return peft_model


def check_all_loaded(peft_model: Any, folder: Path) -> None:
    """Every tensor of the adapter file is in the model, unchanged: PEFT only warns about keys it could not place."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    loaded = get_peft_model_state_dict(peft_model)
    bad = sorted(k for k in saved if k not in loaded or loaded[k].shape != saved[k].shape or not torch.equal(
        loaded[k].detach().cpu(), saved[k].to(loaded[k].dtype)))
    if bad or len(saved) != len(loaded):
        raise ModelError(f"adapter {folder} does not fit this model: {len(bad)} tensors not loaded "
                         f"(e.g. {bad[:3]}), {len(saved)} saved vs {len(loaded)} expected")


def merge_lora(peft_model: Any, adapter: ArchitectureAdapter) -> PreTrainedModel:
    """Fold LoRA into the base weights; a plain model of the family comes back."""
    model: PreTrainedModel = peft_model.merge_and_unload()
    fuse_split_qkv(model, adapter)
    return model
