"""The whole study runs end to end on a tiny model, and reruns skip finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import sumcircuit as sc
from sumcircuit.study import CLAIMS, StudyConfig, run_study, stage_key

from helpers import CNNDM, TINY_HP
from helpers import TINY_STUDY as TINY


def _study(model: Path, **overrides: object) -> StudyConfig:
    return StudyConfig(model=str(model), data=str(CNNDM), seeds=(1, 2), overrides={**TINY, **overrides})


def test_stage_key_depends_on_config_and_upstream() -> None:
    assert stage_key({"a": 1}, {"x": "k"}) == stage_key({"a": 1}, {"x": "k"})
    assert stage_key({"a": 1}, {"x": "k"}) != stage_key({"a": 2}, {"x": "k"})
    assert stage_key({"a": 1}, {"x": "k"}) != stage_key({"a": 1}, {"x": "other"})


def _stages(seeds: tuple[int, ...], n_random: int) -> set[str]:
    names = {"zeroshot/eval", "analysis", "circuit", "attribution", "circuit_attribution", "ablate", "patch",
             "faithfulness"}
    for seed in seeds:
        for method in ("full", "lora_all", "targeted", "targeted_attribution",
                       *(f"random{k}" for k in range(1, n_random + 1))):
            names |= {f"{method}_s{seed}", f"{method}_s{seed}/eval"}
    return names


def test_random_control_sets_avoid_the_circuits_and_are_distinct() -> None:
    from sumcircuit.study import random_control_sets

    sets = random_control_sets(30, 3, 5, exclude=[2, 3, 5, 21, 22], seed=1)
    assert len(sets) == 5 and len({tuple(s) for s in sets}) == 5
    assert all(len(s) == 3 and not set(s) & {2, 3, 5, 21, 22} for s in sets)
    assert sets == random_control_sets(30, 3, 5, exclude=[2, 3, 5, 21, 22], seed=1)
    assert random_control_sets(3, 1, 5, exclude=[0], seed=0) in ([[1], [2]], [[2], [1]])  # only two possible
    assert len(random_control_sets(3, 2, 2, exclude=[0, 1], seed=0)) == 2  # too few outside: drawn from all


def test_reproduce_end_to_end_and_resume(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    run = tmp_path / "run"
    first = run_study(_study(tiny_model_dirs["llama"]), run).summary
    controls = first["random_controls"]
    n_random = len(controls["layers"])
    expected = _stages((1, 2), n_random)
    assert n_random >= 1 and set(first["stages"]) == expected and first["skipped"] == []
    for name in expected:
        assert json.loads((run / name / "stage.json").read_text())["key"] == first["stages"][name]
    circuit = json.loads((run / "circuit" / "circuit.json").read_text())
    by_cause = json.loads((run / "circuit_attribution" / "circuit.json").read_text())
    assert by_cause["score"] == "attribution" and len(by_cause["heads"]) == TINY["top_heads"]
    assert controls["excluded"] == sorted(set(circuit["layers"]) | set(by_cause["layers"]))
    for seed in (1, 2):  # every method trained once per seed, with that seed
        targeted = json.loads((run / f"targeted_s{seed}" / "train_summary.json").read_text())
        assert targeted["layers"] == circuit["layers"] and len(circuit["layers"]) == 1
        assert json.loads((run / f"targeted_attribution_s{seed}" / "train_summary.json").read_text())["layers"] == \
            by_cause["layers"]
        for method in ("full", "lora_all", "targeted", "random1"):
            assert json.loads((run / f"{method}_s{seed}" / "stage.json").read_text())["config"]["seed"] == seed
        randoms = [json.loads((run / f"random{k}_s{seed}" / "train_summary.json").read_text())
                   for k in range(1, n_random + 1)]
        assert [r["layers"] for r in randoms] == controls["layers"]
        assert {r["trainable_params"] for r in randoms} == {targeted["trainable_params"]}  # parameter-matched
    assert json.loads((run / "targeted_s1" / "stage.json").read_text())["config"]["val"] is None  # held out of train
    page = (run / "report.html").read_text()
    assert "Paper claims vs this run" in page and page.count("<img") >= 4
    # the report the study writes while it still holds its folder reads its own manifest
    assert "No reproduce.json" not in page and "training seeds</th><td>1, 2: full, LoRA-all" in page
    assert page.count("drawn outside the circuits&#x27; layers") >= 2  # the header and the random-sets claim
    claims = {c["claim"]: c for c in run_study(_study(tiny_model_dirs["llama"]), run).claims}
    rouge = claims["Targeted LoRA beats LoRA on all layers on ROUGE-1"]
    assert "3 documents x 2 training seeds" in rouge["evidence"]

    again = run_study(_study(tiny_model_dirs["llama"]), run).summary
    assert sorted(again["skipped"]) == sorted(expected) and again["stages"] == first["stages"]

    _check_load_run(run, tmp_path)
    changed = run_study(_study(tiny_model_dirs["llama"], targeted={**TINY_HP, "lr": 5e-4}), run).summary
    rerun = set(expected) - set(changed["skipped"])
    assert rerun == {n for n in expected if n.startswith(("targeted", "random"))}
    assert (run / ".stale").is_dir()

    # full fine-tunes on the first seed only: the later seeds' full runs leave, nothing else reruns
    first_only = run_study(_study(tiny_model_dirs["llama"], targeted={**TINY_HP, "lr": 5e-4}, full_seeds="first"),
                           run)
    assert set(first_only.summary["stages"]) == expected - {"full_s2", "full_s2/eval"}
    assert sorted(first_only.summary["skipped"]) == sorted(first_only.summary["stages"])
    page = (run / "report.html").read_text()
    assert not (run / "full_s2").exists() and "full_s2" not in page
    assert "1, 2: LoRA-all, both targeted runs" in page and "the full fine-tune on seed 1 only" in page
    assert {c["verdict"] for c in first_only.claims} - {"not run"}  # claims still judged from the LoRA runs
    with pytest.raises(sc.ConfigError, match="full_seeds: choose one of 'all', 'first', got 'some'"):
        _study(tiny_model_dirs["llama"], full_seeds="some")

    fewer = StudyConfig(model=str(tiny_model_dirs["llama"]), data=str(CNNDM), seeds=(1,),
                        overrides={**TINY, "targeted": {**TINY_HP, "lr": 5e-4}})
    run_study(fewer, run)  # a rerun with fewer seeds: the second seed's runs are no longer part of the study
    assert not (run / "random1_s2").exists() and any(p.name.startswith("random1_s2-") for p in (run / ".stale").iterdir())
    assert "_s2" not in (run / "report.html").read_text()


def _check_load_run(run: Path, tmp_path: Path) -> None:
    """load_run reads every output kind back into the API's result type; save() rewrites the same tables."""
    study = sc.load_run(run)
    assert isinstance(study, sc.StudyResult)
    claims = study.to_pandas()
    assert len(claims) == len(CLAIMS) and {"claim", "verdict"} <= set(claims.columns)
    cause = claims[claims["claim"].str.contains("by cause")].iloc[0]
    assert "attribution layers" in cause["this_run"] and "n = 3 documents x 2 training seeds" in cause["evidence"]
    kinds = {"analysis": sc.AnalysisResult, "full_s1": sc.FinetuneResult, "full_s1/eval": sc.EvaluationResult,
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
    assert "--set: unknown preset field(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is made
    from helpers import cli_fails, snapshot

    finished = snapshot(tmp_path / "run")
    refusals = [(["--set", "nope=1"], "--set: unknown preset field(s) nope"),
                (["--set", "top_heads=1000"], "top_heads: 1000 is more than the"),
                (["--set", "top_layers=99"], "top_layers: 99 is more than the"),
                (["--set", 'full="rm -rf /"'], "--set"),
                (["--set", 'train_docs="abc"'], "train_docs"),
                (["--set", "random_sets=-1"], "random_sets"),
                (["--seeds", "-1"], "--seeds")]
    for extra, needle in refusals:
        cli_fails([*args[:-2], "--seeds", "1", *(a for s in sets for a in ("--set", s)), *extra,
                   "--out", str(tmp_path / "run")], capsys, needle)
        assert snapshot(tmp_path / "run") == finished, extra  # not even INCOMPLETE.json
    sc.load_run(tmp_path / "run")
