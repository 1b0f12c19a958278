"""Attribution patching: checked against exact patching on tiny models of every family."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import sumcircuit as sc
from sumcircuit.artifacts import read_json
from sumcircuit.causal import attribution as att
from sumcircuit.causal import patching as pat
from sumcircuit.causal.interventions import encode_examples
from sumcircuit.cli import main
from sumcircuit.data import DataConfig
from sumcircuit.models import LoadedModel, load_model

from helpers import CNNDM, cli_fails, perturbed

FAMILIES = ["gpt2", "llama", "gemma3"]


def _data(n_docs: int = 4, max_tokens: int = 80) -> DataConfig:
    return DataConfig(str(CNNDM), split="val", n_docs=n_docs, max_tokens=max_tokens)


def _tuned(base: LoadedModel, scale: float, seed: int = 1) -> LoadedModel:
    """A stand-in for a fine-tune: decoder-layer weights moved by ``scale`` x a fixed random direction."""
    tuned: LoadedModel = perturbed(base, scale, seed)
    return tuned


def _exact_and_estimate(base: LoadedModel, tuned: LoadedModel, encoded: list, granularity: str,
                        direction: str, method: str = "linear", steps: int = 1) -> tuple[dict, dict]:
    cfg = att.AttributionConfig(granularity=granularity, directions=(direction,), method=method,  # type: ignore[arg-type]
                                ig_steps=steps, batch_size=4, n_bootstrap=20)
    rows, _ = att.attribution_rows(att.attribution_losses(base, tuned, encoded, cfg), cfg)
    pcfg = pat.PatchConfig(granularity="head" if granularity == "head" else "layer", directions=(direction,),  # type: ignore[arg-type]
                           include_all=False, batch_size=4, n_bootstrap=20)
    exact = pat.summarize_patching(pat.patch_losses(base, tuned, encoded, pcfg), pcfg)["rows"]
    return ({r["component"]: r["loss_patched"] for r in rows}, {r["component"]: r["loss_patched"] for r in exact})


@pytest.mark.parametrize("family", FAMILIES)
def test_converges_to_exact_patching_as_the_models_approach(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    """First order: the error of the estimated patched loss shrinks like the square of the perturbation."""
    base = load_model(str(tiny_model_dirs[family]))
    encoded = encode_examples(base.tokenizer, _data())[0]
    errors, effects = [], []
    for scale in (0.4, 0.2, 0.1):
        tuned = _tuned(base, scale)
        estimate, exact = _exact_and_estimate(base, tuned, encoded, "layer", "denoise")
        loss_base = pat.patch_losses(base, tuned, encoded, pat.PatchConfig(layers=(0,), include_all=False,
                                                                           directions=("denoise",))).base.mean()
        errors.append(max(abs(estimate[k] - exact[k]) for k in exact))
        effects.append(max(abs(exact[k] - loss_base) for k in exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] / errors[0] < 0.35  # ~(1/4) for a second-order error; the effect itself halves each time
    assert errors[2] < 0.5 * effects[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_directions_and_kinds_follow_exact_patching(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    base = load_model(str(tiny_model_dirs[family]))
    tuned = _tuned(base, 0.05)
    encoded = encode_examples(base.tokenizer, _data())[0]
    for granularity in ("layer", "head"):
        for direction in ("denoise", "noise"):
            estimate, exact = _exact_and_estimate(base, tuned, encoded, granularity, direction)
            names = sorted(exact)
            a = np.array([estimate[n] for n in names])
            e = np.array([exact[n] for n in names])
            assert np.corrcoef(a, e)[0, 1] > 0.95, (granularity, direction)


def test_ig_with_one_step_is_linear(tiny_model_dirs: dict[str, Path]) -> None:
    """K = 1 is the linear estimate exactly; more steps average gradients along the weight path.

    (That path moves every component at once, EAP-IG style; on this tiny pair it does not match
    single-component patching better than the linear estimate, and the docs say so.)
    """
    base = load_model(str(tiny_model_dirs["llama"]))
    tuned = _tuned(base, 0.5)
    encoded = encode_examples(base.tokenizer, _data())[0]
    linear, exact = _exact_and_estimate(base, tuned, encoded, "layer", "denoise")
    ig1, _ = _exact_and_estimate(base, tuned, encoded, "layer", "denoise", method="ig", steps=1)
    assert ig1 == linear
    ig8, _ = _exact_and_estimate(base, tuned, encoded, "layer", "denoise", method="ig", steps=8)
    assert set(ig8) == set(linear) and ig8 != linear
    a, e = np.array([ig8[k] for k in sorted(exact)]), np.array([exact[k] for k in sorted(exact)])
    assert np.corrcoef(a, e)[0, 1] > 0.8


def test_neuron_attribution_matches_exact_neuron_patching(tiny_model_dirs: dict[str, Path]) -> None:
    """Neuron rows name L{l}.N{i}; their estimates agree with patching those neurons exactly."""
    base = load_model(str(tiny_model_dirs["gpt2"]))
    tuned = _tuned(base, 0.05)
    encoded = encode_examples(base.tokenizer, _data())[0]
    cfg = att.AttributionConfig(granularity="neuron", directions=("denoise",), batch_size=4, n_bootstrap=20)
    rows, maps = att.attribution_rows(att.attribution_losses(base, tuned, encoded, cfg), cfg)
    assert maps["denoise.effect"].shape == (base.adapter.n_layers, base.adapter.n_neurons)
    top = sorted(rows, key=lambda r: -abs(r["effect"]))[:6]
    sites = [sc.Site.parse(r["component"]) for r in top]
    assert all(s.kind == "mlp_neuron" for s in sites)
    pcfg = pat.PatchConfig(directions=("denoise",), include_all=False, n_bootstrap=20)
    exact = {r["component"]: r["effect"] for r in
             pat.summarize_patching(pat.patch_losses(base, tuned, encoded, pcfg, sites=sites), pcfg)["rows"]}
    est = np.array([r["effect"] for r in top])
    ex = np.array([exact[r["component"]] for r in top])
    assert np.corrcoef(est, ex)[0, 1] > 0.9
    layer, neuron = sites[0].layer, sites[0].index
    assert maps["denoise.effect"][layer, neuron] == pytest.approx(top[0]["effect"], rel=1e-6)


def test_cli_attribute_joins_patching_row_by_row(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base = str(tiny_model_dirs["llama"])
    tuned_dir = tmp_path / "tuned"
    loaded = load_model(base)
    _tuned(loaded, 0.05).model.save_pretrained(tuned_dir)
    loaded.tokenizer.save_pretrained(tuned_dir)
    common = ["--base", base, "--tuned", str(tuned_dir), "--data", str(CNNDM), "--split", "val", "--n-docs", "4",
              "--max-tokens", "80", "--n-bootstrap", "50"]
    assert main(["attribute", *common, "--granularity", "all", "--validate", "3", "--confirm", "6",
                 "--out", str(tmp_path / "a")]) == 0
    assert "validation denoise.attn" in capsys.readouterr().out
    assert main(["patch", *common, "--granularity", "head", "--out", str(tmp_path / "p")]) == 0
    with open(tmp_path / "a" / "attribution.csv") as fh:
        attribution = list(csv.DictReader(fh))
    with open(tmp_path / "p" / "patching.csv") as fh:
        patching = list(csv.DictReader(fh))
    assert list(attribution[0]) == list(patching[0])  # same columns
    heads_a = {(r["direction"], r["component"]) for r in attribution if r["kind"] == "attn_head"}
    heads_p = {(r["direction"], r["component"]) for r in patching if r["kind"] == "attn_head"}
    assert heads_a == heads_p
    summary = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert summary["validation"]["denoise.attn_head"]["n"] == 6 and summary["provenance"]["models"]
    assert summary["cost"]["backwards"] == 2 * summary["cost"]["batches"]
    for png in ("attribution.png", "attribution_heads.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    again = sc.load_run(tmp_path / "a")
    assert isinstance(again, sc.AttributionResult) and len(again.to_pandas()) == len(attribution)
    assert again.neurons["denoise.effect"].shape == (3, 96)
    # circuits by cause: the layers and heads with the largest |effect|, with bootstrap stability
    out = tmp_path / "circuit.json"
    assert main(["circuit", "--attribution", str(tmp_path / "a"), "--score", "attribution", "--top-layers", "2",
                 "--top-heads", "3", "--n-bootstrap", "50", "--out", str(out)]) == 0
    circuit = sc.read_circuit(out)
    effects = again.effects("denoise")
    by_layer = sorted(range(3), key=lambda l: -(abs(effects[f"L{l}.attn"]) + abs(effects[f"L{l}.mlp"])))
    assert circuit.layers == sorted(by_layer[:2]) and len(circuit.heads) == 3
    confirmed = again.summary["confirmed"]
    exact_heads = confirmed["exact_effect"]["denoise"]
    assert len(exact_heads) >= 6 and confirmed["k"] == 6
    best = sorted(exact_heads, key=lambda h: -abs(exact_heads[h]))[:3]  # by exact effect, among the confirmed
    assert [h.name for h in circuit.heads] == sorted(best, key=lambda h: sc.Site.parse(h))
    for name, pair in circuit.summary["head_effects"].items():  # every pick: its estimate and its exact value
        assert pair["exact"] == pytest.approx(exact_heads[name]) and effects[name] == pytest.approx(pair["exact"])
        assert pair["estimate"] == pytest.approx(confirmed["estimated_effect"]["denoise"][name])
    cli_fails(["circuit", "--attribution", str(tmp_path / "a"), "--top-layers", "2", "--top-heads", "4", "--out",
               str(tmp_path / "c4.json")], capsys, "--top-heads 4", "rerun `sumcircuit attribute --confirm 8`")
    assert all(0 <= v <= 1 for v in circuit.summary["stability"].values())
    assert all(0 <= v <= 1 for v in circuit.summary["head_stability"].values())
    assert main(["circuit", "--attribution", str(tmp_path / "a"), "--out", str(out)]) == 0  # the score follows
    assert read_json(out)["score"] == "attribution"
    assert main(["circuit", "--attribution", str(tmp_path / "a"), "--score", "kl", "--out", str(out)]) == 2


def test_attribute_warns_like_patch_when_there_is_no_gap(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["gpt2"])  # the same model twice: no gap, every recovery fraction is 0/0
    assert main(["attribute", "--base", model, "--tuned", model, "--data", str(CNNDM), "--split", "val", "--n-docs",
                 "2", "--max-tokens", "64", "--n-bootstrap", "20", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert "not clearly positive" in summary["warning"] and f"warning: {summary['warning']}" in printed
    # a circuit by cause from it says why nothing can be chosen (it said "no layer rows", which were there)
    cli_fails(["circuit", "--attribution", str(tmp_path / "a"), "--score", "attribution", "--top-layers", "1",
               "--out", str(tmp_path / "c.json")], capsys, "every layer's effect is NaN", "base-tuned loss gap is 0.0")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_blocks_are_patched_exactly_by_default(family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Block rows of `attribute` equal `patch`'s exact rows; the estimates stay in attribution.json for comparison."""
    import sumcircuit as sc

    base = load_model(str(tiny_model_dirs[family]))
    tuned = _tuned(load_model(str(tiny_model_dirs[family])), 0.08)
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=64)
    attr = sc.attribute(base, tuned, data, sc.AttributionConfig(granularity="layer", n_bootstrap=50))
    exact = sc.patch(base, tuned, data, sc.PatchConfig(granularity="layer", include_all=False, n_bootstrap=50))
    got = {(r["direction"], r["component"]): r for r in attr.rows}
    for row in exact.rows:
        mine = got[(row["direction"], row["component"])]
        for column in ("loss_patched", "recovery", "effect", "recovery_ci_low", "recovery_ci_high"):
            assert float(mine[column]) == pytest.approx(float(row[column]), rel=1e-6, abs=1e-9), column
    blocks = attr.summary["blocks"]
    assert blocks["method"] == "exact" and blocks["sites"] == 2 * base.adapter.n_layers
    assert blocks["exact_effect"]["denoise"]["L0.attn"] == pytest.approx(got[("denoise", "L0.attn")]["effect"])
    linear = sc.attribute(base, tuned, data, sc.AttributionConfig(granularity="layer", n_bootstrap=50,
                                                                   blocks="estimate"))
    estimated = {(r["direction"], r["component"]): r["effect"] for r in linear.rows}
    assert blocks["estimated_effect"]["noise"]["L1.mlp"] == pytest.approx(estimated[("noise", "L1.mlp")])
    assert attr.summary["cost"]["exact_patching"]["forwards"] > 0 and linear.summary["blocks"] == {"method": "estimate"}


def test_a_block_whose_linear_estimate_has_the_wrong_sign(tiny_model_dirs: dict[str, Path]) -> None:
    """Regression: a pair where the first-order estimate of a block has the other sign than exact patching.

    `attribute` reports the exact value (and records the estimate and the sign error); with
    blocks="estimate" the wrong sign is what a user would have got.
    """
    import sumcircuit as sc

    base = load_model(str(tiny_model_dirs["llama"]))
    tuned = _tuned(load_model(str(tiny_model_dirs["llama"])), 2.0, seed=1)
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=64)
    attr = sc.attribute(base, tuned, data, sc.AttributionConfig(granularity="layer", n_bootstrap=20))
    wrong = [(d, name) for d, names in attr.summary["blocks"]["estimate_sign_wrong"].items() for name in names]
    assert wrong, "this pair no longer has a block estimated with the wrong sign"
    exact = {(r["direction"], r["component"]): r["effect"]
             for r in sc.patch(base, tuned, data, sc.PatchConfig(include_all=False, n_bootstrap=20)).rows}
    estimated = {(r["direction"], r["component"]): r["effect"] for r in sc.attribute(
        base, tuned, data, sc.AttributionConfig(granularity="layer", n_bootstrap=20, blocks="estimate")).rows}
    reported = {(r["direction"], r["component"]): r["effect"] for r in attr.rows}
    for key in wrong:
        assert estimated[key] * exact[key] < 0  # the linear estimate: the other sign
        assert reported[key] == pytest.approx(exact[key], rel=1e-6)  # what attribute reports now


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_confirmed_neurons_are_patched_exactly(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    """`confirm=K` also patches the K neurons of largest estimate per direction: their rows are exact patching's."""
    import sumcircuit as sc

    base = load_model(str(tiny_model_dirs[family]))
    tuned = _tuned(load_model(str(tiny_model_dirs[family])), 0.08)
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=64)
    attr = sc.attribute(base, tuned, data, sc.AttributionConfig(granularity="neuron", confirm=3, n_bootstrap=20))
    plain = sc.attribute(base, tuned, data, sc.AttributionConfig(granularity="neuron", confirm=0, n_bootstrap=20))
    assert "confirmed_neurons" not in plain.summary
    confirmed = attr.summary["confirmed_neurons"]
    names = set(confirmed["exact_effect"]["denoise"])
    assert 3 <= len(names) <= 6 and "confirmed" not in attr.summary  # heads were not asked for
    encoded = encode_examples(base.tokenizer, data)[0]
    pcfg = pat.PatchConfig(include_all=False, n_bootstrap=20)
    exact = {(r["direction"], r["component"]): r["effect"] for r in pat.summarize_patching(
        pat.patch_losses(base, tuned, encoded, pcfg, [sc.Site.parse(n) for n in sorted(names)]), pcfg)["rows"]}
    for direction in ("denoise", "noise"):
        estimated = plain.effects(direction, kind="mlp_neuron")
        top = sorted(estimated, key=lambda n: -abs(estimated[n]))[:3]
        assert set(top) <= names
        reported = attr.effects(direction, kind="mlp_neuron")
        for name in names:
            assert reported[name] == pytest.approx(exact[(direction, name)], rel=1e-6)
            assert confirmed["estimated_effect"][direction][name] == pytest.approx(estimated[name], rel=1e-9)
        others = [n for n in estimated if n not in names][:20]
        assert all(reported[n] == pytest.approx(estimated[n], rel=1e-9) for n in others)
        grid = attr.neurons[f"{direction}.effect"]
        some = sc.Site.parse(sorted(names)[0])
        assert grid[some.layer, some.index] == pytest.approx(exact[(direction, some.name)], rel=1e-6)
