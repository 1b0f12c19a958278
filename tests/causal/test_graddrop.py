"""GradDrop (AtP*): each dropped-layer estimate against a backward with that layer detached by plain hooks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sumcircuit as sc
from sumcircuit.causal import attribution as att
from sumcircuit.causal.graddrop import dropped_estimates, graddrop_scores
from sumcircuit.causal.interventions import batches, document_losses, encode_examples
from sumcircuit.cli import main
from sumcircuit.data import DataConfig
from sumcircuit.models import load_model

from helpers import CNNDM, perturbed


def _reference(model: torch.nn.Module, adapter: sc.models.ArchitectureAdapter, batch: dict, layer: int,
               diffs: dict) -> dict:
    """One backward with layer ``layer``'s attention and MLP outputs detached (plain hooks), per key [units]."""
    detach = [m.register_forward_hook(lambda _m, _a, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple)
                                      else out.detach())
              for m in (adapter.site_module(model, "attn", layer)[0], adapter.site_module(model, "mlp", layer)[0])]
    live: dict = {}
    hooks = []
    for (kind, l) in diffs:
        module, port = adapter.site_module(model, kind, l)
        if port == "input":
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, key=(kind, l): live.__setitem__(key, args[0])))
        else:
            hooks.append(module.register_forward_hook(lambda _m, _a, out, key=(kind, l): live.__setitem__(key, out)))
    embed = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_())
    try:
        with torch.enable_grad():
            total = document_losses(model, batch, grad=True).sum()
            keys = list(diffs)
            grads = torch.autograd.grad(total, [live[k] for k in keys], allow_unused=True)
    finally:
        for h in (*detach, *hooks, embed):
            h.remove()
    out = {}
    for key, g in zip(keys, grads):
        units = adapter.n_heads if key[0] == "attn_heads" else adapter.n_neurons
        g = torch.zeros_like(diffs[key]) if g is None else g
        b, t, w = g.shape
        out[key] = (diffs[key] * g).double().reshape(b, t, units, w // units).sum(dim=(0, 1, 3))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_each_dropped_layer_equals_a_detached_backward(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    base = load_model(str(tiny_model_dirs[family]))
    tuned = perturbed(base, 0.1)
    adapter = base.adapter
    encoded = encode_examples(base.tokenizer, DataConfig(str(CNNDM), split="val", n_docs=2, max_tokens=64))[0]
    _, batch = next(iter(batches(encoded, 2, int(base.tokenizer.pad_token_id), torch.device("cpu"))))
    keys = [(kind, layer) for layer in range(adapter.n_layers) for kind in ("attn_heads", "mlp_neurons")]
    acts: dict = {}
    for label, model in (("base", base.model), ("tuned", tuned.model)):
        store: dict = {}
        with torch.no_grad(), sc.causal.interventions.Interventions(model, adapter) as iv:
            for key in keys:
                iv.capture(key, store)
            document_losses(model, batch)
        acts[label] = store
    diffs = {k: acts["base"][k] - acts["tuned"][k] for k in keys}  # noise: the tuned model receives
    units = {k: adapter.n_heads if k[0] == "attn_heads" else adapter.n_neurons for k in keys}
    got = dropped_estimates(tuned.model, adapter, batch, diffs, units)
    for layer in range(adapter.n_layers):
        ref = _reference(tuned.model, adapter, batch, layer, diffs)
        for key in keys:
            torch.testing.assert_close(got[key][layer], ref[key], rtol=1e-5, atol=1e-9)
            if key[1] == layer:  # a layer's own components are dropped with it
                assert torch.count_nonzero(got[key][layer]) == 0
            elif key[1] < layer:
                assert torch.count_nonzero(got[key][layer]) > 0
    scores = graddrop_scores({k: v.numpy() for k, v in got.items()}, 2, adapter.n_layers)
    key = ("attn_heads", 0)
    expected = np.abs(got[key].numpy() / 2).sum(axis=0) / (adapter.n_layers - 1)
    np.testing.assert_allclose(scores[key], expected)


def test_cli_atpstar_confirms_the_heads_graddrop_ranks_first(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`--method atpstar`: signed effects are the linear estimate's; --confirm patches GradDrop's top heads."""
    base = str(tiny_model_dirs["llama"])
    loaded = load_model(base)
    tuned_dir = tmp_path / "tuned"
    perturbed(loaded, 0.05).model.save_pretrained(tuned_dir)
    loaded.tokenizer.save_pretrained(tuned_dir)
    common = ["--base", base, "--tuned", str(tuned_dir), "--data", str(CNNDM), "--split", "val", "--n-docs", "3",
              "--max-tokens", "64", "--n-bootstrap", "20", "--granularity", "all", "--blocks", "estimate"]
    assert main(["attribute", *common, "--method", "atpstar", "--confirm", "3", "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"patched exactly: [3-6] heads, [3-6] neurons", printed), printed
    assert main(["attribute", *common, "--out", str(tmp_path / "l")]) == 0
    star = json.loads((tmp_path / "s" / "attribution.json").read_text())
    linear = sc.load_run(tmp_path / "l")
    # the unconfirmed signed effects are the linear estimate's
    confirmed = set(star["confirmed"]["exact_effect"]["denoise"]) | set(star["confirmed"]["exact_effect"]["noise"])
    star_rows = sc.load_run(tmp_path / "s").effects("noise", kind="mlp")
    for name, effect in linear.effects("noise", kind="mlp").items():
        assert star_rows[name] == pytest.approx(effect, rel=1e-9)
    # the confirmed heads are the top 3 by GradDrop score in each direction
    n_layers = loaded.adapter.n_layers
    assert star["cost"]["backwards"] == (2 + 2 * n_layers) * star["cost"]["batches"]
    for direction in ("denoise", "noise"):
        heads = {n: s for n, s in star["graddrop"]["scores"][direction].items() if ".H" in n}
        assert set(sorted(heads, key=lambda n: -heads[n])[:3]) <= confirmed
    maps = sc.load_run(tmp_path / "s").neurons
    assert maps["noise.graddrop"].shape == (n_layers, loaded.adapter.n_neurons) and (maps["noise.graddrop"] >= 0).all()
    assert "graddrop" not in json.loads((tmp_path / "l" / "attribution.json").read_text())
    assert att.AttributionConfig(method="atpstar").method == "atpstar"
