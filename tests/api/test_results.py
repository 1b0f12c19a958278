"""Every result: a short repr, ``save`` then ``XResult.read`` gives it back, ``load_run`` dispatches by kind, plots keep
inline plotting alive, and every operation takes the same keywords."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

import sumcircuit as sc
from sumcircuit.generalization.run import compare_profiles
from sumcircuit.results import RESULT_KINDS

from helpers import CNNDM, synthetic_run

OPERATIONS = (sc.analyze, sc.patch, sc.attribute, sc.ablate, sc.evaluate, sc.finetune)


def test_every_operation_has_one_shape() -> None:
    """``op(inputs, config=None, *, runtime=None, out=..., resume=True)`` for every operation."""
    for op in OPERATIONS:
        params = inspect.signature(op).parameters
        assert "config" in params and params["config"].default is None, op.__name__
        assert params["runtime"].kind == inspect.Parameter.KEYWORD_ONLY and params["runtime"].default is None
        assert params["out"].kind == inspect.Parameter.KEYWORD_ONLY, op.__name__
        assert params["resume"].kind == inspect.Parameter.KEYWORD_ONLY and params["resume"].default is True


@pytest.fixture(scope="module")
def results(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, sc.Result]:
    """One result of every kind, computed on a tiny pair."""
    root = tmp_path_factory.mktemp("results")
    quiet = sc.Runtime(progress=False)
    model = str(tiny_model_dirs["llama"])
    data = sc.DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=48)
    train = sc.DataConfig(str(CNNDM), split="train", n_docs=6, max_tokens=48)
    tuned = sc.finetune(model, train, sc.FinetuneConfig(method="full", max_steps=2, batch_size=2, lr=1e-3),
                        runtime=quiet, out=root / "ft")
    analysis = sc.analyze(model, tuned, data, sc.AnalysisConfig(n_bootstrap=20), runtime=quiet)
    circuit = sc.select_circuit(analysis, sc.CircuitConfig(top_layers=2, top_heads=2, n_bootstrap=20),
                                out=root / "circuit.json")
    return {
        "finetune": tuned, "analysis": analysis,
        "circuit": circuit,
        "faithfulness": sc.faithfulness(model, tuned, data, sc.FaithfulnessConfig(
            circuits=(str(root / "circuit.json"),), random_circuits=2, n_bootstrap=20), runtime=quiet),
        "evaluation": sc.evaluate(tuned, data, sc.GenerationConfig(max_new_tokens=4), runtime=quiet),
        "patching": sc.patch(model, tuned, data, sc.PatchConfig(n_bootstrap=20), runtime=quiet),
        "attribution": sc.attribute(model, tuned, data, sc.AttributionConfig(n_bootstrap=20), runtime=quiet),
        "ablation": sc.ablate(tuned, data, sc.AblationConfig(layers=(1,), random_controls=2, n_bootstrap=20),
                              runtime=quiet),
        "trace": sc.run_with_cache((model, tuned), data, ["L1.mlp"]),
        "compare": compare_profiles([synthetic_run("a", [3], 1), synthetic_run("b", [5], 2)],
                                    sc.CompareConfig(n_permutations=200, n_bootstrap=50)),
    }


def test_every_kind_has_a_short_repr(results: dict[str, sc.Result]) -> None:
    assert set(results) | {"study"} == set(RESULT_KINDS.names())
    for kind, result in results.items():
        text = repr(result)
        assert text.startswith(f"<{type(result).__name__} ") and len(text) < 400, (kind, text)
        assert "tables:" in text and str(result) == text


def test_save_then_read_gives_the_same_result(results: dict[str, sc.Result], tmp_path: Path) -> None:
    for kind, result in results.items():
        folder = result.save(tmp_path / kind)
        folder = folder if folder.is_dir() else folder.parent
        cls = RESULT_KINDS.get(kind).result_class()
        assert type(result) is cls
        again = cls.read(folder)
        assert type(sc.load_run(folder)) is cls, kind  # load_run dispatches through the registry
        assert again.summary.keys() == json.loads(json.dumps(result.summary, default=str)).keys(), kind
        for name in result.tables():
            want, got = result.to_pandas(name), again.to_pandas(name)
            if not len(want):
                continue
            pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False,
                                          rtol=1e-6, obj=f"{kind}.{name}")


def test_results_are_model_arguments(results: dict[str, sc.Result]) -> None:
    tuned = results["finetune"]
    assert isinstance(tuned, sc.FinetuneResult) and tuned.model_spec() == str(tuned.final_dir)
    assert results["analysis"].summary["provenance"]["models"][1]["location"].endswith("final")


def test_plots_never_change_global_state(results: dict[str, sc.Result], tmp_path: Path) -> None:
    """A saving call switched matplotlib to Agg and killed inline plotting for the rest of a notebook."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    figures = plt.get_fignums()
    for kind in ("analysis", "patching", "attribution", "ablation", "circuit", "finetune"):
        result = results[kind]
        result.save(tmp_path / kind)
        figure = result.plot()  # type: ignore[attr-defined]
        assert isinstance(figure, matplotlib.figure.Figure)
        assert sc.save_figure(figure, tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == before and plt.get_fignums() == figures  # nothing registered with pyplot
    src = Path(sc.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, path
