"""The fine-tuning methods are a registry: a toy method is one module and one registration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sumcircuit as sc
from sumcircuit.cli import main
from sumcircuit.training import FINETUNE_METHODS

from helpers import CNNDM

TRAIN = str(CNNDM / "train.jsonl.gz")


@pytest.fixture
def bias_only() -> Iterator[None]:
    from toys.finetune_method import register

    register()
    yield
    FINETUNE_METHODS.unregister("bias-only")


def test_builtin_methods_are_registered() -> None:
    assert FINETUNE_METHODS.names() == ("full", "lora", "targeted-lora")
    assert FINETUNE_METHODS.get("full").defaults == {"lr": 3e-5, "batch_size": 32, "epochs": 10.0, "patience": 0}


def test_a_registered_method_trains_through_the_api_and_the_cli(bias_only: None, tiny_model_dirs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    model = str(tiny_model_dirs["llama"])
    start = load_file(str(tiny_model_dirs["llama"] / "model.safetensors"))
    data = sc.DataConfig(TRAIN, n_docs=8, max_tokens=64)
    result = sc.finetune(model, data, sc.FinetuneConfig(method="bias-only", max_steps=2, batch_size=2),
                         runtime=sc.Runtime(progress=False), out=tmp_path / "api")
    ones = sum(t.numel() for t in start.values() if t.ndim == 1)
    assert result.summary["method"] == "bias-only" and result.summary["trainable_params"] == ones
    assert result.summary["rank"] is None  # not an adapter method: no LoRA fields
    trained = load_file(str(tmp_path / "api" / "final" / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(start[k].ndim == 1 for k in changed)  # only biases and norms moved
    assert main(["finetune", "--model", model, "--data", TRAIN, "--n-docs", "8", "--max-tokens", "64",
                 "--method", "bias-only", "--max-steps", "2", "--batch-size", "2", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "train_summary.json").read_text())
    assert cli["trainable_params"] == ones and cli["best_val_loss"] == result.summary["best_val_loss"]
    with pytest.raises(sc.SumcircuitError, match="selects layers for a targeted method"):
        sc.finetune(model, data, sc.FinetuneConfig(method="bias-only", layers=(1,)), out=tmp_path / "x")
