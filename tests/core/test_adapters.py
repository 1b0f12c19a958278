"""The adapter table finds the right modules and sizes for each family."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sumcircuit.adapters import ArchitectureAdapter, FusedQKV, SeparateQKV, supported_model_types
from sumcircuit.errors import ModelError

from helpers import make_tiny_model

EXPECTED = {  # family: (layers, heads, kv heads, head dim, hidden, neurons)
    "gpt2": (3, 4, 4, 8, 32, 128),
    "llama": (3, 6, 2, 8, 48, 96),
    "gemma3": (3, 4, 2, 8, 32, 64),
}


def test_sizes_and_modules(family: str) -> None:
    model = make_tiny_model(family)
    ad = ArchitectureAdapter.for_model(model)
    assert ad.family == family
    assert (ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.head_dim, ad.hidden_size,
            ad.n_neurons) == EXPECTED[family]
    for i in range(ad.n_layers):
        out_proj = ad.attention_output(model, i)
        # the output projection's input is heads x head_dim wide
        width = out_proj.weight.shape[0] if family == "gpt2" else out_proj.weight.shape[1]
        assert width == ad.n_heads * ad.head_dim
        down = ad.mlp_output(model, i)
        n_in = down.weight.shape[0] if family == "gpt2" else down.weight.shape[1]
        assert n_in == ad.n_neurons
        assert ad.block(model, i) is ad.layers(model)[i]
        assert ad.attention(model, i) is ad.block(model, i).get_submodule(ad.spec.attention)


def test_qkv_modules_match_head_counts(family: str) -> None:
    model = make_tiny_model(family)
    ad = ArchitectureAdapter.for_model(model)
    mods = ad.qkv_modules(model, 1)
    if isinstance(ad.spec.qkv, FusedQKV):
        # Conv1D weight is [in, out]; out = q|k|v
        assert mods["qkv"].weight.shape == (ad.hidden_size, 3 * ad.n_heads * ad.head_dim)
    else:
        assert isinstance(ad.spec.qkv, SeparateQKV)
        assert mods["q"].weight.shape[0] == ad.n_heads * ad.head_dim
        assert mods["k"].weight.shape[0] == ad.n_kv_heads * ad.head_dim
        assert mods["v"].weight.shape[0] == ad.n_kv_heads * ad.head_dim


def test_sliding_window_layers() -> None:
    gemma = ArchitectureAdapter.for_model(make_tiny_model("gemma3"))
    assert [gemma.sliding_window(i) for i in range(3)] == [8, 8, None]
    llama = ArchitectureAdapter.for_model(make_tiny_model("llama"))
    assert [llama.sliding_window(i) for i in range(3)] == [None, None, None]


def test_layer_out_of_range_names_range() -> None:
    ad = ArchitectureAdapter.for_model(make_tiny_model("llama"))
    with pytest.raises(ModelError, match=r"0\.\.2"):
        ad.attention(make_tiny_model("llama"), 3)


def test_unsupported_architecture_lists_supported() -> None:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=50))
    with pytest.raises(ModelError) as err:
        ArchitectureAdapter.for_model(model)
    assert "bert" in str(err.value)
    for mt in ("gpt2", "llama", "gemma3_text"):
        assert mt in str(err.value)
    assert set(supported_model_types()) >= {"gpt2", "llama", "qwen2", "mistral", "gemma3_text"}


def test_gpt2_small_shape() -> None:
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=100, n_positions=64)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    ad = ArchitectureAdapter.for_model(model)
    assert (ad.n_layers, ad.n_heads, ad.head_dim, ad.n_neurons) == (12, 12, 64, 3072)
