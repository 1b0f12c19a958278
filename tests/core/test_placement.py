"""A pair placed by a device map (layers on the CPU and on disk) gives the numbers of the in-memory run."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import PreTrainedTokenizerFast

import sumcircuit as sc
from sumcircuit.cli import main
from sumcircuit.errors import ConfigError
from sumcircuit.models import load_model
from sumcircuit.placement import execution_device, onloaded, place

from helpers import CNNDM, save_tiny

DATA = sc.DataConfig(str(CNNDM), split="val", n_docs=2, max_tokens=64)


@pytest.fixture(scope="module")
def tuned_dirs(tmp_path_factory: pytest.TempPathFactory,
               tiny_tokenizer: PreTrainedTokenizerFast) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuned")
    return {fam: save_tiny(fam, root / fam, tiny_tokenizer, seed=1) for fam in ("gpt2", "llama", "gemma3")}


def split_map(folder: Path, out: Path) -> Path:
    """Every other decoder layer and the LM head on disk, the rest on the CPU (a JSON device map file)."""
    model = load_model(str(folder)).model
    prefix = model.base_model_prefix
    inner = getattr(model, prefix)
    layers = next(n for n, c in inner.named_children() if isinstance(c, torch.nn.ModuleList))
    mapping: dict[str, str] = {f"{prefix}.{n}": "cpu" for n, _ in inner.named_children() if n != layers}
    mapping |= {f"{prefix}.{layers}.{i}": "disk" if i % 2 else "cpu" for i in range(len(getattr(inner, layers)))}
    mapping |= {n: "disk" for n, _ in model.named_children() if n != prefix}
    out.write_text(json.dumps(mapping))
    return out


def _numbers(result: sc.Result) -> pd.DataFrame:
    return result.to_pandas().select_dtypes("number").reset_index(drop=True)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_analyze_attribute_patch_ablate_with_disk_offload_equal_the_in_memory_run(
        family: str, tiny_model_dirs: dict[str, Path], tuned_dirs: dict[str, Path], tmp_path: Path) -> None:
    base, tuned = str(tiny_model_dirs[family]), str(tuned_dirs[family])
    offload = sc.Runtime(device_map=str(split_map(tiny_model_dirs[family], tmp_path / "map.json")),
                         offload_folder=str(tmp_path / "offload"))
    runs = {"analyze": lambda rt: sc.analyze(base, tuned, DATA, runtime=rt),
            "attribute": lambda rt: sc.attribute(base, tuned, DATA, sc.AttributionConfig(granularity="all", seed=1),
                                                 runtime=rt),
            "patch": lambda rt: sc.patch(base, tuned, DATA, runtime=rt),
            "ablate": lambda rt: sc.ablate(tuned, DATA, sc.AblationConfig(layers=(1,), random_controls=2, mode="mean"),
                                           runtime=rt)}
    for name, run in runs.items():
        in_memory, placed = _numbers(run(None)), _numbers(run(offload))
        assert len(in_memory) > 0 and in_memory.notna().any().any(), name
        pd.testing.assert_frame_equal(placed, in_memory, rtol=1e-6, atol=1e-9, obj=name)
    gc.collect()
    assert list((tmp_path / "offload").iterdir()) == []  # the offloaded weights went with the models


def test_a_model_placed_by_max_memory_runs_with_some_layers_on_disk(tiny_model_dirs: dict[str, Path],
                                                                   tuned_dirs: dict[str, Path]) -> None:
    model = place(load_model(str(tiny_model_dirs["llama"])).model, "sequential", max_memory="cpu=200KB")
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values()
    assert execution_device(model) == torch.device("cpu")
    offloaded = model.model.layers[0].self_attn.q_proj.weight
    assert offloaded.is_meta
    reference = load_model(str(tiny_model_dirs["llama"])).model.model.layers[0].self_attn.q_proj.weight
    with onloaded(model, model.model.layers[0]):  # what the weight-change table reads
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, reference)
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    rt = sc.Runtime(device_map="sequential", max_memory="cpu=200KB")
    placed = sc.analyze(str(tiny_model_dirs["llama"]), str(tuned_dirs["llama"]), DATA, runtime=rt)
    pd.testing.assert_frame_equal(_numbers(placed), _numbers(sc.analyze(str(tiny_model_dirs["llama"]),
                                                                         str(tuned_dirs["llama"]), DATA)))
    cited = placed.summary["provenance"]["models"][1]
    assert cited["weights_sha256"] == sc.load_model(str(tuned_dirs["llama"])).weights_sha256()  # hashed before
    assert "disk" in cited["device_map"].values()  # and where each part of it ran


def test_cli_analyze_with_a_device_map(tiny_model_dirs: dict[str, Path], tuned_dirs: dict[str, Path],
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, tuned = str(tiny_model_dirs["gpt2"]), str(tuned_dirs["gpt2"])
    data = ["--data", str(CNNDM), "--split", "val", "--n-docs", "2", "--max-tokens", "64"]
    mapping = split_map(tiny_model_dirs["gpt2"], tmp_path / "map.json")
    assert main(["analyze", "--base", base, "--tuned", tuned, *data, "--out", str(tmp_path / "mem")]) == 0
    assert main(["analyze", "--base", base, "--tuned", tuned, *data, "--device-map", str(mapping), "--offload-folder",
                 str(tmp_path / "offload"), "--out", str(tmp_path / "placed")]) == 0
    for name in ("heads.csv", "layers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "placed" / name), pd.read_csv(tmp_path / "mem" / name))
    for command in ("attribute", "patch"):  # the causal commands share the flags
        for where, flags in (("mem", []), ("placed", ["--device-map", str(mapping)])):
            assert main([command, "--base", base, "--tuned", tuned, *data, *flags,
                         "--out", str(tmp_path / f"{command}-{where}")]) == 0
        table = "attribution.csv" if command == "attribute" else "patching.csv"
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"{command}-placed" / table),
                                      pd.read_csv(tmp_path / f"{command}-mem" / table))
    capsys.readouterr()
    refusals = [(["--max-memory", "cpu=1GiB"], "--max-memory: applies only with device_map"),
                (["--device-map", "everywhere"], "--device-map: everywhere: expected auto, balanced"),
                (["--device-map", "auto", "--max-memory", "cpu"], "--max-memory: 'cpu': expected DEVICE=AMOUNT"),
                (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not an amount"),
                (["--device-map", "sequential", "--max-memory", "cpu=1KB"], "leaves no room for any layer")]
    for flags, message in refusals:
        out = tmp_path / "refused"
        assert main(["analyze", "--base", base, "--tuned", tuned, *data, *flags, "--out", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
        assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"transformer.nope": "cpu"}))
    assert main(["analyze", "--base", base, "--tuned", tuned, *data, "--device-map", str(bad),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "no module 'transformer.nope' in this model" in capsys.readouterr().err


def test_commands_that_need_whole_models_refuse_a_device_map(tiny_model_dirs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    rt = sc.Runtime(device_map="auto")
    with pytest.raises(ConfigError, match="device_map: fine-tuning keeps each model whole"):
        sc.finetune(str(tiny_model_dirs["llama"]), sc.DataConfig(str(CNNDM), n_docs=2, max_tokens=64),
                    sc.FinetuneConfig(method="lora", max_steps=1), runtime=rt, out=tmp_path / "ft")
    with pytest.raises(ConfigError, match="device_map: generation keeps each model whole"):
        sc.evaluate(str(tiny_model_dirs["llama"]), DATA, runtime=rt)
    assert not (tmp_path / "ft").exists()
