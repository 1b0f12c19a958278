"""Weights cast once against autocast casting them at every forward: bitwise the same numbers.

The reference is autocast itself (no casts kept): the loss, every gradient and
a whole mixed-precision run must be identical, not just close.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

import sumcircuit as sc
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.data import DataConfig, collate, encode_all, load_examples
from sumcircuit.lora import inject_lora
from sumcircuit.training import FinetuneConfig
from sumcircuit.training import loop as training_loop
from sumcircuit.training.batches import evaluate_loss, lm_loss_terms
from sumcircuit.training.casting import WeightCasts

from helpers import CNNDM, make_tiny_model

TRAIN = str(CNNDM / "train.jsonl.gz")
CPU = torch.device("cpu")
BF16 = torch.bfloat16


def _batch(tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    data = DataConfig(TRAIN, n_docs=3, max_tokens=64)
    encoded = encode_all(tokenizer, load_examples(data).examples, data, need_summary_tokens=True)
    full = collate(encoded, tokenizer.pad_token_id)  # rows of different lengths: padding included
    return {k: full[k] for k in ("input_ids", "attention_mask", "labels")}


def _lora(family: str) -> torch.nn.Module:
    model = make_tiny_model(family)
    peft_model = inject_lora(model, ArchitectureAdapter.for_model(model), [1, 2], rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model.train()


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    casts: WeightCasts | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16), (casts.applied() if casts else torch.enable_grad()):
        total, count = lm_loss_terms(model, batch)
        (total / count).backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_lora_step_is_bitwise_autocasts_own(family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = _lora(family)
    batch = _batch(tiny_tokenizer)
    params = {n: p for n, p in model.named_parameters()}
    casts = WeightCasts(model, BF16)
    assert casts.slots  # the q/k/v/o, MLP and head matmuls (GPT-2's are Conv1D)
    loss, grads = _loss_and_grads(model, batch, None)
    for _ in range(2):  # the second time from the kept casts
        cast_loss, cast_grads = _loss_and_grads(model, batch, casts)
        assert torch.equal(cast_loss, loss)
        assert grads.keys() == cast_grads.keys() and len(grads) == 2 * 2 * 2  # A, B of q and v on 2 layers
        assert all(torch.equal(grads[n], cast_grads[n]) for n in grads)
    # afterwards every module holds its own fp32 parameters, ties included
    assert all(p is params[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight
    info = casts.summary()
    assert info["dtype"] == "bfloat16" and info["frozen_tensors"] > 0
    frozen_bytes = sum({id(p): p.numel() * 2 for p in model.parameters() if not p.requires_grad
                        and any(p is m._parameters.get("weight") or p is m._parameters.get("bias")
                                for m, _ in casts.slots)}.values())
    assert info["frozen_mb"] == round(frozen_bytes / 2**20, 2)


def test_validation_casts_trainable_weights_once(family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """A full model (everything trainable): the no-grad pass with every weight cast once per pass."""
    model = make_tiny_model(family)
    data = DataConfig(TRAIN, n_docs=5, max_tokens=64)
    encoded = encode_all(tiny_tokenizer, load_examples(data).examples, data, need_summary_tokens=True)
    casts = WeightCasts(model, BF16)
    with torch.autocast("cpu", dtype=BF16):
        plain = evaluate_loss(model, encoded, tiny_tokenizer.pad_token_id, 2, CPU)
        with casts.applied(trainable=True):
            cast = evaluate_loss(model, encoded, tiny_tokenizer.pad_token_id, 2, CPU)
            weights = [m._parameters[name] for m, name in casts.slots]
            assert all(w.dtype == BF16 for w in weights)
        with casts.applied():  # trainable weights are left alone without ``trainable``
            assert all(m._parameters[name].dtype == torch.float32 for m, name in casts.slots)
    assert cast == plain
    assert casts.frozen == {}  # nothing frozen, nothing kept
    assert all(m._parameters[name].dtype == torch.float32 for m, name in casts.slots)


def _run(model: str, out: Path, **kw: object) -> dict:
    cfg = FinetuneConfig(**{**dict(method="lora", batch_size=2, grad_accum=2, max_steps=4, eval_every=2,
                                   lr=1e-2, val_fraction=0.25, keep_checkpoints=10, final="last",
                                   mixed_precision="bf16"), **kw})  # type: ignore[arg-type]
    return sc.finetune(model, DataConfig(TRAIN, n_docs=10, max_tokens=64), cfg, runtime=sc.Runtime(progress=False),
                       out=out).summary


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# targeted: layers below the adapter are fed from the frozen-prefix cache over 3 epochs, under the casts too
RUNS = {"lora": dict(method="lora"), "full": dict(method="full"),
        "targeted": dict(method="targeted-lora", layers=(2,), max_steps=None, epochs=3.0, grad_accum=1,
                         lora_dropout=0.0)}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_bf16_run_is_bitwise_the_run_without_casts(name: str, tiny_model_dirs: dict[str, Path],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, method = str(tiny_model_dirs["gpt2"]), str(RUNS[name]["method"])
    cast = _run(model, tmp_path / "cast", **RUNS[name])
    with monkeypatch.context() as patch:
        patch.setattr(training_loop, "make_weight_casts", lambda *a: None)
        plain = _run(model, tmp_path / "plain", **RUNS[name])
    assert cast["weight_casts"]["dtype"] == "bfloat16" and plain["weight_casts"] is None
    assert (cast["weight_casts"]["frozen_tensors"] > 0) == (method != "full")
    if name == "targeted":
        assert cast["prefix_cache"]["training_rows"] and cast["prefix_cache"]["hits"] > 0
        # kept: layer 2 (the adapted one, its base weights frozen) and the head; not the no-grad layers 0, 1
        from helpers import tiny_config

        hidden = tiny_config("gpt2").n_embd
        per_layer = 4 * hidden * hidden + 2 * 4 * hidden * hidden + 4 * hidden + 5 * hidden  # attn, MLP, biases
        head = tiny_config("gpt2").vocab_size * hidden
        assert cast["weight_casts"]["frozen_mb"] == round(2 * (per_layer + head) / 2**20, 2)
    a, b = _log(tmp_path / "cast"), _log(tmp_path / "plain")
    assert [r["type"] for r in a].count("val") >= 3
    for x, y in zip(a, b, strict=True):  # every training and validation loss, bitwise
        key = "loss" if x["type"] == "train" else "val_loss"
        assert x[key] == y[key] and x["step"] == y["step"]
    file = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    wa, wb = (load_file(str(tmp_path / k / "final" / file)) for k in ("cast", "plain"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.float32 for t in wa.values())  # the export saw the fp32 weights


def test_fp32_after_bf16_in_one_process_and_no_casts(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A notebook fine-tunes in bf16, then in fp32: accelerate's per-process state used to refuse the second."""
    model = str(tiny_model_dirs["llama"])
    assert _run(model, tmp_path / "bf16", max_steps=1)["weight_casts"] is not None
    fp32 = _run(model, tmp_path / "fp32", mixed_precision="no", max_steps=1)
    assert fp32["weight_casts"] is None and fp32["provenance"]["config"]["mixed_precision"] == "no"
    assert _run(model, tmp_path / "bf16-again", max_steps=1)["weight_casts"]["dtype"] == "bfloat16"
