"""The public API and the defects a new user hit (issue 10), each with a test that failed before the fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sumcircuit as sc
from sumcircuit.artifacts import atomic_save_safetensors, atomic_write_json
from sumcircuit.cli import COMMANDS, main
from sumcircuit.data import DataConfig, load_examples
from sumcircuit.errors import DataError, ModelError

from helpers import CNNDM, REPO


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


# ---------------------------------------------------------------- API surface

def test_public_api_names_resolve_and_import_is_light() -> None:
    for name in sc.__all__:
        assert getattr(sc, name) is not None, name
    code = ("import sys, sumcircuit, sumcircuit.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"  # --help and `import sumcircuit` load no heavy library


def test_help_is_fast() -> None:
    """`sumcircuit --help` and `sumcircuit COMMAND --help` answer in under 1.5 s (they took 9-15 s)."""
    for args in ([], *[[c] for c in COMMANDS]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sumcircuit.cli", *args, "--help"], env=_env(), check=True,
                       capture_output=True)
        assert time.perf_counter() - start < 1.5, args


def test_site_vocabulary_round_trips() -> None:
    cases = {"L2.H3": "blocks.2.attn.hook_z", "L2.N17": "blocks.2.mlp.hook_post", "L2.attn": "blocks.2.hook_attn_out",
             "L2.mlp": "blocks.2.hook_mlp_out", "L0.resid_pre": "blocks.0.hook_resid_pre",
             "L5.resid_post": "blocks.5.hook_resid_post"}
    for name, hook in cases.items():
        site = sc.Site.parse(name)
        assert site.name == name and str(site) == name and site.to_hook() == (hook, site.index)
        assert sc.Site.parse(site.to_hook_name()) == site  # the hook name round-trips, head index included
        assert site.to_hook_name() == (hook if site.index is None else f"{hook}[{site.index}]")
        assert sc.Site.parse(hook, index=site.index) == site
    assert sc.Site.parse("L2.block") == sc.Site(2, "resid_post")  # earlier files' spelling
    assert sc.parse_sites("2.3,L1.H0") == [sc.Site(1, "attn_head", 0), sc.Site(2, "attn_head", 3)]
    assert sc.parse_sites([[2, 3]]) == [sc.Site(2, "attn_head", 3)]
    assert sorted([sc.Site(1, "mlp"), sc.Site(1, "attn"), sc.Site(0, "resid_post")])[0] == sc.Site(0, "resid_post")
    with pytest.raises(sc.SumcircuitError, match="needs a head index"):
        sc.Site.parse("blocks.2.attn.hook_z")
    with pytest.raises(sc.SumcircuitError, match="cannot parse component"):
        sc.Site.parse("layer two")


def test_adapter_table_maps_every_site_kind(tiny_model_dirs: dict[str, Path]) -> None:
    """Each site kind has a module in every family; reading it gives the activation its name says."""
    for family, folder in tiny_model_dirs.items():
        loaded = sc.load_model(str(folder))
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            hidden = loaded.model(ids, output_hidden_states=True).hidden_states
        from sumcircuit.causal.interventions import Interventions

        store: dict = {}
        with Interventions(loaded.model, loaded.adapter) as iv, torch.no_grad():
            for kind in ("resid_pre", "attn", "attn_heads", "mlp", "mlp_neurons", "resid_post"):
                iv.capture((kind, 1), store)
            loaded.model(ids)
        assert torch.allclose(store[("resid_pre", 1)], hidden[1]), family
        assert torch.allclose(store[("resid_post", 1)], hidden[2], atol=1e-6), family
        # the residual stream adds exactly the attention and MLP contributions
        assert torch.allclose(store[("resid_pre", 1)] + store[("attn", 1)] + store[("mlp", 1)],
                              store[("resid_post", 1)], atol=1e-5), family
        assert store[("attn_heads", 1)].shape[-1] == loaded.adapter.n_heads * loaded.adapter.head_dim
        assert store[("mlp_neurons", 1)].shape[-1] == loaded.adapter.n_neurons


def test_api_end_to_end_in_memory(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Specs or loaded models in, typed results out; save() writes what the CLI writes; load_run reads it."""
    base = sc.load_model(str(tiny_model_dirs["llama"]))
    data = DataConfig(str(CNNDM), split="val", n_docs=3, max_tokens=64)
    analysis = sc.analyze(base, str(tiny_model_dirs["llama"]), data, sc.AnalysisConfig(n_bootstrap=20, cka=False),
                          runtime=sc.Runtime(progress=False))
    heads = analysis.to_pandas()
    assert len(heads) == base.adapter.n_layers * base.adapter.n_heads
    assert float(heads["kl_base_tuned"].abs().max()) == 0.0  # a model against itself
    assert analysis.summary["provenance"]["models"][0]["weights_sha256"]
    analysis.save(tmp_path / "analysis")
    assert sorted(p.name for p in (tmp_path / "analysis").iterdir() if not p.name.startswith(".")) == sorted(
        ["heads.csv", "layers.csv", "neurons.csv", "stats.safetensors", "per_doc.safetensors", "summary.json"])
    assert isinstance(sc.load_run(tmp_path / "analysis"), sc.AnalysisResult)
    patched = sc.patch(base, base, data, sc.PatchConfig(granularity="block", n_bootstrap=20))
    assert set(patched.to_pandas()["kind"]) == {"resid_post", "all"}
    assert patched.to_pandas()["component"].iloc[0] == "L0.resid_post"
    ablated = sc.ablate(base, data, sc.AblationConfig(heads=("L1.H2",), n_bootstrap=20))
    assert ablated.summary["circuit"]["members"] == ["L1.H2"] and ablated.effect == ablated.summary["effect"]
    with pytest.raises(sc.SumcircuitError, match="heads L9.H0: layer 9 out of range"):
        sc.ablate(base, data, sc.AblationConfig(heads=("L9.H0",)))


# ---------------------------------------------------------------- defects

def test_report_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sumcircuit report RUN` failed with TypeError: the positional `run` overwrote the handler."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "reproduce.json").write_text('{"study": {"model": "m", "seeds": [1]}, "preset": {"name": "quick"}}')
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file()
    assert "report written to" in capsys.readouterr().out


def test_outputs_get_the_umask_mode(tmp_path: Path) -> None:
    """Result files were 0600 (mkstemp's mode); colleagues on a shared server could not read them."""
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_safetensors({"t": torch.zeros(2)}, tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "t.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_any_peft_lora_adapter_is_a_model_spec(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An all-linear adapter (the most common kind) is loaded merged; a pickle-only one gets a short error."""
    from peft import LoraConfig, get_peft_model

    base = sc.load_model(str(tiny_model_dirs["llama"]))
    peft_model = get_peft_model(base.model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dirs["llama"])
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    merged = sc.load_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        got = merged.model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert merged.source.kind == "adapter"
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(ModelError, match="no adapter_model.safetensors") as err:
        sc.load_model(str(tmp_path / "adapter"))
    assert len(str(err.value)) < 400


def test_parquet_save_to_disk_and_in_memory_datasets(tmp_path: Path) -> None:
    """Parquet crashed with UnicodeDecodeError; datasets objects and save_to_disk folders were refused."""
    import datasets

    rows = [json.loads(line) for line in _lines(CNNDM / "val.jsonl.gz", 3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "val.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"val": ds}).save_to_disk(str(tmp_path / "dict"))
    want = [e.text for e in load_examples(DataConfig(str(CNNDM), split="val", n_docs=3)).examples]
    for cfg in (DataConfig(str(tmp_path / "val.parquet")), DataConfig(str(tmp_path), split="val"),
                DataConfig(str(tmp_path / "disk")), DataConfig(str(tmp_path / "dict"), split="val"),
                DataConfig.from_dataset(ds)):
        got = load_examples(cfg)
        assert [e.text for e in got.examples] == want, cfg.data
        assert got.source.text_field == "article" and got.source.sha256
    with pytest.raises(DataError, match="split 'test' not in this DatasetDict"):
        load_examples(DataConfig(str(tmp_path / "dict"), split="test"))


def _lines(path: Path, n: int) -> list[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [next(fh) for _ in range(n)]


def test_layer_ranges_work_for_finetune(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`finetune --layers 2-5` failed while `ablate --layers 2-5` worked: one parser now serves both."""
    rc = main(["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM / "train.jsonl.gz"),
               "--n-docs", "6", "--max-tokens", "64", "--method", "targeted-lora", "--layers", "1-2",
               "--max-steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "ft")])
    assert rc == 0
    assert json.loads((tmp_path / "ft" / "train_summary.json").read_text())["layers"] == [1, 2]
    assert "layers [1, 2]" in capsys.readouterr().out
    assert main(["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM / "train.jsonl.gz"),
                 "--method", "targeted-lora", "--layers", "1-9", "--out", str(tmp_path / "x")]) == 2


def test_evaluate_shows_progress(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(CNNDM), "--split", "val",
               "--n-docs", "2", "--max-tokens", "64", "--max-new-tokens", "4", "--out", str(tmp_path / "e")])
    assert rc == 0
    assert "generate: 100%" in capsys.readouterr().err


def test_plain_pytest_collects_every_module() -> None:
    """Plain `pytest` failed to collect 5 modules (only `python -m pytest` worked)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("pytest")), "--collect-only", "-q"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1]


def test_no_test_hooks_in_library_code() -> None:
    src = REPO / "src" / "sumcircuit"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "DEBUG_STEP_SLEEP" not in text and "import" + "orskip" not in text, path


def test_no_self_skipping_tests() -> None:
    """Tests skipped themselves when our own modules failed to import."""
    own = "importorskip(" + '"sumcircuit'
    for path in (REPO / "tests").rglob("test_*.py"):
        assert own not in path.read_text(), path


@pytest.mark.real
def test_quickstart_example_runs(tmp_path: Path) -> None:
    """examples/quickstart.py on the real model and data: the README opens with it, so CI runs it."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--out", str(tmp_path),
                           "--docs", "2"], capture_output=True, text=True, env=_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<AnalysisResult 30 layers x 9 heads, 2 documents;" in proc.stdout and "of heads more focused" in proc.stdout
    assert "<FinetuneResult full on all 30 layers: 4 steps" in proc.stdout and "blocks." in proc.stdout
    assert (tmp_path / "kl_per_head.png").read_bytes()[:4] == b"\x89PNG"
    assert isinstance(sc.load_run(tmp_path / "attribution"), sc.AttributionResult)
    assert isinstance(sc.load_run(tmp_path / "patch"), sc.PatchResult)
