"""The report renders from a run directory, escapes data text, and shows its figures in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sumcircuit.artifacts import atomic_write_csv, atomic_write_json
from sumcircuit.study.claims import evaluate_claims
from sumcircuit.study.report import build_report

EVIL = "<script>alert('x')</script>"


def _eval_dir(path: Path, scores: list[float], same_ids: bool = False) -> None:
    path.mkdir(parents=True)
    rows = [{"index": i, "doc_id": "d" if same_ids else f"d{i}", "prediction": EVIL, "references": ["r"],
             "scores": {"rouge1": s}} for i, s in enumerate(scores)]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = sum(scores) / len(scores)
    generation = {"max_new_tokens": 48, "stop_reasons": {"eos": 1, "stop": 0, "length": len(scores) - 1}}
    atomic_write_json(path / "rouge.json", {k: {"f1": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01}
                                            for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
                      | {"n": len(scores), "generation": generation})


def test_paired_claims_pair_by_position_not_by_repeated_ids(tmp_path: Path) -> None:
    from sumcircuit.study.evidence import per_example_rouge1, score_tables

    _eval_dir(tmp_path / "a", [0.1 * i for i in range(24)], same_ids=True)
    _eval_dir(tmp_path / "b", [0.05 * i for i in range(24)], same_ids=True)
    tables = score_tables({1: per_example_rouge1(tmp_path / "a")}, {1: per_example_rouge1(tmp_path / "b")})
    assert tables is not None
    a, b = tables
    assert a.shape == b.shape == (1, 24) and a[0, 5] == pytest.approx(0.5) and b[0, 5] == pytest.approx(0.25)


def test_score_tables_keep_the_seeds_and_documents_every_method_has() -> None:
    from sumcircuit.study.evidence import score_tables

    a = {1: {0: 0.1, 1: 0.2, 2: 0.3}, 2: {0: 0.4, 1: 0.5, 2: 0.6}, 3: {0: 0.0, 1: 0.0}}
    b = {1: {0: 1.0, 1: 2.0, 2: 3.0}, 2: {1: 5.0, 2: 6.0}}
    tables = score_tables(a, b)
    assert tables is not None
    assert tables[0].tolist() == [[0.2, 0.3], [0.5, 0.6]] and tables[1].tolist() == [[2.0, 3.0], [5.0, 6.0]]
    assert score_tables(a, {4: {0: 1.0, 1: 1.0}}) is None  # no seed in common


def make_run(run: Path) -> Path:
    n_layers, n_heads = 4, 3
    analysis = run / "analysis"
    heads = [{"layer": l, "head": h, "entropy_base": 2.0, "entropy_tuned": 2.0 - 0.1 * (l + h),
              "entropy_delta": -0.1 * (l + h) + 0.15, "kl_base_tuned": 0.01 * (l + 1), "kl_tuned_base": 0.01,
              "rows": 100} for l in range(n_layers) for h in range(n_heads)]
    atomic_write_csv(analysis / "heads.csv", heads, list(heads[0]))
    layers = [{"layer": l, "kl_base_tuned": 0.01 * (l + 1), "actmag_rel_change": 0.02 * l, "cka": 0.99,
               "weight_change_attn": 0.001, "weight_change_mlp": 0.002} for l in range(n_layers)]
    atomic_write_csv(analysis / "layers.csv", layers, list(layers[0]))
    save_file({"neurons.standardized_change": torch.randn(n_layers, 16),
               "neurons.sign_flip": torch.zeros(n_layers, 16)},
              str(analysis / "stats.safetensors"))
    atomic_write_json(analysis / "summary.json", {"n_layers": n_layers, "definitions": {"neuron_threshold": 0.5},
                                                  "share_heads_entropy_decreased": 0.58,
                                                  "share_heads_entropy_decreased_ci": [0.41, 0.75]})
    atomic_write_json(run / "circuit" / "circuit.json", {"layers": [3, 2, 1], "score": "kl",
                                                         "stability": {"3": 1.0, "2": 0.9, "1": 0.7}})
    for name, params, scores in (("lora_all_s1", 8000, [0.20] * 30), ("targeted_s1", 6000, [0.25] * 30),
                                 ("random1_s1", 6000, [0.24] * 30)):
        (run / name).mkdir(parents=True)
        atomic_write_json(run / name / "train_summary.json", {
            "trainable_params": params, "epochs_to_best": 1.0, "best_step": 4, "steps": 8, "layers": [1, 2, 3]})
        (run / name / "train_log.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 3 - 0.1 * s}) + "\n" for s in range(1, 9))
            + json.dumps({"step": 4, "val_loss": 2.5}) + "\n")
        _eval_dir(run / name / "eval", scores)
    return run


def test_report_sections_and_escaping(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    page = build_report(run).read_text()
    assert EVIL not in page  # nothing from the data is emitted raw
    assert page.count("<img") >= 4 and "data:image/png;base64," in page
    assert "Paper claims vs this run" in page and "did not run in this study" in page  # ablation/patch missing
    assert "http://" not in page and "https://" not in page  # viewable offline
    assert "hit the step cap after its best checkpoint" in page  # best step 4 of 8, no early stop
    assert "87 of 90 generated summaries stopped at max_new_tokens = 48" in page and "29 of 30" in page
    assert page.count("<figcaption>") >= 4 and "Example summaries" in page and "&lt;script&gt;" in page
    verdicts = {c.claim: c.verdict for c in evaluate_claims(run)}
    assert verdicts["62% of heads become more focused (lower attention entropy) after fine-tuning"] == \
        "inconclusive"  # CI 41%-75% straddles 50%
    # 0.25 vs 0.20 on every document of one seed: identical differences, one seed: no evidence either way
    assert verdicts["Targeted LoRA beats LoRA on all layers on ROUGE-1"] == "inconclusive"
    assert "Verdicts limited by the sample:</b> Targeted LoRA beats LoRA on all layers on ROUGE-1: 1 document" \
        not in page and "inconclusive (zero-width interval)" in page
    assert verdicts["Targeted LoRA trains 75% fewer parameters than LoRA on all layers"] == \
        "contradicted"  # 6000 vs 8000 is 25% fewer
    assert verdicts["The most-changed layers (by attention KL) are 2, 3 and 5"] == "not applicable"  # 4 layers
    assert verdicts["(extension) Ablating the circuit hurts more than ablating random layers"] == "not run"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian package 'chromium' not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = build_report(make_run(tmp_path / "run"))
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
              "document.title='loaded:'+imgs.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+imgs.length;});"
              "</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=900).stdout
    match = re.search(r"<title>loaded:(\d+)/(\d+)</title>", dom)
    assert match, dom[:500]
    loaded, total = map(int, match.groups())
    assert total >= 4 and loaded == total
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=900)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_report_on_a_single_output_folder_labels_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report` on one evaluate folder: its own model named from provenance, no study claims, no guessed pair."""
    from sumcircuit.cli import main

    folder = tmp_path / "eval"
    _eval_dir(folder, [0.2, 0.3, 0.4])
    rouge = json.loads((folder / "rouge.json").read_text())
    atomic_write_json(folder / "rouge.json", {**rouge, "provenance": {"models": [{"spec": "my-tuned-model"}]}})
    assert main(["report", str(folder), "--out", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "ROUGE of my-tuned-model" in page and "single <code>evaluation</code> output" in page
    assert "Paper claims vs this run" not in page and "full fine-tune" not in page
    assert EVIL not in page and "&lt;script&gt;" in page  # example summaries shown, escaped
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a reproduce study nor a finished sumcircuit output" in capsys.readouterr().err


@pytest.mark.parametrize("content, needle", [
    ("{not json", "reproduce.json: damaged"), ("", "reproduce.json: damaged"), ("[1, 2]", "expected a JSON object"),
    ('{"study": 5}', "field 'study' should be an object"), ('{"stages": []}', "field 'stages' should be an object"),
    ("[" * 100_000 + "]" * 100_000, "reproduce.json: damaged")])
def test_report_on_a_damaged_manifest_names_it(content: str, needle: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import cli_fails

    run = make_run(tmp_path / "run")
    (run / "reproduce.json").write_text(content)
    cli_fails(["report", str(run)], capsys, needle)
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("file, content, needle", [
    ("analysis/heads.csv", "a,b\n1,2\n", "heads.csv: column(s) layer, head, entropy_delta, kl_base_tuned missing"),
    ("lora_all_s1/eval/rouge.json", "", "rouge.json: damaged"),
    ("circuit/circuit.json", '"layers"', "circuit.json: expected a JSON object"),
    ("lora_all_s1/train_summary.json", '{"layers": [1], "trainable_params": {"a": 1}}', "cannot build the report")])
def test_report_on_damaged_stage_files_names_them(file: str, content: str, needle: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import cli_fails

    run = make_run(tmp_path / "run")
    (run / file).write_text(content)
    cli_fails(["report", str(run)], capsys, needle)


def test_report_renders_an_unfinished_study_with_a_banner(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    atomic_write_json(run / "INCOMPLETE.json", {"command": "reproduce", "pid": 4242, "before": []})
    atomic_write_json(run / "targeted_s1" / "eval" / "INCOMPLETE.json", {"command": "evaluate", "pid": 4242})
    page = build_report(run).read_text()
    assert "This study has not finished." in page and "pid 4242" in page
    assert "Differential analysis" in page and "Paper claims vs this run" in page  # the finished stages
    verdicts = {c.claim: c.verdict for c in evaluate_claims(run)}
    assert verdicts["Targeted LoRA beats LoRA on all layers on ROUGE-1"] == "not run"  # its run did not finish


def test_head_patching_figure_has_a_row_per_patched_layer() -> None:
    from sumcircuit.plots import patching_figure

    rows = [{"direction": "denoise", "kind": "attn_head", "layer": layer, "head": head, "effect": 0.1 * head,
             "recovery_ci_low": 0.0, "recovery_ci_high": 0.2} for layer in (3, 7) for head in range(4)]
    rows.append({"direction": "denoise", "kind": "all", "layer": -1, "head": -1, "effect": 0.9,
                 "recovery_ci_low": 0.8, "recovery_ci_high": 1.0})
    fig = patching_figure(rows, granularity="head", n_layers=30, n_heads=4)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (2, 4)  # layers 3 and 7 only, every cell filled
    assert [t.get_text() for t in ax.get_yticklabels()] == ["3", "7"]
    assert not ax.lines and "all 8 heads at once: 0.90" in ax.get_title()  # no effect line on a layer axis
