"""Causal methods are a registry: a toy method is one module and one registration, and gets an API call and a command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sumcircuit as sc
from sumcircuit.causal import CAUSAL_METHODS
from sumcircuit.cli import commands, main
from sumcircuit.results import RESULT_KINDS

from helpers import CNNDM


@pytest.fixture
def scale_mlp() -> Iterator[None]:
    from toys.causal_method import register

    register()
    yield
    CAUSAL_METHODS.unregister("scale-mlp")
    RESULT_KINDS.unregister("scale")


def test_builtin_methods_are_registered() -> None:
    assert CAUSAL_METHODS.names() == ("ablate", "patch", "attribute", "faithfulness")
    assert commands()[6:10] == ("ablate", "patch", "attribute", "faithfulness")


def test_a_registered_method_is_an_api_call_and_a_command(scale_mlp: None, tiny_model_dirs: dict[str, Path],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["gpt2"])
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=48)
    from toys.causal_method import ScaleConfig

    result = sc.run_causal("scale-mlp", model, data=data, config=ScaleConfig(layers=(1, 2), factor=0.0))
    # independent reference: zeroing the MLP is what ablate's zero mode does to both layers' MLP blocks
    ablated = sc.ablate(model, data, sc.AblationConfig(layers=(1, 2), component="mlp", batch_size=2))
    per_doc = {r["doc_id"]: r["loss_ablated"] - r["loss_clean"] for r in ablated.per_doc}
    for row in result.summary["docs"]:
        assert row["delta"] == pytest.approx(per_doc[row["doc_id"]], abs=1e-6)
    assert "scale-mlp" in commands()
    assert main(["scale-mlp", "--model", model, "--data", str(CNNDM), "--split", "val", "--n-docs", "3",
                 "--max-tokens", "48", "--layers", "1,2", "--factor", "0.0", "--out", str(tmp_path / "s")]) == 0
    assert "mean loss change" in capsys.readouterr().out
    saved = json.loads((tmp_path / "s" / "scale.json").read_text())
    assert [r["delta"] for r in saved["docs"]] == [r["delta"] for r in result.summary["docs"]]
    assert isinstance(sc.load_run(tmp_path / "s"), type(result))  # its output kind is registered too
    with pytest.raises(sc.ConfigError, match="scale-mlp takes one model, got 2"):
        sc.run_causal("scale-mlp", model, model, data=data)
    assert torch.is_grad_enabled()
