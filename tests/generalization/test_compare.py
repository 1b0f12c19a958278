"""``compare``: planted circuits are found, unrelated ones are not, the control difference is exact on a tiny
pair, and the command works end to end on tiny studies (with one-line errors for bad runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import sumcircuit as sc
from sumcircuit.generalization.control import control_claims, specific_change
from sumcircuit.generalization.profile import CompareError
from sumcircuit.generalization.run import compare_profiles
from sumcircuit.study.verdicts import MIN_RATIO_DOCS

from helpers import CNNDM, cli_fails, run_cli, snapshot, synthetic_run

CFG = sc.CompareConfig(n_permutations=4000, n_bootstrap=300)


def _row(result: sc.CompareResult, circuit: str, level: str) -> dict:
    return next(r for r in result.rows["overlap"] if r["circuit"] == circuit and r["level"] == level)


def test_a_planted_shared_circuit_is_detected() -> None:
    result = compare_profiles([synthetic_run("a", [3, 7, 11], 1), synthetic_run("b", [3, 7, 11], 2)], CFG)
    layers, heads = _row(result, "kl", "layers"), _row(result, "kl", "heads")
    assert layers["jaccard"] == 1.0 and layers["p_value"] < 0.01 and layers["spearman_p"] < 0.05
    assert layers["null_mean"] == pytest.approx(3 * 3 / (16 * 5), abs=0.03)  # E[J] of two random 3-sets of 16
    assert layers["jaccard_ci_low"] > 0.3 and heads["p_value"] < 0.01
    assert result.summary["matrices"]["kl/layers"]["jaccard"][0][1] == 1.0


def test_unrelated_circuits_are_not_called_shared() -> None:
    result = compare_profiles([synthetic_run("a", [3, 7, 11], 1), synthetic_run("b", [1, 9, 14], 2)], CFG)
    layers = _row(result, "kl", "layers")
    assert layers["jaccard"] == 0.0 and layers["p_value"] == 1.0 and layers["spearman_p"] > 0.05


def test_models_of_different_depth_compare_at_relative_depth() -> None:
    deep = synthetic_run("deep", [10, 11, 12], 1, n_layers=30, n_heads=4, model="big")
    shallow = synthetic_run("shallow", [5, 6], 2, n_layers=16, n_heads=4, model="small")
    result = compare_profiles([deep, shallow], CFG)
    layers = _row(result, "kl", "layers")
    assert layers["basis"] == "relative depth (16 points)" and layers["n_items"] == 16
    assert layers["jaccard"] >= 0.5 and layers["p_value"] < 0.05  # layers 10-12 of 30 sit where 5-6 of 16 do
    assert not [r for r in result.rows["overlap"] if r["level"] == "heads"]  # heads only within one model
    with pytest.raises(CompareError, match="heads compare only runs of the same model"):
        compare_profiles([deep, shallow], CFG.replace(levels=("heads",)))


def test_control_difference_is_exact_on_a_tiny_pair(tiny_model_dirs: dict[str, Path]) -> None:
    """Control = the base itself: the change specific to summarization is then the summarization analysis's own
    KL and entropy change, per layer."""
    from helpers import perturbed

    base = sc.load_model(str(tiny_model_dirs["llama"]))
    tuned = perturbed(base, 0.3)
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=6, max_tokens=48)
    rt = sc.Runtime(progress=False)
    summ, ctrl = sc.analyze(base, tuned, data, runtime=rt), sc.analyze(base, base, data, runtime=rt)
    per_doc = [{k: v.double().numpy() for k, v in r.per_doc.items()} for r in (summ, ctrl)]
    assert np.abs(per_doc[1]["kl_base_tuned"]).max() < 1e-6  # base vs itself
    rows, head_rows, headline = specific_change(per_doc[0], per_doc[1], [1], n_bootstrap=200, seed=0,
                                                ci_level=0.95)
    layers = summ.to_pandas("layers")
    heads = summ.to_pandas("heads").set_index(["layer", "head"])
    for row in rows:
        assert row["kl_specific"] == pytest.approx(float(layers.loc[row["layer"], "kl_base_tuned"]), rel=1e-4, abs=1e-8)
        delta = float(heads.loc[row["layer"]]["entropy_delta"].mean())
        assert row["entropy_specific"] == pytest.approx(delta, rel=1e-4, abs=1e-7)
        assert row["kl_specific_ci_low"] <= row["kl_specific"] <= row["kl_specific_ci_high"]
    assert headline["circuit_kl_specific"]["mean"] == pytest.approx(rows[1]["kl_specific"], rel=1e-9)
    assert len(head_rows) == len(heads)
    for row in head_rows:  # per head: the analysis's own per-head KL and entropy change
        want = heads.loc[(row["layer"], row["head"])]
        assert row["kl_specific"] == pytest.approx(float(want["kl_base_tuned"]), rel=1e-4, abs=1e-8)
        assert row["entropy_specific"] == pytest.approx(float(want["entropy_delta"]), rel=1e-4, abs=1e-7)


def test_control_claims_need_their_documents() -> None:
    a = synthetic_run("a", [3], 1, n_docs=MIN_RATIO_DOCS)
    control = dict(a.per_doc, kl_base_tuned=a.per_doc["kl_base_tuned"] * 0.2,
                   entropy_tuned=a.per_doc["entropy_tuned"] + np.random.default_rng(0).normal(0.3, 0.1, (32, 16, 4)))
    # the control changes the circuit less and focuses attention less
    _, _, headline = specific_change(a.per_doc, control, [3], n_bootstrap=500, seed=0, ci_level=0.95)
    circuit, entropy = control_claims("a", headline)
    assert circuit.verdict == "supported" and entropy.verdict == "supported" and not circuit.limited_by
    few = synthetic_run("b", [3], 1, n_docs=8)
    fewer = dict(few.per_doc, kl_base_tuned=few.per_doc["kl_base_tuned"] * 0.2)
    circuit, _ = control_claims("b", specific_change(few.per_doc, fewer, [3], n_bootstrap=500, seed=0,
                                                     ci_level=0.95)[2])
    assert circuit.verdict == "inconclusive" and circuit.limited_by == "8 documents"
    backwards = dict(a.per_doc, kl_base_tuned=a.per_doc["kl_base_tuned"] * 3)  # the control changes it more
    circuit, _ = control_claims("a", specific_change(a.per_doc, backwards, [3], n_bootstrap=500, seed=0,
                                                     ci_level=0.95)[2])
    assert circuit.verdict == "contradicted"


# ---------------------------------------------------------------- end to end on tiny studies

HP = dict(lr=1e-3, batch_size=2, grad_accum=1, max_steps=2, eval_every=1, patience=3, val_fraction=0.3)
TINY = dict(train_docs=6, val_docs=3, eval_docs=3, analysis_docs=4, causal_docs=3, max_tokens=64, max_new_tokens=6,
            full=HP, lora=HP, targeted=HP, top_layers=1, top_heads=2, random_controls=3, random_sets=1,
            eval_batch_size=3)


@pytest.fixture(scope="module")
def tiny_studies(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two generalize-cpu studies of one tiny model; the second trains the first's circuit (transfer)."""
    root = tmp_path_factory.mktemp("studies")
    model = str(tiny_model_dirs["llama"])
    sc.run_study(sc.StudyConfig(model=model, data=str(CNNDM), preset="generalize-cpu", seeds=(1, 2),
                                overrides=TINY), root / "news")
    sc.run_study(sc.StudyConfig(model=model, data=str(CNNDM), preset="generalize-cpu", seeds=(1, 2),
                                overrides={**TINY, "max_tokens": 56, "transfer_from": str(root / "news")}),
                 root / "other")
    return root / "news", root / "other"


def test_generalize_study_trains_control_and_transfer(tiny_studies: tuple[Path, Path]) -> None:
    news, other = tiny_studies
    circuit = json.loads((news / "circuit" / "circuit.json").read_text())["layers"]
    for seed in (1, 2):
        assert json.loads((other / f"transfer_s{seed}" / "train_summary.json").read_text())["layers"] == circuit
    control = json.loads((news / "control_s1" / "train_summary.json").read_text())
    assert control["provenance"]["config"]["objective"] == "document" and not (news / "control_s2").exists()
    assert (news / "analysis_control" / "per_doc.safetensors").is_file()
    assert not (news / "ablate").exists() and (news / "faithfulness" / "faithfulness.json").is_file()
    page = (other / "report.html").read_text()
    assert "targeted (transferred circuit) and each of the 1 random layer sets trained once per seed; the full " \
           "fine-tune and control task (documents only) on seed 1 only" in page
    claims = {c["claim"]: c for c in sc.load_run(news).claims}
    assert claims["Attention becomes more focused by summarization than by the control task"]["limited_by"] == \
        "4 documents"


def test_cli_compare_end_to_end(tiny_studies: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    news, other = tiny_studies
    out = tmp_path / "cmp"
    assert run_cli(["compare", str(news), str(other), "--labels", "news,other", "--n-permutations", "500",
                    "--n-bootstrap", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "news ~ other kl layers: Jaccard" in printed and "other: transferred vs own circuit" in printed
    result = sc.load_run(out)
    assert isinstance(result, sc.CompareResult) and {r["run"] for r in result.rows["runs"]} == {"news", "other"}
    assert len(result.rows["claims"]) == 4 and len(result.rows["transfer"]) == 2
    transfer = result.rows["transfer"][0]
    assert transfer["source"] == "news" and transfer["n_seeds"] == 2
    page = (out / "compare.html").read_text()
    assert "Circuit overlap" in page and "Control task" in page and page.count("<img") == 2


def test_cli_compare_refuses_bad_runs(tiny_studies: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    news, other = tiny_studies
    out = tmp_path / "cmp"
    cli_fails(["compare", str(news), "--out", str(out)], capsys, "at least two study folders")
    cli_fails(["compare", str(news), str(news / "analysis"), "--out", str(out)], capsys, "analysis: not a study")
    broken = tmp_path / "broken"
    shutil.copytree(other, broken)
    shutil.rmtree(broken / "analysis")
    cli_fails(["compare", str(news), str(broken), "--out", str(out)], capsys, "stage 'analysis' is missing")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(other, unfinished)
    (unfinished / "circuit" / "INCOMPLETE.json").write_text('{"command": "reproduce"}')
    cli_fails(["compare", str(news), str(unfinished), "--out", str(out)], capsys, "stage 'circuit' did not finish")
    (unfinished / "INCOMPLETE.json").write_text('{"command": "reproduce"}')
    cli_fails(["compare", str(news), str(unfinished), "--out", str(out)], capsys, "the study has not finished")
    cli_fails(["compare", str(news), str(other), "--levels", "neurons", "--out", str(out)], capsys, "--levels")
    assert not out.exists()
    before = snapshot(news)
    cli_fails(["compare", str(news), str(other), "--out", str(news / "cmp")], capsys)  # inside an input
    assert snapshot(news) == before


def test_reproduce_refuses_a_transfer_circuit_it_cannot_use(tiny_studies: tuple[Path, Path], tmp_path: Path,
                                                            capsys) -> None:  # type: ignore[no-untyped-def]
    """Before any stage: a missing circuit, and one of a model of another depth (transfer needs the same model)."""
    news, _ = tiny_studies
    model = json.loads((news / "reproduce.json").read_text())["study"]["model"]
    base = ["reproduce", "--model", model, "--data", str(CNNDM), "--preset", "generalize-cpu", "--seeds", "1",
            "--out", str(tmp_path / "run")]
    cli_fails([*base, "--set", f'transfer_from="{tmp_path / "nowhere"}"'], capsys, "transfer_from", "no circuit there")
    deeper = json.loads((news / "circuit" / "circuit.json").read_text())
    deeper["n_layers"] = 99
    (tmp_path / "deep.json").write_text(json.dumps(deeper))
    cli_fails([*base, "--set", f'transfer_from="{tmp_path / "deep.json"}"'], capsys, "a circuit of a 99-layer model")
    assert not (tmp_path / "run").exists()


def test_resampling_the_attribution_circuit_reproduces_its_picks(tiny_studies: tuple[Path, Path]) -> None:
    """The exact per-document deltas re-pick the circuit the study chose: all documents once = the full sample."""
    from sumcircuit.generalization.profile import read_profile
    from sumcircuit.generalization.stats import _resampler

    for folder in tiny_studies:
        run = read_profile(folder)
        assert run.attribution is not None and run.confirmed
        circuit = run.circuits["attribution"]
        n, layers = _resampler(run, "attribution", "layers", run.n_layers)  # type: ignore[misc]
        picks, _ = layers(np.ones((1, n)))
        assert sorted(np.argsort(-picks[0], kind="stable")[:len(circuit.layers)].tolist()) == sorted(circuit.layers)
        _, heads = _resampler(run, "attribution", "heads", run.n_layers)  # type: ignore[misc]
        picks, _ = heads(np.ones((1, n)))
        top = np.argsort(-np.nan_to_num(picks[0], nan=-np.inf), kind="stable")[:len(circuit.heads)]
        assert {f"L{i // run.n_heads}.H{i % run.n_heads}" for i in top} == set(circuit.heads)
