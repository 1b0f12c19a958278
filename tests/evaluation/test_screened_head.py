"""The bf16-screened greedy LM head picks the fp32 head's token, near ties included."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from sumcircuit.data import Example, encode
from sumcircuit.evaluation import GenerationConfig, generate_summaries
from sumcircuit.evaluation import generation as generation_module
from sumcircuit.evaluation.screened_head import ScreenedHead, can_screen, error_coefficient
from sumcircuit.models import load_model


def _head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


@pytest.mark.parametrize("bias", [False, True])
def test_screened_logits_pick_the_fp32_token_and_are_exact_where_they_could_win(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 96, generator=g) * 0.3
    head = _head(weight, torch.randn(5000, generator=g) if bias else None)
    x = torch.randn(2, 7, 96, generator=g) * 3
    exact = head(x)
    got = ScreenedHead(head)(x)
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    best = exact.max(-1, keepdim=True).values
    # every value either is the fp32 logit (to GEMM summation order) or lies below the best fp32 logit
    close = torch.isclose(got, exact, rtol=1e-5, atol=1e-5)
    assert bool((close | (got < best)).all())
    assert bool(close.gather(-1, exact.argmax(-1, keepdim=True)).all())


def test_near_ties_bf16_cannot_resolve_fall_back_to_fp32() -> None:
    """Rows differing below bf16's resolution: the arg-max is decided by the fp32 recomputation."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 64, generator=g)
    weight = torch.cat([torch.randn(1000, 64, generator=g) * 0.1,
                        base + 1e-4 * torch.randn(50, 64, generator=g)])  # 50 near-identical rows
    head = _head(weight)
    x = (base * 4).repeat(16, 1) + 3 * torch.randn(16, 64, generator=g)
    exact = head(x)
    assert len(set(exact.argmax(-1).tolist())) > 1  # the winner moves among the near-identical rows
    screened = ScreenedHead(head)
    assert torch.equal(screened(x).argmax(-1), exact.argmax(-1))
    assert screened.candidates >= 50  # all near-ties were recomputed in fp32
    bf16_alone = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()).float().argmax(-1)
    assert not torch.equal(bf16_alone, exact.argmax(-1))  # what the screening protects against


def test_error_coefficient_and_where_it_applies() -> None:
    assert error_coefficient(576) == pytest.approx(2 * (2 * 2**-8 + 2**-16 + 576 * 2**-24 * (1 + 2**-8) ** 2),
                                                   rel=1e-6)
    assert can_screen(nn.Linear(4, 8))
    assert not can_screen(nn.Linear(4, 8).to(torch.bfloat16))
    assert not can_screen(nn.Embedding(8, 4))


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma3"])
def test_generation_screens_the_head_and_gives_the_plain_heads_tokens(
        fam: str, tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(str(tiny_model_dirs[fam]))
    docs = ["The cat sat on the mat and looked at the birds outside.",
            "Prices rose again in March, the third monthly rise in a row, officials said.",
            "A storm closed schools across the region on Tuesday."]
    prompts = [encode(loaded.tokenizer, Example(f"d{i}", d, ("x",), "test"), max_tokens=128, with_summary=False)
               for i, d in enumerate(docs)]
    cfg = GenerationConfig(max_new_tokens=12)
    used: list[ScreenedHead] = []
    real = generation_module.screened_head

    @contextlib.contextmanager
    def spy(model: nn.Module) -> Iterator[ScreenedHead | None]:
        with real(model) as head:
            if head is not None:
                used.append(head)
            yield head

    monkeypatch.setattr(generation_module, "screened_head", spy)
    screened = generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, eos_ids=[])
    assert used and used[0].calls == 12 and loaded.model.get_output_embeddings() is used[0].head  # restored
    monkeypatch.setattr(generation_module, "screened_head", lambda model: contextlib.nullcontext())
    plain = generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, eos_ids=[])
    assert screened == plain
    beams = GenerationConfig(max_new_tokens=6, num_beams=2)
    monkeypatch.setattr(generation_module, "screened_head", spy)
    used.clear()
    generate_summaries(loaded.model, loaded.tokenizer, prompts, beams, eos_ids=[])
    assert not used  # beam search reads every logit: the plain head

