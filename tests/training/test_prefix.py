"""The frozen-prefix cache against running every layer.

Validation batches fed from the cache give bitwise the same losses without
running the frozen layers; training rows computed one document at a time give
the padded batch's loss and LoRA gradients to float rounding; a run of several
epochs uses it, resumes bitwise, and ends where the uncached run ends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

import sumcircuit as sc
from sumcircuit.adapters import ArchitectureAdapter, spec_for_config
from sumcircuit.data import DataConfig, collate, encode_all, load_examples
from sumcircuit.errors import ModelError
from sumcircuit.lora import inject_lora
from sumcircuit.training import FinetuneConfig
from sumcircuit.training.batches import evaluate_loss, lm_loss_terms
from sumcircuit.training.prefix import (
    PrefixCache,
    document_states,
    frozen_prefix,
    make_prefix_cache,
    prefix_dropout,
)

from helpers import CNNDM, make_tiny_model

TRAIN = str(CNNDM / "train.jsonl.gz")
CPU = torch.device("cpu")


def _encoded(tokenizer: PreTrainedTokenizerFast, n: int = 5, max_tokens: int = 96) -> list:
    data = DataConfig(TRAIN, n_docs=n, max_tokens=max_tokens)
    return encode_all(tokenizer, load_examples(data).examples, data, need_summary_tokens=True)


def _spec_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ArchitectureAdapter.for_model(base).layers(base)


def _lora_on_last_layer(family: str, **overrides: object) -> torch.nn.Module:
    """LoRA on layer 2 of 3, its B nonzero (so that the adapter changes something)."""
    model = make_tiny_model(family, **overrides)
    peft_model = inject_lora(model, ArchitectureAdapter.for_model(model), [2], rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def _mlp_calls(layer: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    layer.get_submodule("mlp").register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_frozen_prefix_and_dropout_rules(family: str) -> None:
    model = _lora_on_last_layer(family)
    layers = _spec_layers(model)
    assert frozen_prefix(model, layers) == 2
    model.get_input_embeddings().weight.requires_grad_(True)  # the embeddings train: nothing below is frozen
    assert frozen_prefix(model, layers) == 0
    full = make_tiny_model(family)
    assert frozen_prefix(full, _spec_layers(full)) == 0  # every parameter trains
    spec = spec_for_config(model.config)
    assert not prefix_dropout(model.config, spec.dropout_fields, layers[:2])
    field = spec.dropout_fields[0]
    assert prefix_dropout(make_tiny_model(family, **{field: 0.1}).config, spec.dropout_fields, layers[:2])


def test_validation_from_the_cache_is_bitwise_the_same(family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = _lora_on_last_layer(family)
    layers = _spec_layers(model)
    encoded = _encoded(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    plain = evaluate_loss(model, encoded, pad, 2, CPU)
    cache = PrefixCache(layers, 2, 2**30)
    calls = _mlp_calls(layers[0])
    first = evaluate_loss(model, encoded, pad, 2, CPU, prefix=cache)
    assert len(calls) == 3 and cache.misses == 3 and cache.hits == 0  # 5 documents: batches of 2, 2, 1
    second = evaluate_loss(model, encoded, pad, 2, CPU, prefix=cache)
    assert len(calls) == 3 and cache.hits == 3  # layer 0 did not run again
    assert plain == first == second  # bitwise
    with torch.no_grad():  # a change above the prefix shows (the cache holds layer 2's input, not its output)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    changed = evaluate_loss(model, encoded, pad, 2, CPU, prefix=cache)
    assert changed == evaluate_loss(model, encoded, pad, 2, CPU) != plain
    assert all("forward" not in layer.__dict__ for layer in layers)  # the identity stand-ins are gone


def test_a_small_budget_keeps_what_fits(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = _lora_on_last_layer("llama")
    encoded = _encoded(tiny_tokenizer)
    cache = PrefixCache(_spec_layers(model), 2, 1)  # one byte: nothing fits, every batch recomputed
    pad = tiny_tokenizer.pad_token_id
    assert evaluate_loss(model, encoded, pad, 2, CPU, prefix=cache) == evaluate_loss(model, encoded, pad, 2, CPU)
    assert cache.store == {} and cache.used_bytes == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_training_rows_one_document_at_a_time_match_the_padded_batch(
        family: str, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = _lora_on_last_layer(family)
    model.train()
    reference = copy.deepcopy(model)
    encoded = _encoded(tiny_tokenizer, n=3)
    encoded[1] = dataclasses.replace(encoded[1], input_ids=encoded[1].input_ids[:-30], labels=encoded[1].labels[:-30])
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding
    cache = PrefixCache(_spec_layers(model), 2, 2**30)
    calls = _mlp_calls(_spec_layers(model)[2])
    hidden = document_states(cache, model, batch)
    assert not calls  # the capture stops at layer 2's input
    with cache.feed(hidden):
        fast, count = lm_loss_terms(model, batch)
        fast.backward()
    plain, plain_count = lm_loss_terms(reference, batch)
    plain.backward()
    assert int(count) == int(plain_count)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    again = document_states(cache, model, batch)
    assert torch.equal(again, hidden) and cache.hits == 3 and cache.misses == 3


def test_make_prefix_cache_switches_training_rows_on_only_where_documents_repeat() -> None:
    model = _lora_on_last_layer("gpt2")
    layers, spec = _spec_layers(model), spec_for_config(model.config)
    cache, rows = make_prefix_cache(model, layers, model.config, spec.dropout_fields, 1.0, data_repeat=True)
    assert cache is not None and cache.start == 2 and rows
    assert not make_prefix_cache(model, layers, model.config, spec.dropout_fields, 1.0, data_repeat=False)[1]
    assert make_prefix_cache(model, layers, model.config, spec.dropout_fields, 0.0, data_repeat=True) == (None, False)
    dropout = _lora_on_last_layer("gpt2", resid_pdrop=0.1)
    cache, rows = make_prefix_cache(dropout, _spec_layers(dropout), dropout.config, spec.dropout_fields, 1.0,
                                    data_repeat=True)
    assert cache is not None and not rows  # validation (eval mode) still cached; training rows not


def _run(model: str, out: Path, **kw: object) -> dict:
    cfg = FinetuneConfig(**{**dict(method="targeted-lora", layers=(2,), batch_size=2, grad_accum=1, epochs=3.0,
                                   eval_every=2, lr=1e-2, val_fraction=0.25, keep_checkpoints=10, final="last",
                                   lora_dropout=0.0), **kw})  # type: ignore[arg-type]
    return sc.finetune(model, DataConfig(TRAIN, n_docs=8, max_tokens=64), cfg, runtime=sc.Runtime(progress=False),
                       out=out).summary


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_run_over_epochs_uses_the_cache_and_resumes_bitwise(tiny_model_dirs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    model = str(tiny_model_dirs["llama"])
    cached = _run(model, tmp_path / "cached")
    plain = _run(model, tmp_path / "plain", prefix_cache_gb=0.0)
    info = cached["prefix_cache"]
    assert info["start_layer"] == 2 and info["training_rows"]
    assert info["entries"] == 6 + 1  # 6 training documents, 1 validation batch (2 documents)
    assert plain["prefix_cache"] is None and cached["steps"] == plain["steps"] == 9
    # 6 documents x 3 epochs, 2 of them the first time; 1 validation batch at steps 0, 2, ..., 8 and the last
    assert info["misses"] == 6 + 1 and info["hits"] == 12 + (len(cached["val_curve"]) - 1)
    a, b = _log(tmp_path / "cached"), _log(tmp_path / "plain")
    assert a[0]["val_loss"] == b[0]["val_loss"]  # the same weights: validation is bitwise the same
    for x, y in zip(a, b, strict=True):
        key = "loss" if x["type"] == "train" else "val_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-4)
    # resume from step 4 with the cache rebuilt from nothing: bitwise the uninterrupted cached run
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    step = tmp_path / "cached" / "checkpoints" / "step-00000004"
    shutil.copytree(step, tmp_path / "b" / "checkpoints" / step.name)
    shutil.copy(tmp_path / "cached" / ".sumcircuit.json", tmp_path / "b")
    resumed = _run(model, tmp_path / "b")
    assert resumed["resumed_from_steps"] == [4]
    wa = load_file(str(tmp_path / "cached" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_prefix_cache_gb(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sumcircuit.cli import main

    argv = ["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", TRAIN, "--n-docs", "8", "--max-tokens", "64",
            "--method", "targeted-lora", "--layers", "1,2", "--batch-size", "2", "--epochs", "2", "--eval-every", "2",
            "--lr", "1e-2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "on")]) == 0
    assert main([*argv, "--prefix-cache-gb", "0", "--out", str(tmp_path / "off")]) == 0
    on, off = (json.loads((tmp_path / k / "train_summary.json").read_text()) for k in ("on", "off"))
    assert off["prefix_cache"] is None and off["provenance"]["config"]["prefix_cache_gb"] == 0.0
    assert on["prefix_cache"]["start_layer"] == 1 and on["prefix_cache"]["training_rows"]  # 2 epochs: rows repeat
    assert on["prefix_cache"]["hits"] > 0
    assert on["val_curve"][0] == off["val_curve"][0]  # the same start: validation bitwise the same
    assert on["best_val_loss"] == pytest.approx(off["best_val_loss"], rel=1e-5)


def test_layers_that_return_tuples_are_refused_in_one_line(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """feed()'s stand-ins return a tensor: a layer returning a tuple (an older transformers) is refused at the
    first capture, before anything is fed."""
    model = _lora_on_last_layer("llama")
    layers = _spec_layers(model)
    real = layers[1].forward
    layers[1].forward = lambda *a, **k: (real(*a, **k),)
    cache = PrefixCache(layers, 2, 2**30)
    encoded = _encoded(tiny_tokenizer, n=2)
    with pytest.raises(ModelError, match="layer 1 returns tuple.*--prefix-cache-gb 0"):
        evaluate_loss(model, encoded, tiny_tokenizer.pad_token_id, 2, CPU, prefix=cache)
    assert cache.store == {}
