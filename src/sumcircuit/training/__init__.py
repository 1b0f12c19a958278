"""Fine-tuning for summarization: full, LoRA on every layer, targeted LoRA, and any method you register.

``config`` (:class:`FinetuneConfig`; no torch), ``methods`` (the registry, a
module per method), ``batches`` (splits, sampler, the summary loss,
validation), ``optim``, ``state``, ``loop``, ``checkpoint`` and ``resume``
(bitwise resume), ``tracking``, ``result`` and ``run`` (:func:`finetune`).
Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.lazy import lazy_getattr
from sumcircuit.training.config import FinetuneConfig, FinetuneError, ResolvedFinetuneConfig
from sumcircuit.training.methods import (
    FINETUNE_METHODS,
    FinetuneMethod,
    LayerChoice,
    PreparedModel,
    choose_layers,
    random_layers,
    register_finetune_method,
)

_LAZY = {"FinetuneResult": "result", "finetune": "run"}

__all__ = ["FINETUNE_METHODS", "FinetuneConfig", "FinetuneError", "FinetuneMethod", "LayerChoice", "PreparedModel",
           "ResolvedFinetuneConfig", "choose_layers", "random_layers", "register_finetune_method", "FinetuneResult",
           "finetune"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.training.result import FinetuneResult
    from sumcircuit.training.run import finetune
