"""Ablation and activation patching: correctness on tiny models of every family."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from sumcircuit.causal import AblationConfig, CausalError, Interventions, PatchConfig
from sumcircuit.causal import ablation as abl
from sumcircuit.causal import interventions as iv
from sumcircuit.causal import patching as pat
from sumcircuit.causal.interventions import batches, document_losses
from sumcircuit.cli import main
from sumcircuit.data import DataConfig
from sumcircuit.models import LoadedModel, load_model
from sumcircuit.sites import Site, SiteError, parse_heads, parse_layers
from sumcircuit.stats import empirical_p_value

from helpers import CNNDM

FAMILIES = ["gpt2", "llama", "gemma3"]



def _data(n_docs: int = 4, max_tokens: int = 96) -> DataConfig:
    return DataConfig(str(CNNDM), split="val", n_docs=n_docs, max_tokens=max_tokens)


def _perturb_layers(loaded: LoadedModel, seed: int = 1, scale: float = 0.05) -> LoadedModel:
    """A stand-in for a fine-tune: only decoder-layer weights move (embeddings, final norm, head do not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.adapter.layers(loaded.model).parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return loaded


@pytest.fixture(scope="module")
def encoded(tiny_model_dirs: dict[str, Path]) -> list:
    tok = load_model(str(tiny_model_dirs["gpt2"])).tokenizer  # all tiny models share one tokenizer
    return iv.encode_examples(tok, _data())[0]


def _pair(tiny_model_dirs: dict[str, Path], family: str) -> tuple[LoadedModel, LoadedModel]:
    base = load_model(str(tiny_model_dirs[family]))
    return base, _perturb_layers(load_model(str(tiny_model_dirs[family])))


def _losses(loaded: LoadedModel, encoded: list, batch_size: int = 3) -> np.ndarray:
    out = np.zeros(len(encoded))
    with torch.no_grad():
        for idx, batch in batches(encoded, batch_size, loaded.tokenizer.pad_token_id, "cpu"):
            out[idx] = document_losses(loaded.model, batch).numpy()
    return out


def _rows(result: pat.PatchLosses, cfg: PatchConfig) -> dict[tuple[str, str], dict]:
    return {(r["direction"], r["component"]): r for r in pat.summarize_patching(result, cfg)["rows"]}


# ---------------------------------------------------------------- loss

def test_document_loss_matches_hf_loss_per_document(tiny_model_dirs: dict[str, Path], encoded: list) -> None:
    """Padding is excluded: a padded batch gives each document its unpadded, HF-computed loss."""
    loaded = load_model(str(tiny_model_dirs["llama"]))
    batched = _losses(loaded, encoded, batch_size=4)
    for i, enc in enumerate(encoded):
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            ref = loaded.model(input_ids=ids, labels=torch.tensor([enc.labels])).loss.item()
        assert batched[i] == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- patching

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_patching_every_layer_recovers_the_whole_gap(tiny_model_dirs: dict[str, Path], encoded: list,
                                                     family: str, granularity: str) -> None:
    base, tuned = _pair(tiny_model_dirs, family)
    cfg = PatchConfig(granularity=granularity, batch_size=3, n_bootstrap=50)
    result = pat.patch_losses(base, tuned, encoded, cfg)
    rows = _rows(result, cfg)
    assert abs(result.base.mean() - result.tuned.mean()) > 1e-4  # a real gap to recover
    assert rows[("denoise", "all")]["recovery"] == pytest.approx(1.0, abs=1e-4)
    assert rows[("noise", "all")]["recovery"] == pytest.approx(0.0, abs=1e-4)
    np.testing.assert_allclose(result.patched[("denoise", "all")], result.tuned, atol=1e-5)
    # the clean losses are those of the models run on their own
    np.testing.assert_allclose(result.base, _losses(base, encoded), atol=1e-6)
    np.testing.assert_allclose(result.tuned, _losses(tuned, encoded), atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patching_nothing_recovers_nothing(tiny_model_dirs: dict[str, Path], encoded: list, family: str) -> None:
    base, _ = _pair(tiny_model_dirs, family)
    clean = _losses(base, encoded)
    patched = np.zeros(len(encoded))
    cost = iv.CostCounter()
    with torch.no_grad():
        for idx, batch in batches(encoded, 3, base.tokenizer.pad_token_id, "cpu"):
            _, cache = iv.clean_run(base.model, base.adapter, batch,
                                        [("resid_post", l) for l in range(base.adapter.n_layers)], cost)
            blocks = {l: cache[("resid_post", l)] for l in range(base.adapter.n_layers)}
            patched[idx] = iv.run_intervened(base.model, base.adapter, batch, {}, blocks, cost).numpy()
    np.testing.assert_array_equal(patched, clean)
    assert pat.recovery(clean, clean + 1.0, patched) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_prefix_changes_no_number(tiny_model_dirs: dict[str, Path], encoded: list, family: str) -> None:
    """Skipping the layers below a patch (cached) is a pure speed-up: same losses as computing them."""
    base, tuned = _pair(tiny_model_dirs, family)
    fast, slow = (pat.patch_losses(base, tuned, encoded, PatchConfig(granularity="head", layers=(1, 2), batch_size=3,
                                                                 replay_prefix=r)) for r in (True, False))
    for key in fast.patched:
        np.testing.assert_allclose(fast.patched[key], slow.patched[key], atol=1e-6)
    assert fast.cost.layer_evals < slow.cost.layer_evals


def test_patching_cost_is_two_clean_plus_one_per_component_and_direction(tiny_model_dirs: dict[str, Path],
                                                                         encoded: list) -> None:
    base, tuned = _pair(tiny_model_dirs, "gpt2")
    cfg = PatchConfig(granularity="block", batch_size=4, include_all=False)
    result = pat.patch_losses(base, tuned, encoded, cfg)
    n_layers = base.adapter.n_layers
    cost = result.cost.summary(n_layers)
    assert cost["batches"] == 1
    assert cost["forwards_per_batch"] == 2 + 2 * n_layers
    # replay: a block patch at layer l computes layers l+1..L-1 only
    assert cost["full_forward_equivalents_per_batch"] == pytest.approx(2 + 2 * sum(range(n_layers)) / n_layers)


def test_patching_refuses_different_architectures(tiny_model_dirs: dict[str, Path], encoded: list) -> None:
    gpt2, llama = (load_model(str(tiny_model_dirs[f])) for f in ("gpt2", "llama"))
    with pytest.raises(CausalError, match="different architectures"):
        pat.patch_losses(gpt2, llama, encoded, PatchConfig())


# ---------------------------------------------------------------- ablation

def _head_out_weight_slice(loaded: LoadedModel, layer: int, head: int) -> torch.Tensor:
    """The output projection's weights that read this head's slice of its input."""
    module = loaded.adapter.attention_output(loaded.model, layer)
    dim = loaded.adapter.head_dim
    rows = slice(head * dim, (head + 1) * dim)
    return module.weight[rows, :] if isinstance(module, Conv1D) else module.weight[:, rows]  # Conv1D: [in, out]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_a_head_with_zero_output_weights_changes_nothing(tiny_model_dirs: dict[str, Path], encoded: list,
                                                                  family: str, mode: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    with torch.no_grad():
        _head_out_weight_slice(loaded, 1, 1).zero_()
    result = abl.ablation_losses(loaded, encoded, AblationConfig(heads=((1, 1),), mode=mode, batch_size=3))
    np.testing.assert_allclose(result.ablated[0], result.clean, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_ablating_a_head_equals_zeroing_its_output_weights(tiny_model_dirs: dict[str, Path], encoded: list,
                                                                family: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    heads = ((0, 2), (2, 1))
    result = abl.ablation_losses(loaded, encoded, AblationConfig(heads=heads, mode="zero", batch_size=3))
    assert np.abs(result.ablated[0] - result.clean).max() > 1e-4  # the heads matter
    with torch.no_grad():
        for layer, head in heads:
            _head_out_weight_slice(loaded, layer, head).zero_()
    np.testing.assert_allclose(result.ablated[0], _losses(loaded, encoded), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mean_ablation_uses_the_dataset_mean_over_real_tokens(tiny_model_dirs: dict[str, Path], encoded: list,
                                                              family: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    adapter, dim = loaded.adapter, loaded.adapter.head_dim
    comps = [Site(1, "attn_head", 2), Site(2, "attn"), Site(0, "mlp")]
    means = abl.dataset_means(loaded.model, adapter, encoded, comps, 3, loaded.tokenizer.pad_token_id, "cpu")
    # manual: one unpadded document at a time, all tokens pooled
    pooled: dict[str, list[torch.Tensor]] = {"head": [], "attn": [], "mlp": []}
    hooks = [adapter.attention_output(loaded.model, 1).register_forward_pre_hook(
                 lambda m, a: pooled["head"].append(a[0][0, :, 2 * dim:3 * dim])),
             adapter.attention(loaded.model, 2).register_forward_hook(
                 lambda m, a, o: pooled["attn"].append(o[0][0])),
             adapter.mlp(loaded.model, 0).register_forward_hook(lambda m, a, o: pooled["mlp"].append(o[0]))]
    with torch.no_grad():
        for enc in encoded:
            loaded.model(input_ids=torch.tensor([enc.input_ids]))
    for h in hooks:
        h.remove()
    for comp, key in zip(comps, ("head", "attn", "mlp")):
        manual = torch.cat(pooled[key]).double().mean(0).float()
        torch.testing.assert_close(means[comp], manual, atol=1e-6, rtol=1e-5)
    # and the ablation really inserts that mean
    result = abl.ablation_losses(loaded, encoded, AblationConfig(heads=((1, 2),), mode="mean", batch_size=3))
    torch.testing.assert_close(result.means[comps[0]], means[comps[0]])
    expected = np.zeros(len(encoded))
    with torch.no_grad():
        for i, enc in enumerate(encoded):
            with Interventions(loaded.model, adapter) as iv:
                iv.replace({comps[0]: means[comps[0]]})
                batch = {"input_ids": torch.tensor([enc.input_ids]),
                         "attention_mask": torch.ones(1, len(enc.input_ids), dtype=torch.long),
                         "labels": torch.tensor([enc.labels])}
                expected[i] = document_losses(loaded.model, batch).item()
    np.testing.assert_allclose(result.ablated[0], expected, atol=1e-5)


def test_empirical_p_value_formula() -> None:
    assert empirical_p_value(1.0, [0.5, 1.0, 2.0]) == pytest.approx(3 / 4)
    assert empirical_p_value(5.0, [0.1] * 99) == pytest.approx(1 / 100)
    assert empirical_p_value(-1.0, [0.0] * 9) == pytest.approx(1.0)


def test_random_sets_have_the_circuit_size_and_follow_the_seed(tiny_model_dirs: dict[str, Path]) -> None:
    adapter = load_model(str(tiny_model_dirs["llama"])).adapter  # 3 layers x 6 heads
    heads = [Site(0, "attn_head", 1), Site(2, "attn_head", 5)]
    sets = abl.random_sets(heads, adapter, 20, seed=3)
    assert all(len(s) == 2 and len(set(s)) == 2 and all(c.kind == "attn_head" for c in s) for s in sets)
    assert sets == abl.random_sets(heads, adapter, 20, seed=3)
    assert sets != abl.random_sets(heads, adapter, 20, seed=4)
    comp = abl.random_sets(heads, adapter, 20, seed=3, pool="complement")
    assert not any(set(s) & set(heads) for s in comp)
    layers = abl.layer_sites([1], "both")
    for s in abl.random_sets(layers, adapter, 10, seed=0):
        assert [c.kind for c in s] == ["attn", "mlp"] and s[0].layer == s[1].layer
    with pytest.raises(CausalError, match="cannot draw random sets of 2 from a pool of 1"):
        abl.random_sets(abl.layer_sites([0, 1], "attn"), adapter, 1, 0, "complement")


def test_bad_heads_and_layers_name_the_input(tiny_model_dirs: dict[str, Path]) -> None:
    adapter = load_model(str(tiny_model_dirs["llama"])).adapter
    with pytest.raises(CausalError, match=r"heads L1\.H7: head 7 out of range: the model has 6 heads"):
        abl.ablation_targets(AblationConfig(heads=("1.7",)), adapter)
    with pytest.raises(CausalError, match=r"heads L3\.H1: layer 3 out of range"):
        abl.ablation_targets(AblationConfig(heads=("L3.H1",)), adapter)
    with pytest.raises(SiteError, match="cannot parse component '2:1'"):
        parse_heads("2:1")
    assert parse_layers("0,2-2,1") == [0, 1, 2]
    with pytest.raises(SiteError, match="--layers 5: layer 5 out of range"):
        parse_layers("5", adapter.n_layers, what="--layers")
    with pytest.raises(SiteError, match="layer 999999999 out of range"):  # checked before it is expanded
        parse_layers("0-999999999", 3)


# ---------------------------------------------------------------- CLI

def test_cli_ablate_end_to_end(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    rc = main(["ablate", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM), "--split", "val",
               "--n-docs", "4", "--max-tokens", "96", "--heads", "1.2,2.0", "--mode", "mean",
               "--random-controls", "6", "--seed", "1", "--n-bootstrap", "100", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["circuit"]["members"] == ["L1.H2", "L2.H0"]
    rc_ = summary["random_controls"]
    assert rc_["n"] == 6 and 1 / 7 <= rc_["p_value"] <= 1
    assert summary["p_value"] == rc_["p_value"] and summary["effect"] == summary["circuit"]["effect"]
    assert summary["provenance"]["models"][0]["weights_sha256"]
    assert summary["provenance"]["data"]["sha256"]
    lines = (out / "ablation.csv").read_text().splitlines()
    assert len(lines) == 1 + 7 and lines[1].startswith("circuit,")
    assert len((out / "ablation_per_doc.csv").read_text().splitlines()) == 1 + 7 * 4
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_ablate_errors_are_one_line(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ablate", "--model", str(tiny_model_dirs["llama"]), "--data", str(CNNDM), "--split", "val",
               "--n-docs", "2", "--heads", "1.9", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "heads L1.H9: head 9 out of range: the model has 6 heads per layer" in capsys.readouterr().err


def test_cli_ablate_rouge_is_clear_when_unavailable_or_runs(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rouge"
    rc = main(["ablate", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM), "--split", "val",
               "--n-docs", "2", "--max-tokens", "96", "--layers", "1", "--rouge", "--max-new-tokens", "4",
               "--n-bootstrap", "50", "--out", str(out)])
    assert rc == 0
    rouge = json.loads((out / "ablation.json").read_text())["rouge"]
    assert set(rouge["rouge1"]) == {"clean", "ablated", "delta"} and rouge["n"] == 2


def test_cli_patch_end_to_end(tiny_model_dirs: dict[str, Path], tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tuned = _perturb_layers(load_model(str(tiny_model_dirs["llama"])))
    tuned_dir = tmp_path / "tuned"
    tuned.model.save_pretrained(tuned_dir)
    tiny_tokenizer.save_pretrained(tuned_dir)
    out = tmp_path / "patch"
    rc = main(["patch", "--base", str(tiny_model_dirs["llama"]), "--tuned", str(tuned_dir), "--data", str(CNNDM),
               "--split", "val", "--n-docs", "4", "--max-tokens", "96", "--granularity", "layer",
               "--batch-size", "2", "--n-bootstrap", "100", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "patching.json").read_text())
    assert summary["cost"]["forwards_per_batch"] == 2 + 2 * (2 * 3 + 1)
    with open(out / "patching.csv", newline="") as fh:
        rows = {(r["direction"], r["component"]): r for r in csv.DictReader(fh)}
    assert len(rows) == 2 * (2 * 3 + 1)
    assert float(rows[("denoise", "all")]["recovery"]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows[("denoise", "L0.attn")]["recovery_ci_low"]) <= float(rows[("denoise", "L0.attn")]["recovery"])
    assert len(summary["provenance"]["models"]) == 2
    assert (out / "patching.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "patching_per_doc.csv").read_text().splitlines()) == 1 + 4 * 14


def test_cli_patch_heads_plot(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "patch_heads"
    rc = main(["patch", "--base", str(tiny_model_dirs["gpt2"]), "--tuned", str(tiny_model_dirs["gpt2"]),
               "--data", str(CNNDM), "--split", "val", "--n-docs", "2", "--max-tokens", "64",
               "--granularity", "head", "--direction", "denoise", "--n-bootstrap", "20", "--out", str(out)])
    assert rc == 0  # identical models: no gap, a warning, still valid files
    summary = json.loads((out / "patching.json").read_text())
    assert "warning" in summary and summary["cost"]["forwards_per_batch"] == 2 + 3 * 4 + 1
    assert (out / "patching.png").is_file()


# ---------------------------------------------------------------- real model

@pytest.mark.real
def test_real_smollm2_patching_and_ablation_smoke(smollm2: LoadedModel) -> None:
    """Perturb only the last two layers, so patched runs replay 27 cached layers and stay cheap."""
    import copy

    data = _data(n_docs=2, max_tokens=128)
    encoded = iv.encode_examples(smollm2.tokenizer, data)[0]
    tuned = copy.copy(smollm2)
    tuned.model = copy.deepcopy(smollm2.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (28, 29):
            for p in tuned.adapter.block(tuned.model, layer).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    cfg = PatchConfig(granularity="layer", layers=(27, 28, 29), batch_size=2, n_bootstrap=100)
    result = pat.patch_losses(smollm2, tuned, encoded, cfg)
    rows = _rows(result, cfg)
    assert abs(result.base.mean() - result.tuned.mean()) > 1e-3
    for comp in ("L27.attn", "L27.mlp"):  # identical in both models: exactly nothing to recover
        assert rows[("denoise", comp)]["recovery"] == 0.0 and rows[("noise", comp)]["recovery"] == 1.0
    assert rows[("denoise", "all")]["recovery"] == pytest.approx(1.0, abs=1e-4)
    assert rows[("noise", "all")]["recovery"] == pytest.approx(0.0, abs=1e-4)
    assert result.cost.summary(30)["full_forward_equivalents_per_batch"] < 3.5  # 2 clean + replayed prefixes
    with pytest.raises(CausalError, match="heads L3.H12: head 12 out of range: the model has 9"):
        abl.ablation_losses(smollm2, encoded, AblationConfig(heads=((3, 12),)))
    zeroed = abl.ablation_losses(smollm2, encoded, AblationConfig(heads=((29, 1), (29, 8)), batch_size=2))
    assert zeroed.ablated.shape == (1, 2) and np.isfinite(zeroed.ablated).all()
    assert not np.array_equal(zeroed.ablated[0], zeroed.clean)


def test_adapter_folders_work_for_ablate_and_patch(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A LoRA adapter folder from `finetune` is a --tuned spec for patch and an --adapter for ablate."""
    from sumcircuit import lora
    from sumcircuit.training.checkpoint import export_model

    loaded = load_model(str(tiny_model_dirs["llama"]))
    loaded.weights_sha256()
    peft_model = lora.inject_lora(loaded.model, loaded.adapter, [0, 2], rank=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    export_model(peft_model, loaded, tmp_path / "adapter", {"method": "targeted-lora", "layers": [0, 2]})
    common = ["--data", str(CNNDM), "--split", "val", "--n-docs", "3", "--max-tokens", "64", "--n-bootstrap", "20"]
    assert main(["patch", "--base", str(tiny_model_dirs["llama"]), "--tuned", str(tmp_path / "adapter"),
                 "--granularity", "block", *common, "--out", str(tmp_path / "p")]) == 0
    with open(tmp_path / "p" / "patching.csv", newline="") as fh:
        rows = {(r["direction"], r["component"]): float(r["recovery"]) for r in csv.DictReader(fh)}
    assert rows[("denoise", "all")] == pytest.approx(1.0, abs=1e-4)
    assert rows[("denoise", "L2.resid_post")] == pytest.approx(1.0, abs=1e-4)  # layer 2: the last adapted one
    for args, out in ((["--model", str(tiny_model_dirs["llama"]), "--adapter", str(tmp_path / "adapter")], "a1"),
                      (["--model", str(tmp_path / "adapter")], "a2")):
        assert main(["ablate", *args, "--heads", "1.1", *common, "--out", str(tmp_path / out)]) == 0
    a1, a2 = (json.loads((tmp_path / o / "ablation.json").read_text()) for o in ("a1", "a2"))
    assert a1["loss_clean"]["mean"] == pytest.approx(a2["loss_clean"]["mean"], abs=1e-6)
    assert a1["effect"] == pytest.approx(a2["effect"], abs=1e-6)
    for summary in (a1, a2):  # the adapter is cited as the model that ran, with its weights' hash
        model = summary["provenance"]["models"][0]
        assert model["kind"] == "adapter" and model["location"] == str((tmp_path / "adapter").resolve())
        assert model["source_sha256"] and model["weights_sha256"]
