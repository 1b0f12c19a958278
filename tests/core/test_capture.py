"""The paired attention pass and the lockstep capture against explicit softmax and plain forward passes."""

from __future__ import annotations

import logging

import pytest
import torch

from sumcircuit import capture, kernels
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.capture import (
    ATTN_IMPLEMENTATION,
    AttentionInputs,
    PairRows,
    RowMask,
    body,
    paired_attention,
    row_mask,
    run_pair,
    tile_rows,
)
from sumcircuit.kernels import KernelError

from helpers import ATTENTION_CASES, assert_matches_explicit, attention_case, make_tiny_model, random_attention_inputs


@pytest.mark.parametrize("kernel", ["compiled", "eager", "fused"])
@pytest.mark.parametrize("kind", ATTENTION_CASES)
def test_paired_attention_matches_explicit_softmax(kind: str, kernel: str) -> None:
    base, tuned, allowed, mask, rows = attention_case(kind, torch.device("cpu"))
    outputs = paired_attention(base, tuned, mask, rows_per_tile=5, kernel=kernel)  # type: ignore[arg-type]
    assert_matches_explicit(base, tuned, allowed, rows, *outputs)


@pytest.mark.parametrize("kernel", ["compiled", "eager", "fused"])
def test_paired_attention_of_a_model_with_itself_is_exactly_zero_kl(kernel: str) -> None:
    x = random_attention_inputs(torch.Generator().manual_seed(1), 1, 4, 4, 33, 33, 8, 0.35)
    out_b, out_t, rows = paired_attention(x, x, RowMask(None, causal=True), rows_per_tile=7,
                                          kernel=kernel)  # type: ignore[arg-type]
    assert torch.equal(out_b, out_t) and torch.equal(rows.entropy_base, rows.entropy_tuned)
    assert not rows.kl_base_tuned.any() and not rows.kl_tuned_base.any()


def test_auto_falls_back_to_the_tiles_when_the_fused_kernel_fails(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """On CUDA, auto means fused; a kernel that refuses the shape costs one warning, not the run."""
    monkeypatch.setattr(kernels, "_FUSED_FAILED", {})
    monkeypatch.setattr(capture, "attention_path",
                        lambda kernel, device: kernels.attention_path(kernel, torch.device("cuda")))

    def refuse(*args: object) -> None:
        raise KernelError("the fused attention kernel failed on cuda (No available kernel); use --kernels eager")

    monkeypatch.setattr(capture, "attention_lse", refuse)
    x, y = (random_attention_inputs(torch.Generator().manual_seed(s), 1, 4, 2, 16, 16, 8, 0.35) for s in (3, 4))
    mask = RowMask(None, causal=True)
    _, _, expected = paired_attention(x, y, mask, kernel="eager")
    with caplog.at_level(logging.WARNING, logger="sumcircuit.kernels"):
        for _ in range(2):
            _, _, got = paired_attention(x, y, mask, kernel="auto")
            torch.testing.assert_close(got.values, expected.values, atol=1e-6, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sumcircuit.kernels"]
    assert len(warnings) == 1 and "No available kernel" in warnings[0]
    with pytest.raises(KernelError, match="--kernels eager"):
        paired_attention(x, y, mask, kernel="fused")  # asked for by name: an error


@pytest.mark.parametrize("kernel", ["auto", "fused"])
def test_paired_attention_keeps_the_model_dtype_with_fp32_statistics(kernel: str) -> None:
    x = random_attention_inputs(torch.Generator().manual_seed(2), 1, 4, 2, 16, 16, 8, 0.35)
    half = AttentionInputs(x.query.bfloat16(), x.key.bfloat16(), x.value.bfloat16(), x.scale)
    out_b, _, rows = paired_attention(half, half, RowMask(None, causal=True), kernel=kernel)  # type: ignore[arg-type]
    assert out_b.dtype == torch.bfloat16 and rows.entropy_base.dtype == torch.float32


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
    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.hidden: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.model = model

    def on_attention(self, layer: int, rows: PairRows) -> None:
        if self.model is not None:  # the attention implementation is swapped only while capturing
            assert self.model.config._attn_implementation == ATTN_IMPLEMENTATION
        self.calls.append(("attn", layer))

    def on_neurons(self, layer: int, base: torch.Tensor, tuned: torch.Tensor) -> None:
        self.calls.append(("neurons", layer))

    def on_hidden(self, layer: int, base: torch.Tensor, tuned: torch.Tensor) -> None:
        self.calls.append(("hidden", layer))
        self.hidden[layer] = (base.clone(), tuned.clone())


def _hooks(*models: torch.nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules()]


def _plain_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return body(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]


def test_run_pair_keeps_both_models_outputs_and_restores_them(family: str) -> None:
    base, tuned = make_tiny_model(family, 0), make_tiny_model(family, 1)
    tuned.train()  # as during fine-tuning
    adapter = ArchitectureAdapter.for_model(base)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 12:] = 0
    tuned.eval()
    ref_b, ref_t = _plain_hidden(base, ids, mask), _plain_hidden(tuned, ids, mask)
    tuned.train()
    hooks = _hooks(base, tuned)  # transformers keeps its own output-recording hooks
    rec = _Recorder(base)
    with torch.no_grad():
        run_pair(base, tuned, adapter, rec, {"input_ids": ids, "attention_mask": mask}, rows_per_tile=4)
    # in layer order, each layer's attention before its neurons and block output
    assert rec.calls == [(kind, i) for i in range(adapter.n_layers) for kind in ("attn", "neurons", "hidden")]
    valid = mask.bool()
    for layer, (hb, ht) in rec.hidden.items():
        # the last layer's block output is before the final norm; hidden_states[-1] is after it
        if layer < adapter.n_layers - 1:
            torch.testing.assert_close(hb[valid], ref_b[layer][valid], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ht[valid], ref_t[layer][valid], atol=1e-5, rtol=1e-5)
    assert base.config._attn_implementation == "sdpa" and tuned.training and not base.training
    assert _hooks(base, tuned) == hooks


def test_run_pair_of_a_model_with_itself() -> None:
    model = make_tiny_model("llama")
    rec = _Recorder()
    with torch.no_grad():
        run_pair(model, model, ArchitectureAdapter.for_model(model), rec, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert len(rec.calls) == 9 and all(torch.equal(b, t) for b, t in rec.hidden.values())


def _runs_again(base: torch.nn.Module, tuned: torch.nn.Module) -> None:
    """Nothing of a failed run is left behind: the next one completes every layer."""
    rec = _Recorder()
    with torch.no_grad():
        run_pair(base, tuned, ArchitectureAdapter.for_model(base), rec, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert len(rec.calls) == 9


def test_an_error_in_the_sink_propagates_and_restores_the_models() -> None:
    base, tuned = make_tiny_model("llama", 0), make_tiny_model("llama", 1)

    class Boom(_Recorder):
        def on_attention(self, layer: int, rows: PairRows) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        run_pair(base, tuned, ArchitectureAdapter.for_model(base), Boom(), {"input_ids": torch.tensor([[1, 2, 3]])})
    assert base.config._attn_implementation == "sdpa" and tuned.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*base.modules(), *tuned.modules()])
    _runs_again(base, tuned)


def test_an_error_in_the_base_models_pass_reaches_the_caller() -> None:
    base, tuned = make_tiny_model("gpt2", 0), make_tiny_model("gpt2", 1)
    adapter = ArchitectureAdapter.for_model(base)

    def fail(*_args: object) -> None:
        raise ValueError("base broke at layer 1")

    handle = adapter.block(base, 1).register_forward_pre_hook(fail)
    try:
        with pytest.raises(ValueError, match="base broke at layer 1"), torch.no_grad():
            run_pair(base, tuned, adapter, _Recorder(), {"input_ids": torch.tensor([[1, 2, 3]])})
    finally:
        handle.remove()
    assert tuned.config._attn_implementation == "sdpa"
    _runs_again(base, tuned)



def test_tiles_are_sized_for_the_device() -> None:
    cpu = torch.empty(8, 9, 1024, 64)
    meta = torch.empty(8, 9, 1024, 64, device="meta")  # stands in for an accelerator
    assert tile_rows(cpu, 1024) == 16 and tile_rows(cpu[:1], 1024) == 128 and tile_rows(cpu, 1024, 7) == 7
    assert tile_rows(meta, 1024) == 256 * 2**20 // (8 * 9 * 1024 * 4)  # 910 rows: two tiles per layer
    assert tile_rows(torch.empty(1, 2, 8, 4, device="meta"), 8) >= 64
    # the accelerator path is the same code: shapes and dtypes through it on meta tensors
    x = AttentionInputs(meta.bfloat16(), torch.empty(8, 3, 1024, 64, device="meta", dtype=torch.bfloat16),
                        torch.empty(8, 3, 1024, 64, device="meta", dtype=torch.bfloat16), 0.125)
    out_b, out_t, rows = paired_attention(x, x, RowMask(None, causal=True))
    assert out_b.shape == (8, 1024, 9, 64) and out_b.dtype == torch.bfloat16
    assert rows.kl_base_tuned.shape == (8, 9, 1024) and rows.kl_base_tuned.dtype == torch.float32

