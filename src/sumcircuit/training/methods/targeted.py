"""Targeted LoRA: the LoRA of :mod:`.lora` on chosen layers only (the paper's "summarization circuit" method).

The layers come from ``layers``, a circuit file (``unit="head"``: only the
q/v rows of its heads) or ``random_layers`` (the control the paper lacked).
The paper gives lr, batch and early stopping for targeted LoRA and calls
standard LoRA "the same" on all layers, so both share their defaults.
"""

from __future__ import annotations

from sumcircuit.training.methods.base import FinetuneMethod, register_finetune_method
from sumcircuit.training.methods.lora import LORA_DEFAULTS, prepare_lora

TARGETED_LORA = register_finetune_method(FinetuneMethod(
    "targeted-lora", "LoRA on the query and value projections of chosen layers (or a circuit's heads)",
    LORA_DEFAULTS, layers="chosen", adapter=True, prepare=prepare_lora))
