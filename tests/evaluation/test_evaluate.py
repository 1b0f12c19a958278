"""Evaluation: ROUGE equals rouge-score's, bootstrap CIs, batched generation, outputs, CLI."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

import sumcircuit as sc
from sumcircuit.cli import main
from sumcircuit.data import DataConfig, Example, encode
from sumcircuit.evaluation import (
    ROUGE_TYPES,
    EvaluationConfig,
    EvaluationError,
    GenerationConfig,
    aggregate,
    cut_at_stop,
    eos_token_ids,
    generate_summaries,
    rouge_scores,
    split_sentences,
)
from sumcircuit.evaluation import run as ev_run
from sumcircuit.models import load_adapter, load_model
from sumcircuit.stats import StatsError, bootstrap_ci

from helpers import SHARED_DATA

# ---------------------------------------------------------------- sentence splitting


def test_split_sentences_punctuation_newlines_and_abbreviations() -> None:
    assert split_sentences("The cat sat. It ran away! Why? 3 dogs barked.") == [
        "The cat sat.", "It ran away!", "Why?", "3 dogs barked."]
    assert split_sentences("First line\nSecond line. Third one.\n\n") == [
        "First line", "Second line.", "Third one."]
    assert split_sentences('He said "Stop." Then Mr. Smith and Dr. J. K. Rowling met the U.S. team. '
                           "The end, e.g. Tuesday.") == [
        'He said "Stop."', "Then Mr. Smith and Dr. J. K. Rowling met the U.S. team.",
        "The end, e.g. Tuesday."]
    assert split_sentences("version 2.5 is out. it is lower case") == ["version 2.5 is out. it is lower case"]
    assert split_sentences("   ") == []


# ---------------------------------------------------------------- ROUGE == rouge-score

PREDS = [
    "They chased the birds quickly! The cats were running in the park.",
    "Traffic is expected to improve. Officials said the bridge will reopen.",
    "",
    "The quick brown fox jumps over the lazy dog.",
]
REFS = [
    ["A cat runs in the park.\nIt chases birds."],  # newline-split reference, as CNN highlights
    ["The bridge reopens next week, officials say. Drivers expect less traffic.",
     "Traffic will improve once the bridge is reopened."],
    ["Nothing was generated."],
    # the best reference differs by metric: the first for ROUGE-1, the second for ROUGE-2
    ["dog lazy the over jumps fox brown quick the", "The quick brown fox."],
]
# The same texts split by hand, one sentence per line, for the independent computation.
PREDS_LINES = [
    "They chased the birds quickly!\nThe cats were running in the park.",
    "Traffic is expected to improve.\nOfficials said the bridge will reopen.",
    "",
    "The quick brown fox jumps over the lazy dog.",
]
REFS_LINES = [
    ["A cat runs in the park.\nIt chases birds."],
    ["The bridge reopens next week, officials say.\nDrivers expect less traffic.",
     "Traffic will improve once the bridge is reopened."],
    ["Nothing was generated."],
    ["dog lazy the over jumps fox brown quick the", "The quick brown fox."],
]


def _independent(pred_lines: str, ref_lines: list[str]) -> dict[str, float]:
    """rouge-score directly: best reference per metric, computed by hand."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_ref = [scorer.score(ref, pred_lines) for ref in ref_lines]
    return {k: max(s[k].fmeasure for s in per_ref) for k in ROUGE_TYPES}


def test_rouge_equals_rouge_scorer_with_stemmer_lsum_and_multi_reference() -> None:
    ours = rouge_scores(PREDS, REFS)
    expected = [_independent(p, r) for p, r in zip(PREDS_LINES, REFS_LINES)]
    for got, want in zip(ours, expected):
        assert got == pytest.approx(want, abs=1e-12)
    agg = aggregate(ours, n_bootstrap=200)
    for key in ROUGE_TYPES:
        assert agg[key]["f1"] == pytest.approx(np.mean([e[key] for e in expected]), abs=1e-12)
    # The choices are live: Lsum differs from L once sentences are split, the stemmer matters,
    # and each metric takes its own best reference.
    assert ours[0]["rougeLsum"] > ours[0]["rougeL"]
    assert ours[3]["rouge1"] == pytest.approx(1.0) and ours[3]["rouge2"] == pytest.approx(6 / 11)
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(REFS_LINES[0][0], PREDS_LINES[0])
    assert ours[0]["rouge1"] > plain["rouge1"].fmeasure
    assert ours[2] == {k: 0.0 for k in ROUGE_TYPES}


def test_rouge_lsum_on_unsplit_text_would_equal_rougel() -> None:
    """The classic mistake this module avoids: Lsum on unsplit text collapses to L."""
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    s = scorer.score(REFS[1][0], PREDS[1])
    assert s["rougeL"].fmeasure == s["rougeLsum"].fmeasure
    assert rouge_scores([PREDS[1]], [[REFS[1][0]]])[0]["rougeLsum"] != s["rougeLsum"].fmeasure


def test_rouge_scores_rejects_bad_references() -> None:
    with pytest.raises(EvaluationError):
        rouge_scores(["a"], [[]])
    with pytest.raises(EvaluationError):
        rouge_scores(["a", "b"], [["a"]])
    with pytest.raises(EvaluationError):
        rouge_scores(["a"], ["a"])  # type: ignore[list-item]


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_brackets_mean_is_seeded_and_has_the_right_width() -> None:
    values = np.random.default_rng(1).uniform(0, 1, 400)
    low, high = bootstrap_ci(values, n_bootstrap=2000, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, n_bootstrap=2000, seed=3)
    assert (low, high) != bootstrap_ci(values, n_bootstrap=2000, seed=4)
    normal = 2 * 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert high - low == pytest.approx(normal, rel=0.15)
    assert bootstrap_ci([0.3] * 10) == (pytest.approx(0.3), pytest.approx(0.3))
    assert bootstrap_ci([0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    narrow = bootstrap_ci(values, ci_level=0.5)
    assert low < narrow[0] < narrow[1] < high
    with pytest.raises(StatsError):
        bootstrap_ci([])


# ---------------------------------------------------------------- generation

DOCS = ["The council voted on Monday to close the old bridge for repairs.",
        "Scientists found water on a distant moon, a discovery that could change how we search for "
        "life in the solar system and beyond.",
        "Rain.",
        "The team won the final after extra time, and fans celebrated in the streets of the city all night."]


def _prompts(tokenizer, docs=DOCS) -> list:  # type: ignore[no-untyped-def]
    return [encode(tokenizer, Example(f"d{i}", d, ("x",), "test"), max_tokens=128, with_summary=False)
            for i, d in enumerate(docs)]


def _greedy_reference(model, ids: list[int], steps: int, eos: set[int]) -> list[int]:  # type: ignore[no-untyped-def]
    """One sequence, no padding, no KV cache, full forward each step: the ground truth."""
    seq, out = list(ids), []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            seq.append(token)
    return out


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma3"])
def test_left_padded_batch_equals_unpadded_one_by_one(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_model_dirs[fam]))
    prompts = _prompts(loaded.tokenizer)
    assert len({len(p.input_ids) for p in prompts}) == len(prompts)  # really padded
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    batched = generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, eos_ids=[])
    for prompt, got in zip(prompts, batched):
        want = _greedy_reference(loaded.model, prompt.input_ids, 12, set())
        assert got.new_tokens == 12 and got.stop_reason == "length"
        assert got.text == loaded.tokenizer.decode(want, skip_special_tokens=True).strip()
    # token for token, not only text: generate once more and compare ids directly
    single = [generate_summaries(loaded.model, loaded.tokenizer, [p], cfg, eos_ids=[])[0] for p in prompts]
    assert [g.text for g in single] == [g.text for g in batched]


def _ids_batched(loaded, prompts, cfg, eos):  # type: ignore[no-untyped-def]
    """Raw generated ids through the same path, to check token-level equality."""
    captured = {}
    original = loaded.model.generate

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        captured["ids"] = out[:, kwargs["input_ids"].shape[1]:].tolist()
        return out

    loaded.model.generate = spy
    try:
        generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, eos_ids=eos)
    finally:
        del loaded.model.generate
    return captured["ids"]


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_batched_token_ids_equal_reference_and_eos_stops_each_row(fam: str, tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_model_dirs[fam]))
    prompts = _prompts(loaded.tokenizer)
    cfg = GenerationConfig(max_new_tokens=10)
    ids = _ids_batched(loaded, prompts, cfg, [])
    refs = [_greedy_reference(loaded.model, p.input_ids, 10, set()) for p in prompts]
    assert ids == refs
    # Make row 1's 4th generated token the EOS: row 1 stops there, the others are unchanged
    # up to their own first occurrence of that token.
    eos = refs[1][3]
    first = refs[1].index(eos)
    outs = generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, eos_ids=[eos])
    assert outs[1].stop_reason == "eos" and outs[1].new_tokens == first + 1
    assert outs[1].text == loaded.tokenizer.decode(refs[1][:first], skip_special_tokens=True).strip()
    for out, ref in zip(outs, refs):
        cut = ref.index(eos) if eos in ref else len(ref)
        assert out.text == loaded.tokenizer.decode(ref[:cut], skip_special_tokens=True).strip()


def test_text_stop_and_beam_search(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(tiny_model_dirs["llama"]))
    prompts = _prompts(loaded.tokenizer)[:2]
    free = generate_summaries(loaded.model, loaded.tokenizer, prompts, GenerationConfig(max_new_tokens=16), [])
    text = free[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    stopped = generate_summaries(loaded.model, loaded.tokenizer, prompts,
                                 GenerationConfig(max_new_tokens=16, stop=(stop,)), [])
    assert stopped[0].stop_reason == "stop" and stopped[0].new_tokens < 16
    assert stopped[0].text == text[:text.index(stop)].strip()
    if stop not in free[1].text:
        assert stopped[1].text == free[1].text
    beams = generate_summaries(loaded.model, loaded.tokenizer, prompts,
                               GenerationConfig(max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2), [])
    assert len(beams) == 2 and all(b.new_tokens <= 8 for b in beams)
    assert beams == generate_summaries(loaded.model, loaded.tokenizer, prompts,
                                       GenerationConfig(max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2), [])


def test_cut_at_stop_skips_leading_whitespace() -> None:
    assert cut_at_stop("\n\nA summary.\n\nQuestion: what", ["\n\n"]) == ("A summary.", True)
    assert cut_at_stop(" no stop here", ["\n\n"]) == ("no stop here", False)


def test_model_generation_config_is_ignored(tiny_model_dirs: dict[str, Path]) -> None:
    """A folder's generation_config.json asking for sampling must not change the summaries."""
    loaded = load_model(str(tiny_model_dirs["gpt2"]))
    prompts = _prompts(loaded.tokenizer)[:2]
    cfg = GenerationConfig(max_new_tokens=8)
    plain = generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, [])
    loaded.model.generation_config.do_sample = True
    loaded.model.generation_config.temperature = 5.0
    loaded.model.generation_config.repetition_penalty = 3.0
    assert generate_summaries(loaded.model, loaded.tokenizer, prompts, cfg, []) == plain


# ---------------------------------------------------------------- evaluate and outputs

def run_evaluate(model: object, data: DataConfig, gen: GenerationConfig, out: Path, *, n_bootstrap: int = 1000,
                 overwrite: bool = False) -> dict:
    """``sc.evaluate`` quietly into ``out``; the summary (what rouge.json holds)."""
    return sc.evaluate(model, data, EvaluationConfig(generation=gen, n_bootstrap=n_bootstrap),  # type: ignore[arg-type]
                       runtime=sc.Runtime(progress=False), out=out, resume=not overwrite).summary


def _write_data(path: Path, n: int = 5) -> Path:
    rows = []
    with gzip.open(SHARED_DATA / "scitldr" / "test.jsonl.gz", "rt", encoding="utf-8") as fh:
        for _ in range(n):
            r = json.loads(next(fh))
            rows.append({"paper_id": r["paper_id"], "source": r["source"][:3], "target": r["target"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_run_evaluate_outputs_provenance_and_resume(tmp_path: Path, tiny_model_dirs: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_data(tmp_path / "d.jsonl")
    cfg = DataConfig(str(data), max_tokens=96, n_docs=3)
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    out = tmp_path / "ev"
    result = run_evaluate(str(tiny_model_dirs["gpt2"]), cfg, gen, out, n_bootstrap=100)
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert len(records[0]["references"]) > 1  # SciTLDR test: several references
    assert [r["scores"] for r in records] == rouge_scores([r["prediction"] for r in records],
                                                          [r["references"] for r in records])
    for r in records:
        assert set(r) >= {"doc_id", "prediction", "references", "scores", "stop_reason", "new_tokens"}
    saved = json.loads((out / "rouge.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n"] == 3 and saved["summaries_per_s"] > 0
    for key in ROUGE_TYPES:
        agg = saved[key]
        assert agg["f1"] == pytest.approx(np.mean([r["scores"][key] for r in records]))
        assert agg["ci_low"] <= agg["f1"] <= agg["ci_high"]
    assert saved["generation"]["max_new_tokens"] == 6 and saved["generation"]["decoding"] == "greedy"
    prov = saved["provenance"]
    assert prov["models"][0]["weights_sha256"] and prov["data"]["sha256"]
    assert prov["config"]["generation"]["batch_size"] == 2 and prov["config"]["data"]["n_docs"] == 3
    assert prov["versions"]["rouge-score"] != "not installed"

    # Rerun: nothing regenerated; a longer run generates only the new documents.
    calls: list[int] = []
    real = ev_run.generate_summaries

    def counting(model, tokenizer, prompts, cfg, eos_ids):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, cfg, eos_ids)

    monkeypatch.setattr(ev_run, "generate_summaries", counting)
    again = run_evaluate(str(tiny_model_dirs["gpt2"]), cfg, gen, out, n_bootstrap=100)
    assert calls == [] and again["rouge1"] == result["rouge1"]
    longer = DataConfig(str(data), max_tokens=96, n_docs=5)
    assert run_evaluate(str(tiny_model_dirs["gpt2"]), longer, gen, out, n_bootstrap=100)["n"] == 5
    assert calls == [2]
    # A cut last line (killed mid-write) is dropped and regenerated.
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert run_evaluate(str(tiny_model_dirs["gpt2"]), longer, gen, out, n_bootstrap=100)["n"] == 5
    assert calls == [2, 1]
    # Another generation config must not mix with these predictions.
    with pytest.raises(EvaluationError, match="different"):
        run_evaluate(str(tiny_model_dirs["gpt2"]), cfg, GenerationConfig(max_new_tokens=7), out)
    assert run_evaluate(str(tiny_model_dirs["gpt2"]), cfg, GenerationConfig(max_new_tokens=7), out,
                        overwrite=True, n_bootstrap=100)["n"] == 3


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_run_evaluate_errors(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    data = _write_data(tmp_path / "d.jsonl", 2)
    with pytest.raises(EvaluationError, match="summary"):
        run_evaluate(str(tiny_model_dirs["gpt2"]), DataConfig(str(data), template="{text}"),
                     GenerationConfig(), tmp_path / "a")
    with pytest.raises(EvaluationError, match="positions"):  # GPT-2 tiny: 256 learned positions
        run_evaluate(str(tiny_model_dirs["gpt2"]), DataConfig(str(data), max_tokens=200),
                     GenerationConfig(max_new_tokens=250), tmp_path / "b")
    with pytest.raises(sc.ConfigError, match="batch_size: must be >= 1, got 0"):
        GenerationConfig(batch_size=0)


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_generation_past_the_context_is_refused_for_rope_models_too(tmp_path: Path,
                                                                   tiny_model_dirs: dict[str, Path]) -> None:
    """One position rule for every family: LLaMA tiny (RoPE, 1024 positions) is refused like GPT-2, not warned about."""
    data = DataConfig(str(_write_data(tmp_path / "d.jsonl", 2)), max_tokens=200)
    with pytest.raises(EvaluationError, match=r"the longest prompt plus `max_new_tokens` \((\d+) tokens\) exceeds the "
                                              r"model's 1024 positions; lower `max_tokens` or `max_new_tokens`"):
        run_evaluate(str(tiny_model_dirs["llama"]), data, GenerationConfig(max_new_tokens=1000), tmp_path / "a")
    assert not (tmp_path / "a" / "predictions.jsonl").exists()


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_cli_end_to_end(tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_data(tmp_path / "d.jsonl", 3)
    out = tmp_path / "cli"
    code = main(["evaluate", "--model", str(tiny_model_dirs["llama"]), "--data", str(data), "--n-docs", "3",
                 "--max-tokens", "96", "--max-new-tokens", "5", "--batch-size", "2", "--stop", "\\n\\n",
                 "--bootstrap", "50", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "rougeLsum" in printed and "summaries/s" in printed
    saved = json.loads((out / "rouge.json").read_text())
    assert saved["n"] == 3 and saved["generation"]["stop"] == ["\n\n"]
    assert saved["scoring"]["ci"]["n_bootstrap"] == 50
    assert main(["evaluate", "--model", str(tiny_model_dirs["llama"]), "--data", str(data),
                 "--template", "{text}", "--out", str(tmp_path / "bad")]) == 2
    assert "needs a template" in capsys.readouterr().err


@pytest.mark.real  # reads the real data sets of ../shared/data
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_adapter_equals_lora_model(fam: str, tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    """--adapter (merged by finetune.load_adapter) generates what the unmerged LoRA model generates."""
    from sumcircuit.data import load_examples
    from sumcircuit.lora import inject_lora

    base = load_model(str(tiny_model_dirs[fam]))
    peft_model = inject_lora(base.model, base.adapter, list(range(base.adapter.n_layers)), rank=4, alpha=8)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # B = 0 at init would change nothing
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    peft_model.eval()
    data = _write_data(tmp_path / "d.jsonl", 3)
    cfg, gen = DataConfig(str(data), max_tokens=96), GenerationConfig(max_new_tokens=6)
    merged = load_adapter(load_model(str(tiny_model_dirs[fam])), tmp_path / "adapter")
    result = run_evaluate(merged, cfg, gen, tmp_path / "a", n_bootstrap=20)
    got = [json.loads(x)["prediction"] for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    prompts = [encode(base.tokenizer, ex, cfg.template, cfg.max_tokens, with_summary=False,
                      summary_budget=gen.max_new_tokens) for ex in load_examples(cfg).examples]
    want = generate_summaries(peft_model, base.tokenizer, prompts, gen, eos_token_ids(base))
    assert got == [w.text for w in want]
    base_only = run_evaluate(str(tiny_model_dirs[fam]), cfg, gen, tmp_path / "b", n_bootstrap=20)
    base_preds = [json.loads(x)["prediction"] for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert got != base_preds  # the adapter was really applied
    model = result["provenance"]["models"][0]
    assert model["kind"] == "adapter" and model["source_sha256"]  # the adapter's weights, cited
    assert result["provenance"]["run_id"] != base_only["provenance"]["run_id"]


# ---------------------------------------------------------------- real model


@pytest.mark.real
def test_real_smollm2_scitldr(tmp_path: Path, smollm2) -> None:  # type: ignore[no-untyped-def]
    cfg = DataConfig(str(SHARED_DATA / "scitldr" / "test"), max_tokens=512, n_docs=3)
    result = run_evaluate(smollm2, cfg, GenerationConfig(max_new_tokens=24, batch_size=3), tmp_path,
                          n_bootstrap=200)
    records = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert result["n"] == 3 and all(r["prediction"] for r in records)
    assert all(len(r["references"]) >= 2 for r in records)
    assert 0.05 < result["rouge1"]["f1"] < 0.8  # a real model writes related text
    assert result["rouge1"]["f1"] >= result["rouge2"]["f1"]
    assert result["summaries_per_s"] > 0
    assert result["provenance"]["models"][0]["spec"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("n_docs", [16, 32])
def test_rouge_intervals_cover_at_the_sizes_studies_use(n_docs: int) -> None:
    """evaluate's ROUGE CI is the claims' studentized interval: >= 93% coverage of the true mean at 16 and 32 docs."""
    from sumcircuit.evaluation.rouge import aggregate

    rng = np.random.default_rng(n_docs)
    truth, hits, reps = 2 / (2 + 6), 0, 800
    for rep in range(reps):
        scores = rng.beta(2, 6, size=n_docs)  # bounded, skewed per-document F1, mean 0.25
        ci = aggregate([{"rouge1": float(x), "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0} for x in scores],
                       n_bootstrap=999, seed=rep)["rouge1"]
        hits += ci["ci_low"] <= truth <= ci["ci_high"]
    assert hits / reps >= 0.93, hits / reps
    one = aggregate([{"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2}])["rouge1"]
    assert one["f1"] == 0.3 and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])  # no interval from one
