"""The optimizer and schedule: AdamW without decay on 1-D parameters, linear or constant rate after warm-up."""

from __future__ import annotations

from typing import Any

import torch

from sumcircuit.training.config import ResolvedFinetuneConfig


def enable_gradient_checkpointing(model: Any) -> None:
    """Checkpoint each block without making the embeddings require grad.

    transformers (and PEFT) hook the input embeddings to require grad so that
    reentrant checkpointing works with frozen inputs; that forces backward
    through every layer below the lowest adapted one. Non-reentrant
    checkpointing does not need it, so the hook is removed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


def make_optimizer(model: torch.nn.Module, cfg: ResolvedFinetuneConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, 1-D parameters (biases, norm weights) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ResolvedFinetuneConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to zero or a constant rate."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
