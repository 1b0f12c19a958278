"""LoRA on every layer: rank-8 adapters on the query and value projections (lr 5e-5, batch 16, patience 3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.training.config import FinetuneError
from sumcircuit.training.methods.base import FinetuneMethod, LayerChoice, PreparedModel, register_finetune_method

if TYPE_CHECKING:
    from sumcircuit.models import LoadedModel
    from sumcircuit.training.config import ResolvedFinetuneConfig

LORA_DEFAULTS = {"lr": 5e-5, "batch_size": 16, "epochs": 10.0, "patience": 3}


def prepare_lora(loaded: LoadedModel, choice: LayerChoice, cfg: ResolvedFinetuneConfig) -> PreparedModel:
    """q/v LoRA on ``choice.layers`` (verified module by module), everything else frozen.

    With ``cfg.unit == "head"`` LoRA may change only the q/v rows of the circuit's
    heads; the trainable count is then of the parameters that can change.
    """
    from sumcircuit.lora import (
        count_params,
        expected_head_lora_params,
        expected_lora_params,
        inject_lora,
        restrict_lora_to_heads,
    )
    from sumcircuit.training.optim import enable_gradient_checkpointing

    adapter = loaded.adapter
    model = inject_lora(loaded.model, adapter, choice.layers, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)
    expected = expected_lora_params(adapter, len(choice.layers), cfg.rank)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_params(model)
    if cfg.unit == "head":
        if not choice.heads:
            raise FinetuneError("`unit` head needs the circuit's heads")
        trainable = restrict_lora_to_heads(model, adapter, choice.heads)
        expected = expected_head_lora_params(adapter, choice.heads, cfg.rank)
        if trainable != expected:
            raise FinetuneError(f"head-level LoRA has {trainable} trainable parameters, expected {expected}")
    return PreparedModel(model, trainable, total, expected)


LORA = register_finetune_method(FinetuneMethod(
    "lora", "LoRA on the query and value projections of every layer", LORA_DEFAULTS, layers="all", adapter=True,
    prepare=prepare_lora))
