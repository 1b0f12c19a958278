"""Your own hooks on the pair, named by Site, and a cache of chosen sites, against independent references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sumcircuit as sc
from sumcircuit.causal.interventions import Interventions, batches, document_losses
from sumcircuit.data.encoding import encode_all
from sumcircuit.data.records import load_examples

from helpers import CNNDM


def _data() -> sc.DataConfig:
    return sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=48)


def test_a_hook_on_the_pair_equals_zero_ablation(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    base, tuned = (sc.load_model(str(tiny_model_dirs[family])) for _ in range(2))
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a different "tuned" model of the same shape
    seen: list[str] = []

    def zero_head(x: torch.Tensor, ctx: sc.HookContext) -> torch.Tensor | None:
        seen.append(ctx.model)
        assert x.shape[-1] == base.adapter.head_dim and ctx.attention_mask.shape == x.shape[:2]
        return torch.zeros_like(x) if ctx.model == "tuned" else None  # only the tuned model is edited

    result = sc.trace((base, tuned), _data(), hooks={"blocks.1.attn.hook_z[2]": zero_head},
                      config=sc.TraceConfig(batch_size=2))
    losses = result.to_pandas().pivot(index="doc_id", columns="model", values="loss")
    ablated = sc.ablate(tuned, _data(), sc.AblationConfig(heads="L1.H2", batch_size=2), runtime=sc.Runtime(progress=False))
    clean = sc.ablate(base, _data(), sc.AblationConfig(heads="L1.H2", batch_size=2), runtime=sc.Runtime(progress=False))
    for row in ablated.per_doc:
        assert losses.loc[row["doc_id"], "tuned"] == pytest.approx(row["loss_ablated"], abs=1e-9)
    for row in clean.per_doc:
        assert losses.loc[row["doc_id"], "base"] == pytest.approx(row["loss_clean"], abs=1e-9)  # None: unchanged
    assert set(seen) == {"base", "tuned"} and result.summary["hooked_sites"] == ["L1.H2"]


def test_the_cache_holds_each_documents_activation_without_padding(tiny_model_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    model = sc.load_model(str(tiny_model_dirs["llama"]))
    sites = ["L1.mlp", "L2.H1", "blocks.0.mlp.hook_post[5]", "L2.resid_post"]
    result = sc.run_with_cache(model, _data(), sites, config=sc.TraceConfig(batch_size=2), out=tmp_path / "t")
    examples = load_examples(_data())
    encoded = encode_all(model.tokenizer, examples.examples, _data())
    store: dict = {}
    for idx, batch in batches(encoded, 2, int(model.tokenizer.pad_token_id), "cpu"):
        with Interventions(model.model, model.adapter) as iv, torch.no_grad():  # the independent capture
            for activation in (("mlp", 1), ("attn_heads", 2), ("mlp_neurons", 0), ("resid_post", 2)):
                iv.capture(activation, store)
            losses = document_losses(model.model, batch)
        for row, doc in enumerate(idx):
            n = len(encoded[doc].input_ids)
            hd = model.adapter.head_dim
            torch.testing.assert_close(result.activations("L1.mlp")[doc], store[("mlp", 1)][row, :n])
            torch.testing.assert_close(result.activations("L2.H1")[doc], store[("attn_heads", 2)][row, :n, hd:2 * hd])
            torch.testing.assert_close(result.activations("L0.N5")[doc], store[("mlp_neurons", 0)][row, :n, 5:6])
            assert result.losses[doc]["loss"] == pytest.approx(float(losses[row]), abs=1e-9)
    again = sc.load_run(tmp_path / "t")
    assert isinstance(again, sc.TraceResult)
    assert [(r["doc_id"], r["model"]) for r in again.losses] == [(r["doc_id"], r["model"]) for r in result.losses]
    assert [r["loss"] for r in again.losses] == pytest.approx([r["loss"] for r in result.losses], rel=1e-7)  # CSV
    for site in ("L1.mlp", "L2.H1", "L0.N5", "L2.resid_post"):
        for a, b in zip(again.activations(site), result.activations(site), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(sc.ConfigError, match="L3.attn of model was not cached"):
        result.activations("L3.attn")
    with pytest.raises(sc.ConfigError, match=r"cache: site L9.mlp: layer 9 out of range: the model has 3 layers"):
        sc.run_with_cache(model, _data(), ["L9.mlp"])
