"""Fine-tuning methods, one module each, registered by name (the PEFT way: a folder per method, one call each).

A method says what trains (:class:`FinetuneMethod.prepare`), its paper
defaults, whether it adapts every layer or layers chosen by ``layers`` /
``circuit`` / ``random_layers``, and whether it writes an adapter. Adding one
is a new module here (or anywhere) plus one :func:`register_finetune_method`
call; the loop, the CLI's ``--method`` choices and the study read the registry.
Torch-free at import: each ``prepare`` imports what it needs when it runs.
"""

from __future__ import annotations

from sumcircuit.training.methods.base import (
    FINETUNE_METHODS,
    FinetuneMethod,
    LayerChoice,
    PreparedModel,
    choose_layers,
    prepare_model,
    random_layers,
    register_finetune_method,
)
from sumcircuit.training.methods.full import FULL
from sumcircuit.training.methods.lora import LORA
from sumcircuit.training.methods.targeted import TARGETED_LORA

__all__ = ["FINETUNE_METHODS", "FULL", "LORA", "TARGETED_LORA", "FinetuneMethod", "LayerChoice", "PreparedModel",
           "choose_layers", "prepare_model", "random_layers", "register_finetune_method"]
