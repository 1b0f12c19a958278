"""Finite or refused: NaN weights, missing tensors and configs that do not fit their weights never become results."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sumcircuit import models
from sumcircuit.errors import ModelError
from sumcircuit.integrity import check_finite, first_non_finite
from sumcircuit.models import load_model

from helpers import CNNDM, cli_fails, run_cli

TRAIN = str(CNNDM / "train.jsonl.gz")


def _edit_weights(src: Path, dest: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    folder = Path(shutil.copytree(src, dest))
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _one_nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")


def _all_nan(tensors: dict[str, torch.Tensor]) -> None:
    for value in tensors.values():
        value.fill_(float("nan"))


def test_first_non_finite_counts_and_names() -> None:
    a, b = torch.zeros(3), torch.tensor([1.0, float("inf"), float("nan")])
    assert first_non_finite([("a", a), ("b", b)]) == ("b", 2)
    assert first_non_finite([("a", a), ("i", torch.tensor([1, 2]))]) is None  # integer buffers are not weights
    module = torch.nn.Linear(2, 2)
    check_finite(module, "m")
    with torch.no_grad():
        module.bias[1] = float("-inf")
    with pytest.raises(ModelError, match=r"m: weight bias has 1 NaN/Inf"):
        check_finite(module, "m")


@pytest.mark.parametrize("command", ["analyze", "patch", "attribute"])
def test_a_tuned_model_with_one_nan_weight_is_refused(command: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_model_dirs["llama"]
    tuned = _edit_weights(base, tmp_path / "tuned", _one_nan)
    out = tmp_path / "out"
    cli_fails([command, "--base", str(base), "--tuned", str(tuned), "--data", TRAIN, "--n-docs", "2",
               "--max-tokens", "64", "--out", str(out)], capsys,
              "model.layers.1.self_attn.q_proj.weight has 1 NaN/Inf", str(tuned))
    assert not out.exists()


def test_evaluating_an_all_nan_model_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    broken = _edit_weights(tiny_model_dirs["llama"], tmp_path / "nan", _all_nan)
    cli_fails(["evaluate", "--model", str(broken), "--data", TRAIN, "--n-docs", "2", "--out", str(tmp_path / "ev")],
              capsys, "NaN/Inf", str(broken))
    assert not (tmp_path / "ev").exists()


def test_loaded_model_changed_in_memory_is_refused(tiny_model_dirs: dict[str, Path]) -> None:
    import sumcircuit as sc

    loaded = load_model(str(tiny_model_dirs["gpt2"]))
    with torch.no_grad():
        loaded.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight"):
        sc.patch(loaded, loaded, sc.DataConfig(TRAIN, n_docs=2, max_tokens=64))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_missing_tensors_are_refused_not_randomly_initialised(family: str, tiny_model_dirs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    def drop_layer1_mlp(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if (".1.mlp." in k)]:
            del tensors[key]

    folder = _edit_weights(tiny_model_dirs[family], tmp_path / "m", drop_layer1_mlp)
    with pytest.raises(ModelError, match=r"weight\(s\) missing .*\.1\.mlp\..*at random"):
        load_model(str(folder))


def test_config_claiming_a_billion_layers_is_refused_at_once(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path(shutil.copytree(tiny_model_dirs["llama"], tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1_000_000_000
    (folder / "config.json").write_text(json.dumps(config))

    def build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model of the claimed size was built")  # it used to: hours, then out of memory

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models.AutoModelForCausalLM, "from_pretrained", build)
        cli_fails(["evaluate", "--model", str(folder), "--data", TRAIN, "--n-docs", "2", "--out",
                   str(tmp_path / "o")], capsys, "config.json says 1000000000 layers", "weights do not match")
    config["num_hidden_layers"] = 3
    config["hidden_size"] = 4092  # a multiple of the 6 heads, unlike the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="hidden size 4092 but the embedding"):
        load_model(str(folder))


def test_training_stops_at_a_non_finite_loss(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    cli_fails(["finetune", "--model", str(tiny_model_dirs["llama"]), "--data", TRAIN, "--n-docs", "6",
               "--max-tokens", "64", "--method", "full", "--lr", "1e30", "--max-grad-norm", "1e38",
               "--scheduler", "constant", "--batch-size", "2", "--max-steps", "4", "--eval-every", "10",
               "--no-progress", "--out", str(out)], capsys, "loss is", "--lr")
    assert not (out / "final").exists()  # no model is handed out as the result


def test_circuit_refuses_nan_scores(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    llama = str(tiny_model_dirs["llama"])
    analysis = tmp_path / "an"
    assert run_cli(["analyze", "--base", llama, "--tuned", llama, "--data", TRAIN, "--n-docs", "2", "--max-tokens",
                    "64", "--n-bootstrap", "10", "--no-progress", "--out", str(analysis)]) == 0
    with open(analysis / "heads.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[3]["kl_base_tuned"] = "nan"  # what a broken analysis (or a hand edit) leaves
    with open(analysis / "heads.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cli_fails(["circuit", "--analysis", str(analysis), "--score", "kl", "--top-layers", "1", "--top-heads", "2",
               "--out", str(tmp_path / "c.json")], capsys, "NaN for 1 head(s)", "L")
    assert not (tmp_path / "c.json").exists()
