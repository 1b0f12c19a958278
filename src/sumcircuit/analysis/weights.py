"""How far fine-tuning moved each attention and MLP module's weights (LoRA counted with its merged delta)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis.config import IncompatibleModelsError, KernelMode
from sumcircuit.capture import unwrap
from sumcircuit.kernels import squared_norms
from sumcircuit.placement import onloaded


def _effective_params(module: nn.Module) -> dict[str, Tensor]:
    """Parameters as the forward pass uses them: LoRA layers contribute ``W + delta``."""
    out: dict[str, Tensor] = {}
    lora_prefixes: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue
        if hasattr(sub, "base_layer") and hasattr(sub, "get_delta_weight"):  # a PEFT LoRA layer
            lora_prefixes.append(name + "." if name else "")
            base_layer = sub.base_layer
            weight = base_layer.weight.detach().float()
            if not getattr(sub, "merged", False) and not getattr(sub, "disable_adapters", False):
                for adapter_name in sub.active_adapters:
                    if adapter_name in sub.lora_A:
                        weight = weight + sub.get_delta_weight(adapter_name).detach().float()
            out[f"{name}.weight".lstrip(".")] = weight
            if getattr(base_layer, "bias", None) is not None:
                out[f"{name}.bias".lstrip(".")] = base_layer.bias.detach().float()
            continue
        for pname, param in sub.named_parameters(recurse=False):
            out[f"{name}.{pname}".lstrip(".")] = param.detach().float()
    return out


def relative_weight_change(base: nn.Module, tuned: nn.Module, kernel: KernelMode = "auto") -> float:
    """||W_tuned - W_base||_F / ||W_base||_F over all parameters of a module."""
    pb, pt = _effective_params(base), _effective_params(tuned)
    if pb.keys() != pt.keys() or any(pb[k].shape != pt[k].shape for k in pb):
        raise IncompatibleModelsError(f"parameters of {type(base).__name__} differ between the models")
    sums = [squared_norms(pt[k].to(pb[k].device), pb[k], kernel) for k in pb]
    num, den = sum(n for n, _ in sums), sum(d for _, d in sums)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.nan


def weight_changes(base: nn.Module, tuned: nn.Module, adapter: ArchitectureAdapter,
                   kernel: KernelMode = "auto") -> dict[str, Tensor]:
    """Relative weight change of every layer's attention and MLP module, ``[L]`` each."""
    b, t = unwrap(base), unwrap(tuned)
    attn, mlp = [], []
    for i in range(adapter.n_layers):
        with onloaded(b, adapter.block(b, i)), onloaded(t, adapter.block(t, i)):  # offloaded by a device map
            attn.append(relative_weight_change(adapter.attention(b, i), adapter.attention(t, i), kernel))
            mlp.append(relative_weight_change(adapter.mlp(b, i), adapter.mlp(t, i), kernel))
    return {"attn": torch.tensor(attn, dtype=torch.float64), "mlp": torch.tensor(mlp, dtype=torch.float64)}


