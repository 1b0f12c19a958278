"""Circuit selection on synthetic analysis folders (selection is a pure function of those files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sumcircuit as sc
from sumcircuit.causal import AblationConfig, CausalError
from sumcircuit.causal.ablation import ablation_targets
from sumcircuit.circuit import CircuitConfig, CircuitError, normalized_ranks, read_circuit, select_circuit
from sumcircuit.cli import main
from sumcircuit.sites import Site

L, H, D = 6, 4, 40



def _select(source, score="kl", top_layers=3, *, out=None, **kwargs):  # type: ignore[no-untyped-def]
    """``select_circuit`` with the config's fields as arguments; the circuit file's content."""
    return select_circuit(source, CircuitConfig(score=score, top_layers=top_layers, **kwargs), out=out).summary


def write_analysis(folder: Path, kl: np.ndarray, entropy_base: np.ndarray, entropy_tuned: np.ndarray,
                   actmag: np.ndarray, weights: np.ndarray, kl_rev: np.ndarray | None = None) -> Path:
    """An analysis folder in the `sumcircuit analyze` format from per-document arrays ([D, L, H] / [D, L])."""
    folder.mkdir(parents=True, exist_ok=True)
    kl_rev = kl if kl_rev is None else kl_rev
    with open(folder / "heads.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "head", "entropy_base", "entropy_tuned", "entropy_delta", "kl_base_tuned",
                    "kl_tuned_base", "rows", "kl_base_tuned_ci_low", "kl_base_tuned_ci_high"])
        for l in range(L):
            for h in range(H):
                eb, et = entropy_base[:, l, h].mean(), entropy_tuned[:, l, h].mean()
                w.writerow([l, h, eb, et, et - eb, kl[:, l, h].mean(), kl_rev[:, l, h].mean(), 1000, 0, 0])
    with open(folder / "layers.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "kl_base_tuned", "kl_tuned_base", "entropy_delta", "actmag_base", "actmag_tuned",
                    "actmag_rel_change", "cka", "weight_change_attn", "weight_change_mlp",
                    "neuron_abs_change_mean", "neuron_frac_changed", "neuron_sign_flips"])
        for l in range(L):
            w.writerow([l, kl[:, l].mean(), kl_rev[:, l].mean(), 0, 1, 1, actmag[:, l].mean(), 0.9,
                        weights[l] / 2, weights[l] / 2, 0, 0, 0])
    save_file({"kl_base_tuned": torch.tensor(kl, dtype=torch.float32),
               "kl_tuned_base": torch.tensor(kl_rev, dtype=torch.float32),
               "entropy_base": torch.tensor(entropy_base, dtype=torch.float32),
               "entropy_tuned": torch.tensor(entropy_tuned, dtype=torch.float32),
               "actmag_rel_change": torch.tensor(actmag, dtype=torch.float32)}, str(folder / "per_doc.safetensors"))
    (folder / "summary.json").write_text(json.dumps({"provenance": {"seed": 7, "models": ["base", "tuned"]}}))
    return folder


@pytest.fixture
def dominant(tmp_path: Path) -> Path:
    """Layer 3 changed most by every measure; layers 1 and 4 next (KL), head 3.2 the most-changed head."""
    rng = np.random.default_rng(0)
    kl = rng.uniform(0.0, 0.01, (D, L, H))
    kl[:, 3] += 1.0
    kl[:, 1] += 0.5
    kl[:, 4] += 0.3
    kl[:, 3, 2] += 2.0
    eb = rng.uniform(1, 2, (D, L, H))
    et = eb.copy()
    et[:, 3] -= 0.8
    et[:, 0] += 0.4
    actmag = rng.normal(0, 0.01, (D, L))
    actmag[:, 3] -= 0.5
    actmag[:, 5] += 0.2
    weights = np.array([0.1, 0.2, 0.1, 0.9, 0.3, 0.1])
    return write_analysis(tmp_path / "analysis", kl, eb, et, actmag, weights)


def test_top_layers_by_each_score(dominant: Path) -> None:
    assert _select(dominant, "kl", 3, n_bootstrap=50)["layers"] == [1, 3, 4]
    assert _select(dominant, "entropy", 2, n_bootstrap=50)["layers"] == [0, 3]
    assert _select(dominant, "activation", 2, n_bootstrap=50)["layers"] == [3, 5]  # |signed|
    assert _select(dominant, "weights", 2, n_bootstrap=50)["layers"] == [3, 4]
    combined = _select(dominant, "combined", 1, n_bootstrap=50)
    assert combined["layers"] == [3] and combined["scores"][3] == pytest.approx(1.0)
    kl = _select(dominant, "kl", 3, n_bootstrap=50)
    assert kl["ranked_layers"][:3] == [3, 1, 4]
    assert kl["scores"][3] == pytest.approx(1.0 + 2.0 / H, abs=0.01)  # mean over heads


def test_one_dominant_layer_is_perfectly_stable(dominant: Path) -> None:
    circuit = _select(dominant, "kl", 1, n_bootstrap=200, seed=3)
    assert circuit["stability"] == {"3": 1.0}
    assert circuit["topk_frequency"][3] == 1.0 and sum(circuit["topk_frequency"]) == pytest.approx(1.0)


def test_near_ties_are_reported_unstable(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    kl = rng.uniform(0, 0.01, (D, L, H))
    kl[:, 2] += 1.0 + rng.normal(0, 0.3, (D, 1))  # layers 2 and 5 tie on average, noisily per document
    kl[:, 5] += 1.0 + rng.normal(0, 0.3, (D, 1))
    eb = np.ones((D, L, H))
    folder = write_analysis(tmp_path / "a", kl, eb, eb, np.zeros((D, L)), np.zeros(L))
    circuit = _select(folder, "kl", 1, n_bootstrap=300, seed=0)
    (chosen,) = circuit["layers"]
    assert chosen in (2, 5)
    assert 0.05 < circuit["stability"][str(chosen)] < 0.95
    freq = circuit["topk_frequency"]
    assert freq[2] + freq[5] == pytest.approx(1.0)


def test_weights_score_has_no_bootstrap(dominant: Path) -> None:
    circuit = _select(dominant, "weights", 2, n_bootstrap=50)
    assert circuit["stability"] == {"3": None, "4": None}
    assert "no per-document variation" in circuit["stability_definition"]


def test_top_heads_and_their_stability(dominant: Path) -> None:
    circuit = _select(dominant, "kl", 2, top_heads=1, n_bootstrap=100)
    assert circuit["heads"] == ["L3.H2"]
    assert circuit["head_stability"] == {"L3.H2": 1.0}
    with pytest.raises(CircuitError, match="top_heads needs a per-head score"):
        _select(dominant, "activation", 2, top_heads=2)


def test_bad_inputs_name_the_problem(dominant: Path, tmp_path: Path) -> None:
    with pytest.raises(CircuitError, match="top_layers 7: must be between 1 and the 6 layers"):
        _select(dominant, "kl", 7)
    with pytest.raises(sc.ConfigError, match="score: choose one of kl, kl-sym, entropy"):
        _select(dominant, "nope", 2)
    with pytest.raises(CircuitError, match="score attribution needs an attribution"):
        _select(dominant, "attribution", 2)
    with pytest.raises(CircuitError, match="heads.csv not found"):
        _select(tmp_path, "kl", 2)


def test_normalized_ranks_average_ties() -> None:
    np.testing.assert_allclose(normalized_ranks(np.array([3.0, 1.0, 3.0, 0.0])), [5 / 6, 1 / 3, 5 / 6, 0.0])


def test_cli_writes_a_circuit_that_ablate_and_finetune_read(dominant: Path, tmp_path: Path, tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "circuit.json"
    rc = main(["circuit", "--analysis", str(dominant), "--score", "kl", "--top-layers", "2", "--top-heads", "2",
               "--n-bootstrap", "100", "--plot", "--out", str(out)])
    assert rc == 0
    circuit = json.loads(out.read_text())
    assert circuit["layers"] == [1, 3] and circuit["score"] == "kl" and "KL(base || tuned)" in circuit["definition"]
    assert len(circuit["scores"]) == L and set(circuit["stability"]) == {"1", "3"}
    assert circuit["provenance"]["analysis"]["provenance"] == {"seed": 7, "models": ["base", "tuned"]}
    assert circuit["provenance"]["config"]["top_layers"] == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert read_circuit(out).layers == [1, 3]
    assert circuit["heads"][0] == "L3.H2" and len(circuit["heads"]) == 2  # in rank order
    heads = read_circuit(out).heads
    assert Site(3, "attn_head", 2) in heads and all(h.layer == 3 for h in heads)
    from sumcircuit.models import load_model

    adapter = load_model(str(tiny_model_dirs["gpt2"])).adapter  # 3 layers: the circuit's layer 3 does not exist
    with pytest.raises(CausalError, match="layers L3.attn: layer 3 out of range: the model has 3 layers"):
        ablation_targets(AblationConfig(circuit=str(out)), adapter)
    small = json.loads(out.read_text()) | {"layers": [0, 2]}
    (tmp_path / "small.json").write_text(json.dumps(small))
    targets = ablation_targets(AblationConfig(circuit=str(tmp_path / "small.json"), component="both"), adapter)
    assert [c.name for c in targets] == ["L0.attn", "L0.mlp", "L2.attn", "L2.mlp"]


def test_selects_from_a_real_analysis_folder(tiny_model_dirs, tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The synthetic format above matches what `sumcircuit analyze` writes."""
    from sumcircuit import analysis
    from sumcircuit.data import DataConfig

    from helpers import CNNDM, save_tiny

    tuned = save_tiny("llama", tmp_path / "tuned", tiny_tokenizer, seed=1)
    data = DataConfig(str(CNNDM), split="val", n_docs=4, max_tokens=64)
    cfg = analysis.AnalysisConfig(n_bootstrap=20, cka=False, top_k=5)
    in_memory = analysis.analyze(str(tiny_model_dirs["llama"]), str(tuned), data, cfg,
                                 runtime=sc.Runtime(progress=False), out=tmp_path / "analysis")
    for score in ("kl", "kl-sym", "entropy", "activation", "weights", "combined"):
        circuit = _select(tmp_path / "analysis", score, 2, top_heads=2 if score != "weights" and
                                 score != "activation" else 0, n_bootstrap=50)
        assert len(circuit["layers"]) == 2 and all(0 <= l < 3 for l in circuit["layers"])
        assert circuit["provenance"]["analysis"]["provenance"]
        if score != "weights":
            assert all(v is not None and 0 <= v <= 1 for v in circuit["stability"].values())
    # a result works where a folder does: read back it is the folder exactly; in memory (unrounded) the same picks
    by_folder = _select(tmp_path / "analysis", "kl", 2, top_heads=2, n_bootstrap=50)
    by_result = _select(sc.load_run(tmp_path / "analysis"), "kl", 2, top_heads=2, n_bootstrap=50)
    assert {k: v for k, v in by_result.items() if k != "provenance"} == \
        {k: v for k, v in by_folder.items() if k != "provenance"}
    assert _select(in_memory, "kl", 2, top_heads=2, n_bootstrap=50)["layers"] == by_folder["layers"]


def test_old_circuit_files_keep_loading_and_bad_ones_are_refused(tmp_path: Path) -> None:
    """Heads as [layer, head] pairs (earlier versions) load as Sites; wrong types are refused, never coerced."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"layers": [2, 3, 5], "heads": [[3, 2], [5, 0]]}))
    assert read_circuit(old).heads == [Site(3, "attn_head", 2), Site(5, "attn_head", 0)]
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"layers": [2], "heads": ["L3.H2", "blocks.5.attn.hook_z[0]"]}))
    assert read_circuit(new).heads == read_circuit(old).heads
    for bad, message in ((["2", 3], "non-negative integers"), ([2.0], "non-negative integers"), ([True], "integers"),
                         ([], "non-empty")):
        (tmp_path / "bad.json").write_text(json.dumps({"layers": bad}))
        with pytest.raises(CircuitError, match=message):
            read_circuit(tmp_path / "bad.json")
    for heads in ([[3, "2"]], [[3]], ["L3.attn"], [{"layer": 3}]):
        (tmp_path / "bad.json").write_text(json.dumps({"layers": [1], "heads": heads}))
        with pytest.raises(CircuitError, match="field 'heads'"):
            read_circuit(tmp_path / "bad.json")


def test_a_registered_circuit_score_ranks_layers(dominant: Path) -> None:
    """Scores are a registry: a toy score is one registration, and the CLI and the config accept it."""
    from sumcircuit.circuit import CIRCUIT_SCORES, CircuitScore, register_circuit_score

    register_circuit_score(CircuitScore("attn-weights", "relative weight change of attention only",
                                        layer=lambda heads, layers: np.asarray(layers["weight_change_attn"])),
                           replace=True)
    try:
        toy = _select(dominant, "attn-weights", 2, n_bootstrap=20)
        assert toy["layers"] == _select(dominant, "weights", 2)["layers"] == [3, 4]
        assert toy["definition"] == "relative weight change of attention only"
        assert main(["circuit", "--analysis", str(dominant), "--score", "attn-weights", "--top-layers", "2",
                     "--out", str(dominant / "toy.json")]) == 0
    finally:
        CIRCUIT_SCORES.unregister("attn-weights")
