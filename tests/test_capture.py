"""The attention kernel and the capture context against explicit softmax and plain forward passes."""

from __future__ import annotations

import pytest
import torch

from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.capture import (
    ATTN_IMPLEMENTATION,
    RowMask,
    attention_expectations,
    body,
    capturing,
    expected_score,
    row_mask,
)

from helpers import make_tiny_model


def _explicit(q, k, values, allowed, scale):  # type: ignore[no-untyped-def]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    return [probs @ v.double() for v in values], torch.logsumexp(scores, -1), probs


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_expectations_match_explicit_softmax_with_padding_and_window(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 21, 8
    q, k = torch.randn(B, H, T, D, generator=g) * 2, torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    allowed[1, :, :, 15:] = False  # right padding in document 1
    allowed &= (torch.arange(T)[None, :] > torch.arange(T)[:, None] - 6)  # window 6
    mask = row_mask(allowed, T, T, None, q.device)
    (out, pk), lse = attention_expectations(q, k, [v, k], mask, 0.4, backend, chunk=8)
    (ref_out, ref_pk), ref_lse, probs = _explicit(q, k, [v, k], allowed, 0.4)
    rows = slice(0, 15)  # rows of document 1 past 15 are padding
    torch.testing.assert_close(out[..., rows, :].double(), ref_out[..., rows, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[..., rows].double(), ref_lse[..., rows], atol=1e-5, rtol=0)
    entropy = lse - expected_score(q, pk, 0.4)
    ref_entropy = -(probs * torch.where(probs > 0, probs.log(), 0.0)).sum(-1)
    torch.testing.assert_close(entropy[..., rows].double(), ref_entropy[..., rows], atol=1e-5, rtol=0)


def test_row_mask_rebuilds_sliding_window_when_no_mask_arrives() -> None:
    mask = row_mask(None, 10, 10, 4, torch.device("cpu"))
    assert mask.additive is not None and not mask.causal
    allowed = mask.additive[0, 0] == 0
    expected = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-4)
    assert torch.equal(allowed, expected)
    assert row_mask(None, 10, 10, 16, torch.device("cpu")) == RowMask(None, causal=True)
    float_mask = torch.zeros(1, 1, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), -1e30)
    assert torch.equal(row_mask(float_mask, 3, 3, None, torch.device("cpu")).additive == 0,
                       torch.ones(1, 1, 3, 3, dtype=torch.bool).tril())


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_attention(self, call) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("attn", call.layer))

    def on_neurons(self, layer, acts) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("neurons", layer))

    def on_hidden(self, layer, hidden) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("hidden", layer))


def test_capture_keeps_outputs_and_restores_model(family: str) -> None:
    model = make_tiny_model(family)
    model.train()  # as during fine-tuning
    adapter = ArchitectureAdapter.for_model(model)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 12:] = 0
    with torch.no_grad():
        model.eval()
        ref = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        model.train()
        rec = _Recorder()
        with capturing(model, adapter, rec):
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            assert not model.training  # statistics without dropout
            out = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref)  # the output path is plain SDPA
    assert sorted(rec.calls) == sorted((kind, i) for i in range(adapter.n_layers)
                                       for kind in ("attn", "neurons", "hidden"))
    assert model.config._attn_implementation == "sdpa" and model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_restores_after_an_error() -> None:
    model = make_tiny_model("llama")
    adapter = ArchitectureAdapter.for_model(model)

    class Boom(_Recorder):
        def on_attention(self, call) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), capturing(model, adapter, Boom()):
        body(model)(input_ids=torch.tensor([[1, 2, 3]]))
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
