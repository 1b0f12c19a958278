"""analyze: every statistic against an independent reference (eager attention maps, plain hooks)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sumcircuit as sc
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis import (
    HEAD_COLUMNS,
    LAYER_COLUMNS,
    AnalysisConfig,
    AnalysisState,
    IncompatibleModelsError,
    analyze_models,
    finalize,
    load_state,
    weight_changes,
)
from sumcircuit.analysis import run as analysis_run
from sumcircuit.analysis import state as analysis_state
from sumcircuit.capture import body
from sumcircuit.cli import main
from sumcircuit.data import DataConfig, Encoded, collate, encode, load_examples
from sumcircuit.metrics import linear_cka

from helpers import CNNDM, make_tiny_model, save_tiny

FAST = dict(n_bootstrap=100)
VAL = str(CNNDM / "val.jsonl.gz")


@pytest.fixture(scope="module")
def docs(tiny_tokenizer) -> list[Encoded]:  # type: ignore[no-untyped-def]
    """Real text, lengths 23..48 tokens, so batches are padded and Gemma's window (8) matters."""
    examples = load_examples(DataConfig(data=VAL, n_docs=5)).examples
    return [encode(tiny_tokenizer, ex, max_tokens=n) for ex, n in zip(examples, (48, 31, 40, 23, 36))]


# ---------------------------------------------------------------- references

def _eager_rows(model, batch):  # type: ignore[no-untyped-def]
    """Per-layer attention maps [B, H, T, T] from HF eager attention."""
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = body(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_attentions=True)
    finally:
        model.config._attn_implementation = old
    return [a.double() for a in out.attentions]


def _reference_head_stats(base, tuned, encoded, weights_key=None):  # type: ignore[no-untyped-def]
    """Token-weighted per-head means and per-document means from eager maps (one padded batch)."""
    batch = collate(encoded, 0)
    w = batch["attention_mask"].bool()
    if weights_key:
        w &= batch[weights_key]
    stats = {k: [] for k in ("entropy_base", "entropy_tuned", "kl_base_tuned", "kl_tuned_base")}
    per_doc = {k: [] for k in stats}
    for pb, pt in zip(_eager_rows(base, batch), _eager_rows(tuned, batch)):
        lpb, lpt = torch.where(pb > 0, pb.log(), 0.0), torch.where(pt > 0, pt.log(), 0.0)
        rows = {"entropy_base": -(pb * lpb).sum(-1), "entropy_tuned": -(pt * lpt).sum(-1),
                "kl_base_tuned": (pb * (lpb - lpt)).sum(-1), "kl_tuned_base": (pt * (lpt - lpb)).sum(-1)}
        for k, r in rows.items():
            masked = r * w[:, None, :]
            stats[k].append(masked.sum((0, 2)) / w.sum())
            per_doc[k].append(masked.sum(2) / w.sum(1, keepdim=True))
    return ({k: torch.stack(v) for k, v in stats.items()},
            {k: torch.stack(v, dim=1) for k, v in per_doc.items()})


def _hooked_activations(model, adapter, batch):  # type: ignore[no-untyped-def]
    """Neuron inputs and block outputs with plain hooks (independent of sumcircuit.capture)."""
    acts, hidden, handles = {}, {}, []
    for i in range(adapter.n_layers):
        handles.append(adapter.mlp_output(model, i).register_forward_pre_hook(
            lambda m, a, i=i: acts.__setitem__(i, a[0].detach())))
        handles.append(adapter.block(model, i).register_forward_hook(
            lambda m, a, o, i=i: hidden.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            body(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return acts, hidden


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize(("kernels", "rows_per_tile"), [("auto", 64), ("auto", 5), ("fused", None)])
def test_head_stats_match_eager_on_padded_batches(family: str, docs, kernels: str,  # type: ignore[no-untyped-def]
                                                  rows_per_tile: int | None) -> None:
    base, tuned = make_tiny_model(family, 0), make_tiny_model(family, 1)
    adapter = ArchitectureAdapter.for_model(base)
    config = AnalysisConfig(batch_size=3, rows_per_tile=rows_per_tile, kernels=kernels, **FAST)  # type: ignore[arg-type]
    result = analyze_models(base, tuned, adapter, docs, config, pad_token_id=0)
    ref, ref_doc = _reference_head_stats(base, tuned, docs)
    for stat, values in ref.items():
        torch.testing.assert_close(result.head_table(stat).double(), values, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.per_doc[stat].double(), ref_doc[stat], atol=1e-5, rtol=0)
    assert float(ref["kl_base_tuned"].mean()) > 1e-4  # the pair really differs
    torch.testing.assert_close(result.head_table("entropy_delta").double(),
                               ref["entropy_tuned"] - ref["entropy_base"], atol=1e-5, rtol=0)
    assert {r["rows"] for r in result.heads} == {sum(len(d.input_ids) for d in docs)}


def test_region_restricts_query_positions(docs) -> None:  # type: ignore[no-untyped-def]
    base, tuned = make_tiny_model("llama", 0), make_tiny_model("llama", 1)
    result = analyze_models(base, tuned, None, docs, AnalysisConfig(region="summary", **FAST), pad_token_id=0)
    ref, _ = _reference_head_stats(base, tuned, docs, "summary_mask")
    for stat, values in ref.items():
        torch.testing.assert_close(result.head_table(stat).double(), values, atol=1e-5, rtol=0)
    n_summary = sum(d.summary_span[1] - d.summary_span[0] for d in docs)
    assert result.summary["n_tokens"] == n_summary


def test_activation_stats_match_direct_computation(docs) -> None:  # type: ignore[no-untyped-def]
    base, tuned = make_tiny_model("gpt2", 0), make_tiny_model("gpt2", 1)
    adapter = ArchitectureAdapter.for_model(base)
    cfg = AnalysisConfig(batch_size=2, top_k=5, **FAST)
    result = analyze_models(base, tuned, adapter, docs, cfg, pad_token_id=0)
    batch = collate(docs, 0)
    w = batch["attention_mask"].bool()
    acts_b, hid_b = _hooked_activations(base, adapter, batch)
    acts_t, hid_t = _hooked_activations(tuned, adapter, batch)
    stats = result.stats
    for layer in range(adapter.n_layers):
        ab, at = acts_b[layer][w].double(), acts_t[layer][w].double()
        torch.testing.assert_close(stats["neurons.mean_base"][layer].double(), ab.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["neurons.mean_abs_change"][layer].double(), (at - ab).abs().mean(0),
                                   atol=1e-5, rtol=1e-5)
        pooled = ((ab.var(0, unbiased=False) + at.var(0, unbiased=False)) / 2).sqrt()
        torch.testing.assert_close(stats["neurons.standardized_change"][layer].double(),
                                   (at.mean(0) - ab.mean(0)) / pooled, atol=1e-4, rtol=1e-4)
        hb, ht = hid_b[layer][w].double(), hid_t[layer][w].double()
        row = result.layers[layer]
        assert row["actmag_base"] == pytest.approx(float(hb.norm(dim=-1).mean()), rel=1e-5)
        assert row["actmag_rel_change"] == pytest.approx(
            float((ht.norm(dim=-1).mean() - hb.norm(dim=-1).mean()) / hb.norm(dim=-1).mean()), abs=1e-5)
        assert row["cka"] == pytest.approx(linear_cka(hb, ht), abs=1e-4)
        flips = ((ab.mean(0) * at.mean(0) < 0) & (ab.mean(0).abs() >= 0.1 * pooled)
                 & (at.mean(0).abs() >= 0.1 * pooled)).sum()
        assert row["neuron_sign_flips"] == int(flips)
    top = result.neurons[0]
    assert abs(top["standardized_change"]) == pytest.approx(
        float(stats["neurons.standardized_change"].abs().max()), rel=1e-6)
    # weight change against the state dicts
    sb, st = base.state_dict(), tuned.state_dict()
    keys = [k for k in sb if k.startswith("transformer.h.1.attn.")]
    expected = (sum((st[k] - sb[k]).double().pow(2).sum() for k in keys).sqrt()
                / sum(sb[k].double().pow(2).sum() for k in keys).sqrt())
    assert result.layers[1]["weight_change_attn"] == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("kernels", ["auto", "fused"])
def test_model_against_itself_is_exactly_unchanged(family: str, docs, kernels: str) -> None:  # type: ignore[no-untyped-def]
    model = make_tiny_model(family, 0)
    result = analyze_models(model, model, None, docs, AnalysisConfig(kernels=kernels, **FAST),  # type: ignore[arg-type]
                            pad_token_id=0)
    for stat in ("kl_base_tuned", "kl_tuned_base", "entropy_delta"):
        assert float(result.head_table(stat).abs().max()) == 0.0
    for row in result.layers:
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["weight_change_attn"] == 0.0 and row["neuron_sign_flips"] == 0
    assert result.summary["share_heads_entropy_decreased"] == 0.0


def test_lora_injected_model_is_analyzed_and_left_untouched(docs) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("llama", 0)
    tuned = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                           init_lora_weights=False))
    tuned.train()
    result = analyze_models(base, tuned, None, docs[:3], AnalysisConfig(**FAST), pad_token_id=0)
    assert tuned.training and tuned.get_base_model().config._attn_implementation == "sdpa"
    merged = copy.deepcopy(tuned).merge_and_unload().eval()
    ref, _ = _reference_head_stats(base, merged, docs[:3])
    torch.testing.assert_close(result.head_table("kl_base_tuned").double(), ref["kl_base_tuned"], atol=1e-5, rtol=0)
    adapter = ArchitectureAdapter.for_model(base)
    expected = weight_changes(base, merged, adapter)
    torch.testing.assert_close(torch.tensor([r["weight_change_attn"] for r in result.layers], dtype=torch.float64),
                               expected["attn"], atol=1e-6, rtol=1e-5)
    assert all(r["weight_change_attn"] > 0 and r["weight_change_mlp"] > 0 for r in result.layers)


# ---------------------------------------------------------------- accumulators

def test_merged_halves_equal_one_pass(docs) -> None:  # type: ignore[no-untyped-def]
    base, tuned = make_tiny_model("gemma3", 0), make_tiny_model("gemma3", 1)
    adapter = ArchitectureAdapter.for_model(base)
    cfg = AnalysisConfig(batch_size=2, **FAST)
    whole = analyze_models(base, tuned, adapter, docs, cfg, pad_token_id=0)
    first = analyze_models(base, tuned, adapter, docs[:2], cfg, pad_token_id=0).state
    second = analyze_models(base, tuned, adapter, docs[2:], cfg, pad_token_id=0).state
    merged = finalize(first.merge(second), cfg, weight_changes(base, tuned, adapter))
    for key, value in whole.stats.items():
        torch.testing.assert_close(merged.stats[key], value, atol=2e-6, rtol=1e-5, equal_nan=True, msg=key)
    for key, value in whole.per_doc.items():
        torch.testing.assert_close(merged.per_doc[key], value, atol=1e-6, rtol=0, equal_nan=True)
    assert merged.state.doc_ids == whole.state.doc_ids


# ---------------------------------------------------------------- files, resume, CLI

def _tiny_pair(tmp_path: Path, tokenizer, family: str = "gpt2") -> tuple[str, str]:  # type: ignore[no-untyped-def]
    return (str(save_tiny(family, tmp_path / "base", tokenizer, seed=0)),
            str(save_tiny(family, tmp_path / "tuned", tokenizer, seed=1)))


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_end_to_end(tmp_path: Path, tiny_tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    base, tuned = _tiny_pair(tmp_path, tiny_tokenizer)
    out = tmp_path / "out"
    code = main(["analyze", "--base", base, "--tuned", tuned, "--data", VAL, "--n-docs", "4",
                 "--max-tokens", "40", "--batch-size", "3", "--top-k", "7", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    heads, layers, neurons = _csv(out / "heads.csv"), _csv(out / "layers.csv"), _csv(out / "neurons.csv")
    assert list(heads[0]) == HEAD_COLUMNS and len(heads) == 3 * 4
    assert list(layers[0]) == LAYER_COLUMNS and len(layers) == 3
    assert len(neurons) == 7 and neurons[0]["rank"] == "1"
    for row in heads:
        assert float(row["kl_base_tuned_ci_low"]) <= float(row["kl_base_tuned"]) <= float(row["kl_base_tuned_ci_high"])
    per_doc = load_file(str(out / "per_doc.safetensors"))
    assert per_doc["kl_base_tuned"].shape == (4, 3, 4) and per_doc["actmag_rel_change"].shape == (4, 3)
    stats = load_file(str(out / "stats.safetensors"))
    assert stats["neurons.mean_abs_change"].shape == (3, 128)
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    assert summary["n_docs"] == 4 and summary["n_tokens"] == int(heads[0]["rows"])
    assert [m["spec"] for m in prov["models"]] == [base, tuned]
    assert all(len(m["weights_sha256"]) == 64 for m in prov["models"])
    assert prov["data"]["sha256"] and prov["template"] and "torch" in prov["versions"]
    assert set(summary["layers_by_kl"]) == {0, 1, 2}
    assert "documents" in capsys.readouterr().out


def test_cli_kernels_agree(tmp_path: Path, tiny_tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    base, tuned = _tiny_pair(tmp_path, tiny_tokenizer)
    heads = {}
    for kernel in ("compiled", "eager", "fused"):
        out = tmp_path / kernel
        code = main(["analyze", "--base", base, "--tuned", tuned, "--data", VAL, "--n-docs", "3", "--max-tokens", "40",
                     "--kernels", kernel, "--n-bootstrap", "10", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        heads[kernel] = _csv(out / "heads.csv")
        config = json.loads((out / "summary.json").read_text())["provenance"]["config"]
        assert config["kernels"] == kernel
    for other in ("eager", "fused"):
        for a, b in zip(heads["compiled"], heads[other], strict=True):
            for name in ("entropy_base", "entropy_tuned", "kl_base_tuned", "kl_tuned_base"):
                assert abs(float(a[name]) - float(b[name])) < 1e-5, (other, name, a[name], b[name])


def test_resume_after_interruption_gives_the_same_results(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sumcircuit.analysis import analyze

    base, tuned = _tiny_pair(tmp_path, tiny_tokenizer, "llama")
    data = DataConfig(data=VAL, n_docs=5, max_tokens=32)
    cfg = AnalysisConfig(shard_size=2, batch_size=2, **FAST)
    quiet = sc.Runtime(progress=False)
    full = analyze(base, tuned, data, cfg, runtime=quiet, out=tmp_path / "full")

    real = analysis_run.accumulate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis_run, "accumulate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze(base, tuned, data, cfg, runtime=quiet, out=tmp_path / "resumed")
    state, meta = load_state(tmp_path / "resumed" / "accumulators.safetensors")
    assert state.n_docs == 2 and meta["docs_done"] == "2"
    assert not (tmp_path / "resumed" / "heads.csv").exists()
    monkeypatch.setattr(analysis_run, "accumulate", real)
    resumed = analyze(base, tuned, data, cfg, runtime=quiet, out=tmp_path / "resumed")
    for key, value in full.stats.items():
        torch.testing.assert_close(resumed.stats[key], value, atol=0, rtol=0, equal_nan=True, msg=key)
    assert (tmp_path / "full" / "heads.csv").read_text() == (tmp_path / "resumed" / "heads.csv").read_text()
    with pytest.raises(sc.SumcircuitError, match="other models, data or settings"):
        analyze(base, tuned, data, AnalysisConfig(shard_size=2, region="document", **FAST), runtime=quiet,
                out=tmp_path / "resumed")


def test_mismatched_models_and_tokenizers_are_refused(tmp_path: Path, tiny_tokenizer, tiny_model_dirs, capsys) -> None:  # type: ignore[no-untyped-def]
    deeper = save_tiny("llama", tmp_path / "deep", tiny_tokenizer, num_hidden_layers=4)
    code = main(["analyze", "--base", str(tiny_model_dirs["llama"]), "--tuned", str(deeper), "--data", VAL,
                 "--n-docs", "2", "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert code == 2 and "different architectures" in err and "n_layers: 3 vs 4" in err
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        analyze_models(make_tiny_model("gpt2"), make_tiny_model("llama"), None, [], AnalysisConfig(**FAST))
    other_tok = copy.deepcopy(tiny_tokenizer)
    other_tok.add_tokens(["<extra_token>"])
    other = save_tiny("gpt2", tmp_path / "othertok", other_tok)
    code = main(["analyze", "--base", str(tiny_model_dirs["gpt2"]), "--tuned", str(other), "--data", VAL,
                 "--n-docs", "2", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizers differ" in err and "vocabularies differ" in err


def test_state_roundtrip(tmp_path: Path, docs) -> None:  # type: ignore[no-untyped-def]
    base, tuned = make_tiny_model("gpt2", 0), make_tiny_model("gpt2", 1)
    state = analyze_models(base, tuned, None, docs[:2], AnalysisConfig(**FAST), pad_token_id=0).state
    analysis_state.save_state(state, tmp_path / "s.safetensors")
    loaded, _ = load_state(tmp_path / "s.safetensors")
    assert isinstance(loaded, AnalysisState) and loaded.doc_ids == state.doc_ids
    for key, value in state.to_tensors().items():
        torch.testing.assert_close(loaded.to_tensors()[key], value, atol=0, rtol=0)


# ---------------------------------------------------------------- real model

@pytest.mark.real
def test_smollm2_matches_eager_on_real_text(smollm2) -> None:  # type: ignore[no-untyped-def]
    cfg = DataConfig(data=VAL, n_docs=2, max_tokens=128)
    encoded = [encode(smollm2.tokenizer, ex, max_tokens=n)
               for ex, n in zip(load_examples(cfg).examples, (128, 97))]
    base = smollm2.model
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (3, 17):  # perturb two layers' attention so KL is not trivially 0
            for proj in ("q_proj", "k_proj"):
                w = getattr(tuned.model.layers[layer].self_attn, proj).weight
                w.add_(torch.randn(w.shape, generator=gen) * 0.05 * w.abs().mean())
    pad = smollm2.tokenizer.pad_token_id
    result = analyze_models(base, tuned, smollm2.adapter, encoded, AnalysisConfig(batch_size=2, cka=False, **FAST), pad)
    assert smollm2.model.config._attn_implementation == "sdpa"
    batch = collate(encoded, pad)
    w = batch["attention_mask"].bool()
    layers = (0, 3, 17)
    old = (base.config._attn_implementation, tuned.config._attn_implementation)
    base.config._attn_implementation = tuned.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
            att_b, att_t = base.model(**kwargs).attentions, tuned.model(**kwargs).attentions
    finally:
        base.config._attn_implementation, tuned.config._attn_implementation = old
    for layer in layers:
        pb, pt = att_b[layer].double(), att_t[layer].double()
        lpb, lpt = torch.where(pb > 0, pb.log(), 0.0), torch.where(pt > 0, pt.log(), 0.0)
        for stat, rows in (("entropy_base", -(pb * lpb).sum(-1)), ("kl_base_tuned", (pb * (lpb - lpt)).sum(-1)),
                           ("kl_tuned_base", (pt * (lpt - lpb)).sum(-1))):
            ref = (rows * w[:, None, :]).sum((0, 2)) / w.sum()
            torch.testing.assert_close(result.head_table(stat)[layer].double(), ref, atol=1e-5, rtol=0)
    kl = result.head_table("kl_base_tuned")
    assert float(kl[3].mean()) > 1e-4 and float(kl[0].abs().max()) == 0.0  # layers before 3 untouched
    assert result.head_table("entropy_base").shape == (30, 9)
