"""The whole study runs end to end on a tiny model, and reruns skip finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import sumcircuit as sc
from sumcircuit.reproduce import StudyConfig, run_study, stage_key

from helpers import CNNDM

TINY_HP = dict(lr=1e-3, batch_size=2, grad_accum=1, max_steps=2, eval_every=1, patience=3, val_fraction=0.3)
TINY = dict(train_docs=6, val_docs=3, eval_docs=3, analysis_docs=3, causal_docs=3, max_tokens=64,
            max_new_tokens=6, full=TINY_HP, lora=TINY_HP, targeted=TINY_HP, top_layers=1, top_heads=2,
            random_controls=3,
            eval_batch_size=3)


def _study(model: Path, **overrides: object) -> StudyConfig:
    return StudyConfig(model=str(model), data=str(CNNDM), seeds=(1, 2), overrides={**TINY, **overrides})


def test_stage_key_depends_on_config_and_upstream() -> None:
    assert stage_key({"a": 1}, {"x": "k"}) == stage_key({"a": 1}, {"x": "k"})
    assert stage_key({"a": 1}, {"x": "k"}) != stage_key({"a": 2}, {"x": "k"})
    assert stage_key({"a": 1}, {"x": "k"}) != stage_key({"a": 1}, {"x": "other"})


def test_reproduce_end_to_end_and_resume(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    run = tmp_path / "run"
    first = run_study(_study(tiny_model_dirs["llama"]), run).summary
    expected = {"zeroshot/eval", "full", "full/eval", "analysis", "circuit", "lora_all", "targeted",
                "lora_all/eval", "targeted/eval", "random_s1", "random_s1/eval", "random_s2", "random_s2/eval",
                "ablate", "patch", "attribution", "circuit_attribution", "targeted_attribution",
                "targeted_attribution/eval"}
    assert set(first["stages"]) == expected and first["skipped"] == []
    for name in expected:
        assert json.loads((run / name / "stage.json").read_text())["key"] == first["stages"][name]
    circuit = json.loads((run / "circuit" / "circuit.json").read_text())
    targeted = json.loads((run / "targeted" / "train_summary.json").read_text())
    assert targeted["layers"] == circuit["layers"] and len(circuit["layers"]) == 1
    by_cause = json.loads((run / "circuit_attribution" / "circuit.json").read_text())
    assert by_cause["score"] == "attribution" and len(by_cause["heads"]) == TINY["top_heads"]
    assert json.loads((run / "targeted_attribution" / "train_summary.json").read_text())["layers"] == by_cause["layers"]
    randoms = [json.loads((run / f"random_s{s}" / "train_summary.json").read_text())["layers"] for s in (1, 2)]
    assert all(len(layers) == 1 for layers in randoms)
    stage_cfg = {n: json.loads((run / n / "stage.json").read_text())["config"]
                 for n in ("targeted", "random_s1", "random_s2")}
    # controls differ from the targeted run only in the layers they draw
    assert stage_cfg["targeted"]["seed"] == stage_cfg["random_s1"]["seed"] == stage_cfg["random_s2"]["seed"]
    assert (stage_cfg["random_s1"]["layer_seed"], stage_cfg["random_s2"]["layer_seed"]) == (1, 2)
    assert stage_cfg["targeted"]["val"] is None  # validation is held out of training, not the eval split
    page = (run / "report.html").read_text()
    assert "Paper claims vs this run" in page and page.count("<img") >= 4

    again = run_study(_study(tiny_model_dirs["llama"]), run).summary
    assert sorted(again["skipped"]) == sorted(expected) and again["stages"] == first["stages"]

    _check_load_run(run, tmp_path)
    changed = run_study(_study(tiny_model_dirs["llama"], targeted={**TINY_HP, "lr": 5e-4}), run).summary
    rerun = set(expected) - set(changed["skipped"])
    assert rerun == {"targeted", "targeted/eval", "random_s1", "random_s1/eval", "random_s2", "random_s2/eval",
                     "targeted_attribution", "targeted_attribution/eval"}
    assert (run / ".stale").is_dir()

    fewer = StudyConfig(model=str(tiny_model_dirs["llama"]), data=str(CNNDM), seeds=(1,),
                        overrides={**TINY, "targeted": {**TINY_HP, "lr": 5e-4}})
    run_study(fewer, run)  # a rerun with fewer seeds: random_s2 is no longer part of the study
    assert not (run / "random_s2").exists() and any(p.name.startswith("random_s2-") for p in (run / ".stale").iterdir())
    assert "random_s2" not in (run / "report.html").read_text()


def _check_load_run(run: Path, tmp_path: Path) -> None:
    """load_run reads every output kind back into the API's result type; save() rewrites the same tables."""
    study = sc.load_run(run)
    assert isinstance(study, sc.StudyResult)
    claims = study.to_pandas()
    assert len(claims) == 8 and {"claim", "verdict"} <= set(claims.columns)
    cause = claims[claims["claim"].str.contains("by cause")].iloc[0]
    assert "attribution layers" in cause["this_run"] and "over 3 documents" in cause["evidence"]
    kinds = {"analysis": sc.AnalysisResult, "full": sc.FinetuneResult, "full/eval": sc.EvaluationResult,
             "ablate": sc.AblationResult, "patch": sc.PatchResult, "attribution": sc.AttributionResult}
    for stage, cls in kinds.items():
        result = study.stage(stage)
        assert isinstance(result, cls), stage
        table = result.to_pandas()
        assert len(table) > 0, stage
        copy = result.save(tmp_path / "copies" / stage.replace("/", "_"))
        again = sc.load_run(copy)
        assert type(again) is cls
        pd.testing.assert_frame_equal(again.to_pandas(), table, check_dtype=False)
    heads = study.stage("analysis").to_pandas()
    assert {"layer", "head", "entropy_base", "kl_base_tuned"} <= set(heads.columns)
    assert heads["kl_base_tuned"].dtype.kind == "f"  # numbers, not the CSV's strings
    circuit = sc.load_run(run / "circuit" / "circuit.json")
    assert isinstance(circuit, sc.Circuit) and circuit.layers == sc.read_circuit(run / "circuit" / "circuit.json").layers


def test_cli_reproduce_with_overrides(tmp_path: Path, tiny_model_dirs: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`reproduce` through the CLI, sized down with --set; a bad field is a one-line error."""
    from sumcircuit.cli import main

    sets = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "random_controls": 2}.items()]
    args = ["reproduce", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM), "--seeds", "1"]
    assert main([*args, *(a for s in sets for a in ("--set", s)), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file() and '"stages"' in capsys.readouterr().out
    assert main([*args, "--set", "nope=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset field(s) nope" in capsys.readouterr().err
