"""The training step's fast paths against the plain computation they replace.

The LM head only at labelled positions against full logits (loss and every
gradient), and fused AdamW against torch's per-tensor loop.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from sumcircuit.data import DataConfig, collate, load_examples
from sumcircuit.training.batches import IGNORE_INDEX, OBJECTIVES, lm_loss_terms, loss_positions, summary_loss_terms
from sumcircuit.training.config import FinetuneConfig
from sumcircuit.training.optim import can_fuse, make_optimizer

from helpers import CNNDM, make_tiny_model


def _batch(tokenizer: PreTrainedTokenizerFast, objective: str = "summary") -> dict[str, torch.Tensor]:
    data = DataConfig(str(CNNDM / "train.jsonl.gz"), n_docs=3, max_tokens=256)
    examples = load_examples(data)
    encoded = OBJECTIVES[objective](tokenizer, examples.examples, data, examples.source)
    # rows of different lengths (padding: their labelled positions differ), and a row with no labelled token
    encoded[1] = dataclasses.replace(encoded[1], input_ids=encoded[1].input_ids[:-30], labels=encoded[1].labels[:-30])
    encoded[2] = dataclasses.replace(encoded[2], labels=[IGNORE_INDEX] * len(encoded[2].labels))
    batch = collate(encoded, tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def test_loss_positions_are_those_labelled_in_some_row() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]])
    assert loss_positions(labels).tolist() == [1, 2, 3]  # position t predicts label t+1
    assert loss_positions(torch.full((2, 4), IGNORE_INDEX)).tolist() == []


@pytest.mark.parametrize("objective", ["summary", "document"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_lm_head_at_labelled_positions_gives_the_full_logits_loss_and_gradients(
        tiny_tokenizer: PreTrainedTokenizerFast, family: str, objective: str) -> None:
    batch = _batch(tiny_tokenizer, objective)
    fast_model = make_tiny_model(family)
    fast_model.train()
    plain_model = copy.deepcopy(fast_model)
    seen: list[int] = []
    head = fast_model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    torch.manual_seed(0)
    fast, fast_count = lm_loss_terms(fast_model, batch)
    handle.remove()
    torch.manual_seed(0)  # the same dropout masks
    logits = plain_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).logits
    plain, plain_count = summary_loss_terms(logits, batch["labels"])
    assert int(fast_count) == int(plain_count) > 0
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    (fast / fast_count).backward()
    (plain / plain_count).backward()
    for (name, p), q in zip(fast_model.named_parameters(), plain_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    width = batch["input_ids"].shape[1]
    assert seen == [len(loss_positions(batch["labels"]))]
    if objective == "summary":
        assert seen[0] < width - 1  # the head did not run at every position


def test_fused_adamw_matches_the_per_tensor_loop() -> None:
    cfg = FinetuneConfig(method="full", lr=1e-2, weight_decay=0.1).resolved()
    fused_model = make_tiny_model("llama")
    loop_model = copy.deepcopy(fused_model)
    fused, loop = make_optimizer(fused_model, cfg), make_optimizer(loop_model, cfg, fused=False)
    assert can_fuse([p for p in fused_model.parameters()])
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    ids = torch.randint(0, fused_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next(fused_model.parameters()), next(make_tiny_model("llama").parameters()))  # it moved
