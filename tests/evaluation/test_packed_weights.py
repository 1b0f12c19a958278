"""Decoding through oneDNN-packed weights: the plain layers' outputs and texts, the parameters untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sumcircuit.data import Example, encode
from sumcircuit.evaluation import GenerationConfig, generate_summaries
from sumcircuit.evaluation.packed_weights import available, packed_linears
from sumcircuit.models import load_model

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN (mkldnn) linear")

DOCS = ["The cat sat on the mat and looked at the birds outside.",
        "Prices rose again in March, the third monthly rise in a row, officials said.",
        "A storm closed schools across the region on Tuesday."]


def _linears(model: nn.Module) -> list[nn.Module]:
    head = model.get_output_embeddings()  # type: ignore[operator]
    return [m for m in model.modules() if type(m) in (nn.Linear, Conv1D) and m is not head]


def _snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def _untouched(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> bool:
    """The same storage, bitwise the same values, and every module's own forward."""
    return (all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())
            and all("forward" not in vars(m) for m in model.modules()))


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma3"])
def test_packed_forward_matches_plain_and_leaves_the_parameters_alone(
        fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(str(tiny_model_dirs[fam])).model.eval()
    before = _snapshot(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    linears = _linears(model)
    with torch.inference_mode():
        plain = model(ids).logits
        with packed_linears(model) as n:
            assert n == len(linears) > 0  # GPT-2's Conv1D included; the head is not
            assert all("forward" in vars(m) for m in linears)
            packed = model(ids).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)
    assert _untouched(model, before)


def test_forwards_come_back_after_an_error_and_nothing_packs_under_autograd(
        tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(str(tiny_model_dirs["llama"])).model
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode(), packed_linears(model):
        raise RuntimeError("boom")
    assert _untouched(model, before)
    with packed_linears(model) as n:  # gradients on: the packed op has no backward
        assert n == 0
    with torch.inference_mode(), packed_linears(model, enabled=False) as n:
        assert n == 0


def test_only_exact_fp32_linears_are_packed() -> None:
    class Scaled(nn.Linear):  # a subclass may compute otherwise: it keeps its forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8), nn.Linear(8, 8).to(torch.bfloat16), Conv1D(8, 8))
    with torch.inference_mode(), packed_linears(model) as n:
        assert n == 2 and "forward" in vars(model[0]) and "forward" in vars(model[3])


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma3"])
def test_generation_decodes_through_packed_weights_with_the_plain_texts(
        fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_model_dirs[fam]))
    prompts = [encode(loaded.tokenizer, Example(f"d{i}", d, ("x",), "test"), max_tokens=128, with_summary=False)
               for i, d in enumerate(DOCS)]
    routed: list[bool] = []
    probe = _linears(loaded.model)[0]
    handle = probe.register_forward_hook(lambda m, args, out: routed.append("forward" in vars(m)))
    before = _snapshot(loaded.model)
    try:
        packed = generate_summaries(loaded.model, loaded.tokenizer, prompts, GenerationConfig(max_new_tokens=12), [])
        assert len(routed) == 12 and all(routed)  # every step through the packed weight
        routed.clear()
        plain = generate_summaries(loaded.model, loaded.tokenizer, prompts,
                                   GenerationConfig(max_new_tokens=12, packed_weights=False), [])
        assert len(routed) == 12 and not any(routed)
    finally:
        handle.remove()
    assert packed == plain
    assert _untouched(loaded.model, before)


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_an_unmerged_lora_model_keeps_its_adapters(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    """PEFT's LoRA layer is no plain Linear: its base layer is packed and its own forward still adds B A x."""
    from sumcircuit.lora import inject_lora

    base = load_model(str(tiny_model_dirs[fam]))
    model = inject_lora(base.model, base.adapter, list(range(base.adapter.n_layers)), rank=4, alpha=8).eval()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
        with packed_linears(model) as n:
            assert n > 0
            packed = model(ids).logits
    assert (plain - without).abs().max() > 0.1  # the adapters matter here
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)


def test_evaluate_packs_once_for_all_its_batches(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing costs about 0.2 s per call for a 135M model: evaluate does it once, not once per batch."""
    from sumcircuit.data import DataConfig
    from sumcircuit.evaluation import evaluate
    from sumcircuit.evaluation import packed_weights as module

    from helpers import CNNDM

    loaded = load_model(str(tiny_model_dirs["llama"]))
    packed: list[nn.Module] = []
    real = module._pack
    monkeypatch.setattr(module, "_pack", lambda m: (packed.append(m), real(m))[1])
    with torch.inference_mode(), packed_linears(loaded.model) as outer:  # nested: the inner one packs nothing
        with packed_linears(loaded.model) as inner:
            assert inner == 0
        assert all("forward" in vars(m) for m in _linears(loaded.model))  # the inner exit left the outer's
    packed.clear()
    evaluate(loaded, DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=96),
             GenerationConfig(max_new_tokens=4, batch_size=1), out=tmp_path / "e")
    assert len(packed) == outer == len(_linears(loaded.model))  # 3 batches, one packing
    assert all("forward" not in vars(m) for m in loaded.model.modules())


def test_hooks_still_run_around_a_packed_layer() -> None:
    """Ablation and patching hook the modules (pre-hooks on inputs, hooks on outputs): packing keeps them."""
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    layer.register_forward_hook(lambda m, args, out: out - 1)
    with torch.inference_mode():
        plain = layer(x)
        with packed_linears(layer) as n:
            packed = layer(x)
    assert n == 1
    torch.testing.assert_close(packed, torch.nn.functional.linear(2 * x, layer.weight, layer.bias) - 1)
    torch.testing.assert_close(packed, plain)


def test_an_input_of_another_dtype_takes_the_plain_product() -> None:
    """Under a user's bf16 autocast an input may arrive in bf16: no error from oneDNN, the plain product."""
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode(), packed_linears(layer) as n:
        got = layer(x)
    assert n == 1 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight.bfloat16(), layer.bias.bfloat16()))


def test_cli_no_packed_weights(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate --no-packed-weights`` packs nothing and records it; the default packs, with the same texts."""
    import json

    from sumcircuit.cli import main
    from sumcircuit.evaluation import packed_weights as module

    from helpers import CNNDM

    packed: list[nn.Module] = []
    real = module._pack
    monkeypatch.setattr(module, "_pack", lambda m: (packed.append(m), real(m))[1])
    common = ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--data", str(CNNDM), "--split", "val",
              "--n-docs", "2", "--max-tokens", "96", "--max-new-tokens", "4", "--bootstrap", "20"]
    assert main([*common, "--no-packed-weights", "--out", str(tmp_path / "off")]) == 0
    assert not packed
    assert main([*common, "--out", str(tmp_path / "on")]) == 0
    assert packed
    saved = {k: json.loads((tmp_path / k / "rouge.json").read_text()) for k in ("off", "on")}
    assert saved["off"]["generation"]["packed_weights"] is False and saved["on"]["generation"]["packed_weights"] is True

    def texts(k: str) -> list[str]:
        return [json.loads(x)["prediction"] for x in (tmp_path / k / "predictions.jsonl").read_text().splitlines()]

    assert texts("off") == texts("on")
