"""Adapters any PEFT user can load: ``PeftModel.from_pretrained(base, folder)``, nothing of sumcircuit needed.

Training adapts GPT-2's fused ``c_attn`` through three split projections
(:class:`~sumcircuit.lora.SplitQKV`), whose module names exist only inside
sumcircuit. The saved form is PEFT's own: one LoRA of rank ``2r`` on ``c_attn``
with ``A = [A_q; A_v]`` and ``B`` the block matrix ``[[B_q, 0], [0, 0], [0, B_v]]``,
so its update is exactly ``B_q A_q`` on the q columns, ``B_v A_v`` on the v columns
and zero on k. PEFT scales by ``lora_alpha / r``; doubling both keeps the scale.

``base_model_name_or_path`` is the model spec the user gave (a hub id, a named
model, an absolute folder), never a path into sumcircuit's GGUF cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.artifacts import atomic_save_safetensors, atomic_write_json, read_json
from sumcircuit.errors import ModelError
from sumcircuit.lora import ADAPTER_WEIGHTS, PARTS, lora_targets

ADAPTER_CONFIG = "adapter_config.json"
_SPLIT_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<part>q_proj|v_proj)\.(?P<ab>lora_[AB])\.weight$")


def fused_block_sizes(adapter: ArchitectureAdapter) -> tuple[int, int, int]:
    """Output sizes of the q, k and v blocks of a fused projection."""
    q = adapter.n_heads * adapter.head_dim
    kv = adapter.n_kv_heads * adapter.head_dim
    return q, kv, kv


def fuse_split_lora(tensors: dict[str, torch.Tensor], adapter: ArchitectureAdapter) -> dict[str, torch.Tensor]:
    """Split-projection LoRA tensors as one rank-2r LoRA per fused module (k block exactly zero)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _SPLIT_KEY.match(key)
        if match is None:
            raise ModelError(f"adapter tensor {key}: not a LoRA weight of a split q|k|v projection")
        grouped.setdefault(match["prefix"], {})[f"{match['part']}.{match['ab']}"] = value
    q_size, k_size, v_size = fused_block_sizes(adapter)
    fused: dict[str, torch.Tensor] = {}
    for prefix, parts in grouped.items():
        try:
            a_q, a_v = parts["q_proj.lora_A"], parts["v_proj.lora_A"]
            b_q, b_v = parts["q_proj.lora_B"], parts["v_proj.lora_B"]
        except KeyError as exc:
            raise ModelError(f"adapter tensors of {prefix}: {exc.args[0]} missing") from None
        rank = a_q.shape[0]
        b = torch.zeros(q_size + k_size + v_size, 2 * rank, dtype=b_q.dtype)
        b[:q_size, :rank] = b_q
        b[q_size + k_size:, rank:] = b_v
        fused[f"{prefix}.lora_A.weight"] = torch.cat([a_q, a_v], dim=0)
        fused[f"{prefix}.lora_B.weight"] = b
    return fused


def native_config(config: dict[str, Any], adapter: ArchitectureAdapter) -> dict[str, Any]:
    """The adapter config of the fused form: target the fused module at twice the rank and alpha."""
    module = lora_targets(adapter).modules[0].rsplit(".", 1)[0]  # "attn.c_attn.q_proj" -> "attn.c_attn"
    return {**config, "target_modules": [module], "r": 2 * int(config["r"]),
            "lora_alpha": 2 * float(config["lora_alpha"]), "rank_pattern": {}, "alpha_pattern": {}}


def make_portable(folder: Path, adapter: ArchitectureAdapter, base_model: str) -> None:
    """Rewrite an adapter PEFT saved from a sumcircuit model into the form plain PEFT loads (in place)."""
    config = read_json(folder / ADAPTER_CONFIG)
    if lora_targets(adapter).split_fused:
        from safetensors.torch import load_file

        tensors = fuse_split_lora(load_file(str(folder / ADAPTER_WEIGHTS)), adapter)
        atomic_save_safetensors(tensors, folder / ADAPTER_WEIGHTS, {"format": "pt"})
        config = native_config(config, adapter)
    atomic_write_json(folder / ADAPTER_CONFIG, {**config, "base_model_name_or_path": base_model})


def is_split_form(config: dict[str, Any]) -> bool:
    """An adapter of the internal split form (written by sumcircuit versions before the portable one)."""
    targets = config.get("target_modules") or []
    return isinstance(targets, list) and any(str(t).rsplit(".", 1)[-1] in PARTS and "." in str(t) for t in targets)


def unfuse_lora(tensors: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The portable fused form back in the split form of a live training model (its state dict is ``live``).

    Resuming a GPT-2 run reads its checkpoint's portable adapter into the split
    projections it trains; tensors that already fit ``live`` (or fit nothing) pass unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        prefix, _, kind = key.rpartition(".lora_")
        q_b, v_b = live.get(f"{prefix}.q_proj.lora_B.weight"), live.get(f"{prefix}.v_proj.lora_B.weight")
        if key in live or q_b is None or v_b is None:
            out[key] = value
            continue
        rank = q_b.shape[1]
        if kind == "A.weight":
            out[f"{prefix}.q_proj.lora_A.weight"], out[f"{prefix}.v_proj.lora_A.weight"] = value[:rank], value[rank:]
        else:
            out[f"{prefix}.q_proj.lora_B.weight"] = value[:q_b.shape[0], :rank]
            out[f"{prefix}.v_proj.lora_B.weight"] = value[value.shape[0] - v_b.shape[0]:, rank:]
    return {k: v.contiguous() for k, v in out.items()}
