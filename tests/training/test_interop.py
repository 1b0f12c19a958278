"""Interop: adapters plain PEFT loads with the logits sumcircuit computes; curves in Accelerate's trackers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sumcircuit.models import load_model

from helpers import CNNDM, run_cli

TRAIN = str(CNNDM / "train.jsonl.gz")


@pytest.fixture(scope="module")
def trained(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One LoRA run per family (lr high enough that the adapter is far from zero)."""
    runs = {}
    for family in ("gpt2", "llama", "gemma3"):
        out = tmp_path_factory.mktemp("lora") / family
        assert run_cli(["finetune", "--model", str(tiny_model_dirs[family]), "--data", TRAIN, "--n-docs", "6",
                        "--max-tokens", "64", "--method", "lora", "--lr", "5e-2", "--batch-size", "2",
                        "--max-steps", "3", "--eval-every", "3", "--final", "last", "--no-progress", "--out", str(out)]) == 0
        runs[family] = out / "final"
    return runs


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_plain_peft_loads_the_adapter_with_the_same_logits(family: str, trained: dict[str, Path],
                                                           tiny_model_dirs: dict[str, Path]) -> None:
    final = trained[family]
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dirs[family].resolve())  # the spec, not a cache
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs[family]), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(final)).eval()  # no sumcircuit code involved
    ours = load_model(str(final))
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        want, got = ours.model(ids).logits, plain(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs[family]))(ids).logits
    assert (want - untrained).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_gpt2_adapter_leaves_the_k_block_exactly_alone(trained: dict[str, Path],
                                                       tiny_model_dirs: dict[str, Path]) -> None:
    final = trained["gpt2"]
    config = json.loads((final / "adapter_config.json").read_text())
    meta = json.loads((final / "sumcircuit_adapter.json").read_text())
    assert config["target_modules"] == ["attn.c_attn"] and config["r"] == 2 * meta["rank"]
    assert config["lora_alpha"] == 2 * meta["alpha"]  # same scale alpha / r as the q/v adapter trained
    tensors = load_file(str(final / "adapter_model.safetensors"))
    d = next(v for k, v in tensors.items() if k.endswith("lora_A.weight")).shape[1]
    for key, b in tensors.items():
        if key.endswith("lora_B.weight"):
            rank = b.shape[1] // 2
            assert torch.count_nonzero(b[d:2 * d]) == 0  # k rows
            assert torch.count_nonzero(b[:d, rank:]) == 0 and torch.count_nonzero(b[2 * d:, :rank]) == 0
            assert torch.count_nonzero(b[:d, :rank]) > 0 and torch.count_nonzero(b[2 * d:, rank:]) > 0
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["gpt2"]))
    merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["gpt2"]))
    for layer in range(len(fresh.transformer.h)):
        w, w0 = merged.transformer.h[layer].attn.c_attn.weight, fresh.transformer.h[layer].attn.c_attn.weight
        assert torch.equal(w[:, d:2 * d], w0[:, d:2 * d])  # bitwise: k is never adapted


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weights_get_the_umask_mode(family: str, trained: dict[str, Path]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    run = trained[family].parent
    for path in [run / "final" / "adapter_model.safetensors", *run.glob("checkpoints/*/model/*.safetensors")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_split_form_of_earlier_versions_still_loads(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2 adapters saved before the portable form (targets ``attn.c_attn.q_proj``) load as before."""
    from sumcircuit.lora import inject_lora
    from sumcircuit.lora_export import fuse_split_lora, native_config

    loaded = load_model(str(tiny_model_dirs["gpt2"]))
    peft_model = inject_lora(loaded.model, loaded.adapter, [0, 1], rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "split"))
    config = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn.c_attn.q_proj", "attn.c_attn.v_proj"]
    config["base_model_name_or_path"] = str(tiny_model_dirs["gpt2"])
    (tmp_path / "split" / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.arange(3, 30).reshape(1, -1)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = load_model(str(tmp_path / "split")).model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # and its fused form, through plain PEFT, computes the same
    fused = fuse_split_lora(load_file(str(tmp_path / "split" / "adapter_model.safetensors")), loaded.adapter)
    (tmp_path / "fused").mkdir()
    from safetensors.torch import save_file

    save_file(fused, str(tmp_path / "fused" / "adapter_model.safetensors"))
    (tmp_path / "fused" / "adapter_config.json").write_text(json.dumps(native_config(config, loaded.adapter)))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dirs["gpt2"])),
                                      str(tmp_path / "fused")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=2e-5, rtol=1e-5)


def test_log_with_tensorboard_writes_the_curves_of_train_log(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import cli_fails

    argv = ["finetune", "--model", str(tiny_model_dirs["llama"]), "--data", TRAIN, "--n-docs", "6", "--max-tokens",
            "64", "--method", "lora", "--batch-size", "2", "--max-steps", "3", "--eval-every", "1", "--no-progress"]
    out = tmp_path / "ft"
    assert run_cli([*argv, "--log-with", "tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(next(out.glob("trackers/**/events.out.tfevents.*")).parent))
    events.Reload()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in log if r["type"] == "train"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == train
    assert [e.step for e in events.Scalars("val/loss")] == [r["step"] for r in log if r["type"] == "val"]
    # a tracker is not part of what the run computes: the finished run is found as it was, not refused
    assert run_cli([*argv, "--out", str(out)]) == 0
    cli_fails([*argv, "--log-with", "no-such-tracker", "--out", str(tmp_path / "x")], capsys,
              "--log-with no-such-tracker: not a tracker Accelerate knows")
    cli_fails([*argv, "--log-with", "tensorboard,comet_ml", "--out", str(tmp_path / "x")], capsys,
              "--log-with comet_ml: its package is not installed here")
    assert not (tmp_path / "x").exists()
