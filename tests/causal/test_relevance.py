"""RelP's propagation rules, each against its definition computed by hand, and the whole estimator against exact patching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import sumcircuit.causal.attribution as att
import sumcircuit.causal.patching as pat
from sumcircuit.causal.interventions import document_losses, encode_examples
from sumcircuit.causal.relevance import _frozen_norm, _identity_rule, _relp_attention, relevance_rules, straight_through
from sumcircuit.data import DataConfig
from sumcircuit.models import load_model

from helpers import CNNDM, perturbed


def _grad(module: nn.Module, hook, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    handle = module.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_()
        (module(x) * upstream).sum().backward()
    finally:
        handle.remove()
    assert x.grad is not None
    return x.grad


def test_straight_through_keeps_the_value_and_takes_the_linear_gradient() -> None:
    x = torch.randn(5, requires_grad=True)
    out = straight_through(torch.sin(x), 3 * x)
    assert torch.equal(out, torch.sin(x))
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), 3.0))  # type: ignore[arg-type]


def test_rms_norm_is_linear_with_its_scale_held() -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(_grad(norm, _frozen_norm, x, g), g * norm.weight * scale, atol=1e-5)


def test_layer_norm_keeps_the_centring_and_holds_sigma() -> None:
    torch.manual_seed(1)
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
        norm.bias.copy_(torch.randn(8))
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    gw = g * norm.weight / sigma
    expected = gw - gw.mean(-1, keepdim=True)  # (I - 11'/d) diag(w / sigma), symmetric in the centring
    assert torch.allclose(_grad(norm, _frozen_norm, x, g), expected, atol=1e-5)


def test_identity_rule_passes_act_over_input() -> None:
    x, g = torch.randn(4, 6), torch.randn(4, 6)
    silu = nn.SiLU()
    assert torch.allclose(_grad(silu, _identity_rule, x, g), g * silu(x) / x, atol=1e-6)


def test_attention_probabilities_are_constants_in_the_backward() -> None:
    torch.manual_seed(2)
    module = nn.Module()
    q, k, v = (torch.randn(1, 4, 5, 8, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2], v[:, :2]  # grouped-query: 4 query heads read 2 key/value heads
    out, _ = _relp_attention(module, q, k2, v2, None, scaling=0.3)
    reference = torch.softmax(q @ k2.repeat_interleave(2, 1).transpose(2, 3) * 0.3, -1) @ v2.repeat_interleave(2, 1)
    assert torch.allclose(out, reference.transpose(1, 2), atol=1e-6)
    out.sum().backward()
    assert q.grad is None and k.grad is None  # no relevance reaches the queries and keys
    assert v.grad is not None and torch.count_nonzero(v.grad[:, :2]) > 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_rules_change_the_backward_only_and_are_undone(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(str(tiny_model_dirs[family]))
    encoded = encode_examples(model.tokenizer, DataConfig(str(CNNDM), split="val", n_docs=2, max_tokens=48))[0]
    from sumcircuit.causal.interventions import batches

    _, batch = next(iter(batches(encoded, 2, int(model.tokenizer.pad_token_id), torch.device("cpu"))))
    plain = document_losses(model.model, batch)
    implementation = model.model.config._attn_implementation
    with relevance_rules(model.model, model.adapter):
        relp = document_losses(model.model, batch)
    torch.testing.assert_close(relp, plain, atol=1e-5, rtol=1e-5)  # the forward is the model's
    assert model.model.config._attn_implementation == implementation
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.modules())
    assert torch.equal(document_losses(model.model, batch), plain)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_relp_estimates_follow_exact_patching(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    base = load_model(str(tiny_model_dirs[family]))
    tuned = perturbed(base, 0.05)
    encoded = encode_examples(base.tokenizer, DataConfig(str(CNNDM), split="val", n_docs=4, max_tokens=64))[0]
    for granularity in ("layer", "head"):
        cfg = att.AttributionConfig(granularity=granularity, directions=("denoise",), method="relp", n_bootstrap=20)
        rows, _ = att.attribution_rows(att.attribution_losses(base, tuned, encoded, cfg), cfg)
        pcfg = pat.PatchConfig(granularity="head" if granularity == "head" else "layer", directions=("denoise",),
                               include_all=False, n_bootstrap=20)
        exact = {r["component"]: r["loss_patched"]
                 for r in pat.summarize_patching(pat.patch_losses(base, tuned, encoded, pcfg), pcfg)["rows"]}
        estimate = {r["component"]: r["loss_patched"] for r in rows}
        names = sorted(exact)
        r = np.corrcoef([estimate[n] for n in names], [exact[n] for n in names])[0, 1]
        assert r > 0.85, (granularity, r)
