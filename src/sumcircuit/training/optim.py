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


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def can_fuse(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW applies: plain floating-point tensors on a device it has a kernel for."""
    return bool(params) and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                                and p.device.type in FUSED_DEVICES for p in params)


def make_optimizer(model: torch.nn.Module, cfg: ResolvedFinetuneConfig,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, 1-D parameters (biases, norm weights) do not.

    ``fused`` (default: wherever :func:`can_fuse`) updates every parameter in
    one kernel instead of torch's per-tensor loop, which took 16-19% of a full
    fine-tuning step on the CPU; the update is the same up to float rounding.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    use_fused = can_fuse(params) if fused is None else fused
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=use_fused or None)


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
