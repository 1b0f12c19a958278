"""Per-head attention change against the starting model, every N steps during training."""


from __future__ import annotations

import copy
from typing import Any

import torch

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis.config import AnalysisConfig
from sumcircuit.analysis.result import AnalysisResult
from sumcircuit.analysis.run import analyze_models
from sumcircuit.data.encoding import Encoded
from sumcircuit.lora import split_fused_qkv

# ---------------------------------------------------------------- tracking

TRACKING_COLUMNS = ("step", "epoch", "layer", "head", "entropy_base", "entropy_tuned",
                    "entropy_delta", "kl_base_tuned", "kl_tuned_base")


class Tracker:
    """Differential analysis of the current weights against the start, on a fixed probe set.

    Isolated here because it depends on :mod:`sumcircuit.analysis`. The start
    model is a frozen deep copy taken before LoRA injection or any update.
    """

    def __init__(self, start_model: torch.nn.Module, adapter: ArchitectureAdapter, probe: list[Encoded],
                 pad_token_id: int, seed: int) -> None:
        self.start, self.adapter, self.probe = start_model, adapter, probe
        self.pad_token_id, self.seed = pad_token_id, seed

    @classmethod
    def create(cls, model: torch.nn.Module, adapter: ArchitectureAdapter, probe: list[Encoded],
               pad_token_id: int, seed: int, split_layers: list[int] | None = None) -> Tracker:
        """``split_layers``: split GPT-2's fused q|k|v there as LoRA training does, so the
        start and current models have the same parameter names (weight-change statistics)."""
        start = copy.deepcopy(model).eval()
        if split_layers:
            split_fused_qkv(start, adapter, split_layers)
        for param in start.parameters():
            param.requires_grad_(False)
        return cls(start, adapter, probe, pad_token_id, seed)

    def rows(self, tuned: Any, step: int, epoch: float) -> list[dict[str, Any]]:
        """Per-head entropy/KL of the current weights against the start, as tracking.csv rows."""
        base = tuned.get_base_model() if hasattr(tuned, "get_base_model") else tuned
        was_training = base.training
        base.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # training RNG stays untouched
                config = AnalysisConfig(seed=self.seed, cka=False, ci_method="normal")
                result = analyze_models(self.start, base, self.adapter, self.probe, config, self.pad_token_id)
        finally:
            base.train(was_training)
        return [{"step": step, "epoch": epoch, **row} for row in head_rows(result)]


def head_rows(result: AnalysisResult) -> list[dict[str, Any]]:
    """Per-head entropy/KL rows of an analysis (the tracking.csv columns after step and epoch)."""
    return [{k: row[k] for k in TRACKING_COLUMNS[2:] if k in row} for row in result.heads]  # type: ignore[literal-required]


