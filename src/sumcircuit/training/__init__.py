"""Fine-tuning for summarization: full, LoRA on every layer, and targeted LoRA.

``config`` (methods, paper defaults, which layers), ``loop`` (the training
run), ``checkpoint`` (atomic checkpoints, exported models, bitwise resume),
``tracking`` (per-head change against the starting model during training).
"""

from sumcircuit.training.config import METHODS, PAPER_DEFAULTS, FinetuneConfig, FinetuneError, choose_layers
from sumcircuit.training.loop import FinetuneResult, finetune, run_finetune

__all__ = ["METHODS", "PAPER_DEFAULTS", "FinetuneConfig", "FinetuneError", "FinetuneResult", "choose_layers",
           "finetune", "run_finetune"]
