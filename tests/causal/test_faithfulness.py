"""Faithfulness curves against exact patching: every point is a joint patch, the whole model recovers the whole gap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sumcircuit as sc
from sumcircuit.cli import main
from sumcircuit.models import load_model

from helpers import CNNDM, perturbed


def _circuit(path: Path, layers: list[int], ranked: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"layers": layers, "heads": [], "ranked_layers": ranked}))
    return path


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_curves_are_joint_patches_and_the_whole_model_is_the_whole_gap(direction: str,
                                                                        tiny_model_dirs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    base = load_model(str(tiny_model_dirs["llama"]))  # 3 decoder layers
    tuned = perturbed(load_model(str(tiny_model_dirs["llama"])), 0.05)
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=64)
    every = _circuit(tmp_path / "every" / "circuit.json", [0, 1, 2], [2, 0, 1])
    top = _circuit(tmp_path / "top.json", [2], [2, 0, 1])
    result = sc.faithfulness(base, tuned, data, sc.FaithfulnessConfig(circuits=(str(every), str(top)),
                                                                      random_circuits=3, direction=direction,
                                                                      n_bootstrap=50))
    points = {(r["curve"], r["k"]): r for r in result.rows}
    assert [points[("every", k)]["layers"] for k in (1, 2, 3)] == ["2", "2,0", "2,0,1"]  # the circuit's order
    # all attention and MLP outputs of the tuned model patched in (or out): exactly the whole gap
    assert points[("every", 3)]["effect"] == pytest.approx(1.0, abs=1e-5)
    # the first point is patch's all-at-once row of that layer's attention and MLP
    exact = sc.patch(base, tuned, data, sc.PatchConfig(layers=(2,), directions=direction, n_bootstrap=50))
    together = next(r for r in exact.rows if r["component"] == "all")
    assert points[("every", 1)]["effect"] == pytest.approx(together["effect"], rel=1e-6)
    assert points[("top", 1)]["effect"] == pytest.approx(together["effect"], rel=1e-6)
    areas = result.summary["auc"]
    assert areas["every"]["auc"] == pytest.approx(sum(points[("every", k)]["effect"] for k in (1, 2, 3)) / 3)
    assert areas["every"]["ci_low"] <= areas["every"]["auc"] <= areas["every"]["ci_high"]
    randoms = {name for name, _ in points if name.startswith("random")}
    assert randoms == {"random1.1", "random1.2", "random1.3", "random3.1", "random3.2", "random3.3"}
    versus = result.summary["against_random"]["top"]
    assert versus["n_random"] == 3 and 0 < versus["p_value"] <= 1


def test_cli_faithfulness_writes_a_readable_folder(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["gpt2"])
    circuit = _circuit(tmp_path / "c.json", [0, 1], [1, 0])
    out = tmp_path / "faith"
    assert main(["faithfulness", "--base", model, "--tuned", model, "--data", str(CNNDM), "--split", "val",
                 "--n-docs", "2", "--max-tokens", "64", "--circuits", str(circuit), "--random-circuits", "2",
                 "--n-bootstrap", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "c (layers 1, 0): area" in printed and "warning:" in printed  # the same model twice: no gap
    again = sc.load_run(out)
    assert isinstance(again, sc.FaithfulnessResult) and len(again.to_pandas()) == 2 + 2 * 2
    assert (out / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(out)]) == 0 and "faithfulness" in (out / "report.html").read_text()
    assert main(["faithfulness", "--base", model, "--tuned", model, "--data", str(CNNDM), "--out",
                 str(tmp_path / "none")]) == 2
    assert "--circuits" in capsys.readouterr().err and not (tmp_path / "none").exists()
