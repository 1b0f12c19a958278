"""q/v-exact LoRA: parameter counts, untouched k, identical start, exact layer matching."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.errors import ModelError
from sumcircuit.lora import (
    SplitQKV,
    count_params,
    expected_lora_params,
    inject_lora,
    lora_targets,
    matched_layers,
    merge_lora,
    verify_matched,
)
from sumcircuit.training.optim import enable_gradient_checkpointing

from helpers import make_tiny_model


def _ids(vocab: int = 384, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2_small_shape() -> GPT2LMHeadModel:
    """GPT-2 small's shape (12 layers, d 768, 12 heads); small vocab and context to save memory."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=64, n_positions=32)).eval()


@pytest.mark.parametrize("layers, expected", [(list(range(12)), 294_912), ([2, 3, 5], 73_728)])
def test_gpt2_small_trainable_params_exact(gpt2_small_shape: GPT2LMHeadModel, layers: list[int],
                                           expected: int) -> None:
    model = copy.deepcopy(gpt2_small_shape)
    adapter = ArchitectureAdapter.for_model(model)
    peft_model = inject_lora(model, adapter, layers, rank=8)
    trainable, _ = count_params(peft_model)
    assert trainable == expected == len(layers) * 2 * 8 * (768 + 768) == len(layers) * 24_576
    assert expected_lora_params(adapter, len(layers), 8) == expected
    if len(layers) == 3:  # the paper's "75% fewer" than LoRA on all 12 layers
        assert 1 - expected / 294_912 == pytest.approx(0.75)


def test_llama_gqa_param_formula() -> None:
    model = make_tiny_model("llama")  # d 48, 6 query heads, 2 kv heads: head_dim 8, kv_dim 16
    adapter = ArchitectureAdapter.for_model(model)
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert (q.in_features, q.out_features, v.in_features, v.out_features) == (48, 48, 48, 16)
    peft_model = inject_lora(model, adapter, [0, 2], rank=4)
    per_layer = 4 * (48 + 48) + 4 * (48 + 16)
    assert count_params(peft_model)[0] == 2 * per_layer == 1280 == expected_lora_params(adapter, 2, 4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_outputs_before_training_bitwise_identical(family: str) -> None:
    original = make_tiny_model(family)
    model = copy.deepcopy(original)
    peft_model = inject_lora(model, ArchitectureAdapter.for_model(model), [0, 2], rank=8, dropout=0.05)
    peft_model.eval()
    ids = _ids()
    with torch.no_grad():
        # bitwise (torch.equal): B is zero at init and the split GEMMs reduce over the same inputs
        assert torch.equal(original(ids).logits, peft_model(ids).logits)


def _train_a_few_steps(peft_model: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = _ids(seed=step)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def test_gpt2_k_block_unchanged_q_v_changed() -> None:
    original = make_tiny_model("gpt2")  # d 32: c_attn is Conv1D [32, 96] = [q | k | v]
    model = copy.deepcopy(original)
    adapter = ArchitectureAdapter.for_model(model)
    peft_model = inject_lora(model, adapter, [1, 2], rank=4)
    _train_a_few_steps(peft_model)
    d = 32
    for layer in (1, 2):
        split = model.transformer.h[layer].attn.c_attn
        assert isinstance(split, SplitQKV)
        before, after = original.transformer.h[layer].attn.c_attn.weight, split.weight  # effective, fused
        assert torch.equal(after[:, d:2 * d], before[:, d:2 * d])  # k: bitwise unchanged
        assert not torch.allclose(after[:, :d], before[:, :d])  # q changed
        assert not torch.allclose(after[:, 2 * d:], before[:, 2 * d:])  # v changed
        assert torch.equal(split.bias, original.transformer.h[layer].attn.c_attn.bias)  # bias not trained
    assert not isinstance(model.transformer.h[0].attn.c_attn, SplitQKV)  # unadapted layers untouched
    merged = merge_lora(peft_model, adapter)
    for layer in (1, 2):
        fused = merged.transformer.h[layer].attn.c_attn
        assert isinstance(fused, Conv1D)
        assert torch.equal(fused.weight[:, d:2 * d], original.transformer.h[layer].attn.c_attn.weight[:, d:2 * d])


def test_merge_gives_plain_model_with_same_outputs() -> None:
    model = make_tiny_model("gpt2")
    adapter = ArchitectureAdapter.for_model(model)
    peft_model = inject_lora(model, adapter, [0, 1, 2], rank=4)
    _train_a_few_steps(peft_model)
    ids = _ids(seed=9)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged_model = merge_lora(peft_model, adapter)
        merged = merged_model(ids).logits
    assert type(merged_model) is GPT2LMHeadModel
    assert all(isinstance(b.attn.c_attn, Conv1D) for b in merged_model.transformer.h)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)  # merging reorders float sums


@pytest.mark.parametrize("family, pattern", [("gpt2", "h"), ("llama", "layers")])
def test_layers_to_transform_matched_exactly(family: str, pattern: str) -> None:
    model = make_tiny_model(family)
    adapter = ArchitectureAdapter.for_model(model)
    targets = lora_targets(adapter)
    assert targets.layers_pattern == pattern
    peft_model = inject_lora(model, adapter, [0, 2], rank=2)
    assert matched_layers(peft_model, adapter) == {0: sorted(targets.modules), 2: sorted(targets.modules)}
    assert peft_model.peft_config["default"].layers_to_transform == [0, 2]
    with pytest.raises(ModelError, match="but .* was asked"):
        verify_matched(peft_model, adapter, [0, 1, 2])


def test_impossible_layer_requests_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("llama")
    adapter = ArchitectureAdapter.for_model(model)
    with pytest.raises(ModelError, match=r"layer 40 out of range: the model has 3 layers \(valid: 0..2\)"):
        inject_lora(copy.deepcopy(model), adapter, [1, 40])
    with pytest.raises(ModelError, match="no layers"):
        inject_lora(copy.deepcopy(model), adapter, [])
    # a layers pattern that matches nothing (e.g. a wrong spec row): PEFT finds no module -> our error
    import sumcircuit.lora as lora

    wrong = lora.LoraTargets(("self_attn.q_proj", "self_attn.v_proj"), "blocks", False, False)
    monkeypatch.setattr(lora, "lora_targets", lambda adapter: wrong)
    with pytest.raises(ModelError, match="matched no module"):
        inject_lora(copy.deepcopy(model), adapter, [1])


def _block_output_requires_grad(model: torch.nn.Module, adapter: ArchitectureAdapter) -> list[bool]:
    seen: list[bool] = []
    inner = model.get_base_model()
    hooks = [adapter.block(inner, i).register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
        for i in range(adapter.n_layers)]
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_gradients_below_lowest_adapted_layer(checkpointing: bool) -> None:
    model = make_tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter.for_model(model)
    peft_model = inject_lora(model, adapter, [2, 3], rank=2)
    if checkpointing:
        enable_gradient_checkpointing(peft_model)
        assert peft_model.get_base_model().is_activation_checkpointing
    peft_model.train()
    # layers 0 and 1 produce outputs that need no gradient: autograd never goes below layer 2
    assert _block_output_requires_grad(peft_model, adapter) == [False, False, True, True]


def test_default_checkpointing_would_backprop_everywhere() -> None:
    """The counterfactual our enable_gradient_checkpointing avoids (transformers' default hook)."""
    model = make_tiny_model("llama", num_hidden_layers=4)
    adapter = ArchitectureAdapter.for_model(model)
    peft_model = inject_lora(model, adapter, [2, 3], rank=2)
    peft_model.get_base_model().activation_checkpointing_enable()
    peft_model.train()
    assert _block_output_requires_grad(peft_model, adapter)[:2] == [True, True]


# ---------------------------------------------------------------- head-level LoRA

def _q_v_weights(model: torch.nn.Module, adapter: ArchitectureAdapter, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective q and v weights of ``layer`` as [out_features, d] (Conv1D transposed)."""
    block = adapter.block(model, layer)
    if adapter.family == "gpt2":
        fused = block.attn.c_attn.weight.T  # SplitQKV gives the effective fused weight
        d = fused.shape[1]
        return fused[:d], fused[2 * d:]
    return _effective(block.self_attn.q_proj), _effective(block.self_attn.v_proj)


def _effective(module: torch.nn.Module) -> torch.Tensor:
    """The weight a PEFT LoRA layer computes with (base + delta), or a plain module's weight."""
    if not hasattr(module, "base_layer"):
        return module.weight
    return module.base_layer.weight + module.get_delta_weight("default")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_head_lora_touches_only_the_chosen_heads(family: str) -> None:
    from sumcircuit.lora import expected_head_lora_params, head_rows, restrict_lora_to_heads
    from sumcircuit.sites import Site

    original = make_tiny_model(family)
    model = copy.deepcopy(original)
    adapter = ArchitectureAdapter.for_model(model)
    heads = [Site(1, "attn_head", 1), Site(2, "attn_head", 0), Site(2, "attn_head", 3)]
    peft_model = inject_lora(model, adapter, [1, 2], rank=4)
    trainable = restrict_lora_to_heads(peft_model, adapter, heads)
    hd, d = adapter.head_dim, adapter.hidden_size
    group = adapter.n_heads // adapter.n_kv_heads
    # independent count: per layer A of q and v (4 x d each) + 4 per chosen q row + 4 per v row of the KV heads
    per_layer = {1: [1], 2: [0, 3]}
    by_hand = sum(4 * 2 * d + 4 * hd * (len(hs) + len({h // group for h in hs})) for hs in per_layer.values())
    assert trainable == by_hand == expected_head_lora_params(adapter, heads, 4)
    if family == "llama":  # 6 query heads on 2 KV heads: L2 heads 0 and 3 read KV heads 0 and 1
        assert head_rows(adapter, [0, 3])[1] == list(range(0, 2 * hd))
        assert by_hand == 4 * 2 * 48 * 2 + 4 * 8 * (1 + 1) + 4 * 8 * (2 + 2)
    ids = _ids()
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, peft_model(ids).logits)  # bitwise at the start
    _train_a_few_steps(peft_model, steps=4)
    with torch.no_grad():
        for layer, chosen in per_layer.items():
            q_rows, v_rows = head_rows(adapter, chosen)
            q0, v0 = _q_v_weights(original, adapter, layer)
            q1, v1 = _q_v_weights(model, adapter, layer)
            keep_q = [r for r in range(q0.shape[0]) if r not in q_rows]
            keep_v = [r for r in range(v0.shape[0]) if r not in v_rows]
            assert torch.equal(q1[keep_q], q0[keep_q]) and torch.equal(v1[keep_v], v0[keep_v])  # bitwise
            assert not torch.allclose(q1[q_rows], q0[q_rows]) and not torch.allclose(v1[v_rows], v0[v_rows])
        q0, v0 = _q_v_weights(original, adapter, 0)  # a layer without chosen heads
        q1, v1 = _q_v_weights(model, adapter, 0)
        assert torch.equal(q0, q1) and torch.equal(v0, v1)
    merged = merge_lora(peft_model, adapter)
    for layer, chosen in per_layer.items():
        q_rows, _ = head_rows(adapter, chosen)
        q0, _ = _q_v_weights(original, adapter, layer)
        q1, _ = _q_v_weights(merged, adapter, layer)
        keep = [r for r in range(q0.shape[0]) if r not in q_rows]
        assert torch.equal(q1[keep], q0[keep])  # merged: base + exact zero rows


def test_head_rows_refuse_bad_heads() -> None:
    from sumcircuit.lora import head_rows

    adapter = ArchitectureAdapter.for_model(make_tiny_model("llama"))
    with pytest.raises(ModelError, match="head 6 out of range"):
        head_rows(adapter, [6])
