"""The live state of one training run: what a resume must restore (:class:`TrainState`) and the run's objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sumcircuit.models import LoadedModel
from sumcircuit.training.batches import EpochSampler, Splits
from sumcircuit.training.casting import WeightCasts
from sumcircuit.training.config import ResolvedFinetuneConfig
from sumcircuit.training.prefix import PrefixCache
from sumcircuit.training.tracking import Tracker


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0  # input tokens trained on
    summary_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    wall_time_s: float = 0.0
    resumed_from: list[int] = field(default_factory=list)




@dataclass
class Run:
    """The live objects of one run, passed between the loop's helpers."""

    cfg: ResolvedFinetuneConfig
    out: Path
    loaded: LoadedModel
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any
    sampler: EpochSampler
    splits: Splits
    state: TrainState
    meta: dict[str, Any]
    fingerprint: dict[str, Any]
    micro_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    tracker: Tracker | None
    tracking_rows: list[dict[str, Any]]
    progress: bool = True
    prefix: PrefixCache | None = None  # the frozen prefix's cache (validation batches, maybe training rows)
    prefix_training: bool = False  # training rows use it too (documents repeat, no dropout below)
    casts: WeightCasts | None = None  # weights cast once to the autocast dtype (mixed precision only)

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without accelerate's wrapper."""
        model: torch.nn.Module = self.accelerator.unwrap_model(self.model)
        return model

    def epoch_float(self) -> float:
        """Epochs done, fractional."""
        return self.state.epoch + self.state.micro / self.micro_per_epoch
