"""The exactness checks on an accelerator: the fused kernel, the score tiles and a whole analysis on CUDA.

CI has no GPU, so here these are skipped; on a GPU machine ``pytest tests/test_cuda.py``
runs them. ``SUMCIRCUIT_TEST_DEVICE=cpu`` runs the same tests on the CPU's kernels,
a dry run of the tests themselves. References are float64 on the CPU.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch

from sumcircuit import capture
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis import AnalysisConfig, AnalysisResult, analyze_models
from sumcircuit.analysis import state as analysis_mod
from sumcircuit.capture import AttentionInputs, RowMask, paired_attention
from sumcircuit.cli import main
from sumcircuit.data import Encoded
from sumcircuit.kernels import attention_lse, attention_path

from helpers import (
    ATTENTION_CASES,
    TINY_VOCAB,
    assert_matches_explicit,
    attention_case,
    make_tiny_model,
    save_tiny,
    train_tiny_tokenizer,
)

DEVICE = torch.device(os.environ.get("SUMCIRCUIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device (CI has none); run on a GPU machine")


def test_auto_means_the_fused_path_on_cuda() -> None:
    assert attention_path("auto", DEVICE) == ("fused" if DEVICE.type == "cuda" else "tiles")


# (Tq, Tk, key width, value width, mask): the kernel's block edges (32, 64), a key count that is no
# multiple of 8 (the bias rows are padded), Gemma 3's head width 256, cached keys, -inf and finfo.min
LSE_CASES = [(37, 37, 64, 192, "causal"), (300, 300, 64, 192, "causal"), (21, 30, 64, 192, "causal"),
             (21, 30, 64, 192, "causal+padding"), (45, 45, 256, 768, "window"), (1, 1, 64, 192, "causal"),
             (130, 130, 8, 24, "padding")]


def _lse_case(t_q: int, t_k: int, d: int, d_v: int, kind: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool, torch.Tensor]:
    g = torch.Generator().manual_seed(t_q * 1000 + d)
    q = torch.randn(2, 3, t_q, d, generator=g) * 2 / d ** 0.5  # scaled queries, peaked rows
    k, v = torch.randn(2, 3, t_k, d, generator=g), torch.randn(2, 3, t_k, d_v, generator=g)
    allowed = torch.ones(2, 1, t_q, t_k, dtype=torch.bool)
    causal = kind != "padding"
    if causal:
        allowed &= torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)
    visible = torch.ones_like(allowed)  # what the bias lets through
    if "padding" in kind:
        visible[1, :, :, t_k - 7:] = False
    if kind == "window":
        visible &= torch.arange(t_k)[None, :] > torch.arange(t_q)[:, None] + (t_k - t_q) - 9
    fill = float("-inf") if kind == "window" else torch.finfo(torch.float32).min
    bias = None if kind == "causal" else torch.zeros(visible.shape).masked_fill(~visible, fill)
    return q, k, v, bias, causal, allowed & visible


@pytest.mark.parametrize(("t_q", "t_k", "d", "d_v", "kind"), LSE_CASES)
def test_attention_lse_matches_float64(t_q: int, t_k: int, d: int, d_v: int, kind: str) -> None:
    """The kernel's output and log-sum-exp in fp32, against float64 (3xTF32 keeps fp32 accuracy)."""
    q, k, v, bias, causal, allowed = _lse_case(t_q, t_k, d, d_v, kind)
    on = [None if x is None else x.to(DEVICE) for x in (q, k, v, bias)]
    out, lse = attention_lse(on[0], on[1], on[2], on[3], causal)  # type: ignore[arg-type]
    assert out.device.type == DEVICE.type and out.shape == (2, 3, t_q, d_v) and lse.shape == (2, 3, t_q)
    scores = (q.double() @ k.double().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse.cpu().double(), scores.logsumexp(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cpu().double(), scores.softmax(-1) @ v.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("kernel", ["auto", "eager"])
@pytest.mark.parametrize("kind", ATTENTION_CASES)
def test_paired_attention_matches_explicit_softmax(kind: str, kernel: str, head_dim: int) -> None:
    """``auto`` is the fused path on CUDA, ``eager`` the score tiles: both against float64."""
    base, tuned, allowed, mask, rows = attention_case(kind, DEVICE, head_dim)
    outputs = paired_attention(base, tuned, mask, rows_per_tile=5, kernel=kernel)  # type: ignore[arg-type]
    assert outputs[0].device.type == DEVICE.type
    assert_matches_explicit(base, tuned, allowed, rows, *outputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_get_fp32_statistics(dtype: torch.dtype) -> None:
    """Outputs in the model's dtype; statistics fp32 from the same (rounded) queries and keys."""
    base, tuned, allowed, mask, rows = attention_case("padding+window", DEVICE, 64)
    half = [AttentionInputs(x.query.to(dtype), x.key.to(dtype), x.value.to(dtype), x.scale) for x in (base, tuned)]
    out_b, out_t, got = paired_attention(half[0], half[1], mask, kernel="auto")
    assert out_b.dtype == dtype and out_t.dtype == dtype
    assert_matches_explicit(half[0], half[1], allowed, rows, out_b, out_t, got, atol=1e-2)


def test_a_model_against_itself_has_exactly_zero_kl() -> None:
    base, _, _, _, _ = attention_case("causal", DEVICE, 64)
    out_b, out_t, rows = paired_attention(base, base, RowMask(None, causal=True), kernel="auto")
    assert torch.equal(out_b, out_t) and torch.equal(rows.entropy_base, rows.entropy_tuned)
    assert not rows.kl_base_tuned.any() and not rows.kl_tuned_base.any()


def _documents() -> list[Encoded]:
    """Five random-token documents of 23..48 tokens: padded batches, Gemma's window (8) matters."""
    g = torch.Generator().manual_seed(7)
    return [Encoded(f"d{i}", torch.randint(1, TINY_VOCAB, (n,), generator=g).tolist(), [-100] * n, (0, n), (n, n),
                    n, False, False) for i, n in enumerate((48, 31, 40, 23, 36))]


def _analyze(family: str, device: torch.device, kernels: str) -> AnalysisResult:
    base, tuned = (make_tiny_model(family, seed).to(device) for seed in (0, 1))
    config = AnalysisConfig(batch_size=3, n_bootstrap=100, kernels=kernels)  # type: ignore[arg-type]
    return analyze_models(base, tuned, ArchitectureAdapter.for_model(base), _documents(), config, pad_token_id=0)


@pytest.mark.parametrize("kernels", ["auto", "eager"])
def test_analysis_on_the_device_equals_the_cpus(family: str, kernels: str) -> None:
    """Every statistic (heads, CKA, norms, neurons, per-document means) as on the CPU, within fp32 rounding."""
    cpu = _analyze(family, torch.device("cpu"), "auto")  # C++ where a compiler is found
    got = _analyze(family, DEVICE, kernels)
    assert set(got.stats) == set(cpu.stats) and set(got.per_doc) == set(cpu.per_doc)
    for name in cpu.stats:
        torch.testing.assert_close(got.stats[name].cpu(), cpu.stats[name], atol=1e-5, rtol=1e-4, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in cpu.per_doc:
        torch.testing.assert_close(got.per_doc[name].cpu(), cpu.per_doc[name], atol=1e-5, rtol=1e-4, equal_nan=True)
    assert float(cpu.head_table("kl_base_tuned").mean()) > 1e-4  # the pair really differs


@pytest.mark.parametrize("kernels", ["auto", "eager"])
def test_the_layer_loop_never_waits_for_the_device(monkeypatch: pytest.MonkeyPatch, kernels: str) -> None:
    """Attention and the sums never wait for the device: a host copy per layer would stall the GPU at every layer."""
    calls: list[str] = []

    def strict(method):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(method.__name__)
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
            try:
                return method(*args, **kwargs)
            finally:
                if DEVICE.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        return wrapped

    for name in ("on_attention", "on_neurons", "on_hidden"):
        monkeypatch.setattr(analysis_mod._PairSink, name, strict(getattr(analysis_mod._PairSink, name)))
    monkeypatch.setattr(capture, "paired_attention", strict(capture.paired_attention))
    _analyze("llama", DEVICE, kernels)  # padded batches: counted tokens picked by index
    assert len(calls) == 2 * 3 * 4  # two batches, three layers, four calls each


def test_the_models_are_left_as_they_were() -> None:
    base, tuned = (make_tiny_model("llama", seed).to(DEVICE) for seed in (0, 1))
    before = copy.deepcopy(tuned.state_dict())
    config = AnalysisConfig(batch_size=2, n_bootstrap=10)
    analyze_models(base, tuned, ArchitectureAdapter.for_model(base), _documents()[:2], config, pad_token_id=0)
    assert base.config._attn_implementation == "sdpa" and not tuned.training
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert next(base.parameters()).device.type == DEVICE.type


def _synthetic_data(folder: Path) -> Path:
    """Six article/summary records of random words: a GPU machine may have no ``../shared``."""
    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "si", "tu") for b in ("n", "r", "s", "", "la")]
    rows = [{"article": " ".join(rng.choice(words) for _ in range(80)) + ".",
             "abstract": " ".join(rng.choice(words) for _ in range(12)) + "."} for _ in range(6)]
    path = folder / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_analyze_on_the_device_equals_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sumcircuit analyze --device`` end to end: loading onto the device, the run, the files, provenance."""
    data = _synthetic_data(tmp_path)
    tokenizer = train_tiny_tokenizer(data.read_text().splitlines() * 20)
    base, tuned = (str(save_tiny("llama", tmp_path / name, tokenizer, seed=s)) for name, s in (("b", 0), ("t", 1)))
    heads = {}
    for device in ("cpu", DEVICE.type):
        out = tmp_path / f"out-{device}"
        code = main(["analyze", "--base", base, "--tuned", tuned, "--data", str(data), "--n-docs", "5",
                     "--max-tokens", "48", "--batch-size", "2", "--n-bootstrap", "20", "--device", device,
                     "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        with open(out / "heads.csv") as fh:
            heads[device] = list(csv.DictReader(fh))
        assert json.loads((out / "summary.json").read_text())["n_docs"] == 5
    assert len(heads["cpu"]) == 3 * 6 and max(float(r["kl_base_tuned"]) for r in heads["cpu"]) > 1e-4
    for a, b in zip(heads["cpu"], heads[DEVICE.type], strict=True):
        for name in ("entropy_base", "entropy_tuned", "kl_base_tuned", "kl_tuned_base"):
            assert abs(float(a[name]) - float(b[name])) < 1e-5, (name, a[name], b[name])
