"""A toy fine-tuning method for the registry test: one module and one registration, nothing else touched.

``bias-only`` trains only the 1-D parameters (biases and norm weights) of every layer, in the spirit of BitFit.
"""

from __future__ import annotations

from sumcircuit.training import FinetuneMethod, LayerChoice, PreparedModel, register_finetune_method


def prepare_bias_only(loaded, choice: LayerChoice, cfg) -> PreparedModel:  # type: ignore[no-untyped-def]
    trainable = 0
    for param in loaded.model.parameters():
        param.requires_grad_(param.ndim == 1)
        trainable += param.numel() if param.ndim == 1 else 0
    total = sum(p.numel() for p in loaded.model.parameters())
    return PreparedModel(loaded.model, trainable, total, trainable)


def register() -> FinetuneMethod:
    return register_finetune_method(FinetuneMethod(
        "bias-only", "biases and norm weights only (BitFit-like)", {"lr": 1e-3, "batch_size": 4, "epochs": 1.0,
                                                                    "patience": 0},
        layers="all", adapter=False, prepare=prepare_bias_only), replace=True)
