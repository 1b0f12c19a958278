"""Full fine-tuning: every parameter trains (the paper's baseline: lr 3e-5, batch 32, 10 epochs, no early stop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.training.methods.base import FinetuneMethod, LayerChoice, PreparedModel, register_finetune_method

if TYPE_CHECKING:
    from sumcircuit.models import LoadedModel
    from sumcircuit.training.config import ResolvedFinetuneConfig


def prepare_full(loaded: LoadedModel, choice: LayerChoice, cfg: ResolvedFinetuneConfig) -> PreparedModel:
    """Every parameter trains."""
    from sumcircuit.lora import count_params
    from sumcircuit.training.optim import enable_gradient_checkpointing

    model = loaded.model
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_params(model)
    return PreparedModel(model, trainable, total, None)


FULL = register_finetune_method(FinetuneMethod(
    "full", "every parameter trains", {"lr": 3e-5, "batch_size": 32, "epochs": 10.0, "patience": 0},
    layers="all", adapter=False, prepare=prepare_full))
