"""Output folders: sumcircuit never deletes or changes a file it did not write, and a refused run touches nothing.

Each case runs the CLI the way a careless user would and asserts the exit
code, the one-line message (naming the option and the file), and a snapshot
of every file that is not sumcircuit's own output, taken before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import CNNDM, cli_fails, run_cli, snapshot

TRAIN = str(CNNDM / "train.jsonl.gz")


def _analyze(base: Path | str, tuned: Path | str, out: Path | str, *extra: str, data: str = TRAIN) -> list[str]:
    return ["analyze", "--base", str(base), "--tuned", str(tuned), "--data", data, "--n-docs", "2",
            "--max-tokens", "64", "--n-bootstrap", "10", "--no-progress", "--out", str(out), *extra]


def _finetune(model: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", TRAIN, "--n-docs", "6", "--max-tokens", "64",
            "--method", "lora", "--batch-size", "2", "--max-steps", "1", "--eval-every", "1", "--no-progress",
            "--out", str(out), *extra]


def _user_folder(root: Path) -> Path:
    """A folder of someone's work: what an --out typo lands on."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "main.py").write_text("print('hello')\n")
    (root / "thesis.tex").write_text("\\documentclass{article}\n")
    return root


@pytest.mark.parametrize("restart", [True, False])
def test_folder_of_user_files_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path, restart: bool,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    llama = tiny_model_dirs["llama"]
    work = _user_folder(tmp_path / "work")
    before = snapshot(work)
    last = cli_fails(_analyze(llama, llama, work, *(["--restart"] if restart else [])), capsys,
                     f"--out {work}", "did not write")
    assert "src" in last and "thesis.tex" in last
    assert snapshot(work) == before  # not even a lock file is left


def test_restart_keeps_files_beside_an_earlier_analysis(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    assert run_cli(_analyze(llama, llama, out)) == 0
    (out / "notes.txt").write_text("what I saw\n")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"\x89PNG")
    before = snapshot(out)
    cli_fails(_analyze(llama, llama, out, "--restart"), capsys, "--out", "notes.txt", "plots", "did not write")
    assert snapshot(out) == before
    shutil.rmtree(out / "plots")
    (out / "notes.txt").unlink()
    assert run_cli(_analyze(llama, llama, out, "--restart")) == 0  # its own files are replaced as asked
    assert (out / "heads.csv").is_file() and not (out / "INCOMPLETE.json").exists()


def test_circuit_file_written_into_an_analysis_is_its_own(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    assert run_cli(_analyze(llama, llama, out)) == 0
    assert run_cli(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(out / "circuit.json")]) == 0
    assert run_cli(_analyze(llama, llama, out, "--restart")) == 0  # circuit.json is sumcircuit's: no refusal
    assert (out / "circuit.json").is_file()  # and not analyze's to remove


def test_circuit_refuses_to_overwrite_a_user_file(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    assert run_cli(_analyze(llama, llama, out)) == 0
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": true}\n')
    cli_fails(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(mine)], capsys,
              f"--out {mine}", "did not write")
    assert json.loads(mine.read_text()) == {"mine": True}


def _inputs_case(kind: str, models: dict[str, Path], tmp_path: Path) -> tuple[list[str], Path, str]:
    """(argv, the input folder that must stay unchanged, the input's option) for each way --out meets an input."""
    model = Path(shutil.copytree(models["llama"], tmp_path / "model"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "train.jsonl.gz"
    shutil.copy(TRAIN, data)
    cases: dict[str, tuple[list[str], Path, str]] = {
        "analyze out = model": (_analyze(models["llama"], model, model), model, "--tuned"),
        "analyze --restart out = model": (_analyze(model, models["llama"], model, "--restart"), model, "--base"),
        "analyze out inside model": (_analyze(model, model, model / "analysis"), model, "--base"),
        "analyze out contains data": (_analyze(models["llama"], models["llama"], data_dir, data=str(data)),
                                      data_dir, "--data"),
        "finetune out = model": (_finetune(model, model), model, "--model"),
        "finetune out contains model": (_finetune(model, tmp_path), tmp_path, "--model"),
        "evaluate out = model": (["evaluate", "--model", str(model), "--data", TRAIN, "--n-docs", "2",
                                  "--out", str(model)], model, "--model"),
        "patch out = tuned": (["patch", "--base", str(models["llama"]), "--tuned", str(model), "--data", TRAIN,
                               "--n-docs", "2", "--out", str(model / "x")], model, "--tuned"),
    }
    return cases[kind]


@pytest.mark.parametrize("kind", ["analyze out = model", "analyze --restart out = model", "analyze out inside model",
                                  "analyze out contains data", "finetune out = model", "finetune out contains model",
                                  "evaluate out = model", "patch out = tuned"])
def test_out_that_meets_an_input_is_refused_first(kind: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv, guarded, option = _inputs_case(kind, tiny_model_dirs, tmp_path)
    before = snapshot(guarded)
    cli_fails(argv, capsys, "--out", option)
    assert snapshot(guarded) == before


def test_refused_rerun_leaves_a_finished_folder_as_it_was(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import sumcircuit as sc

    llama = tiny_model_dirs["llama"]
    tuned = tmp_path / "ft"
    assert run_cli(_finetune(llama, tuned)) == 0
    patch = tmp_path / "patch"
    patch_argv = ["patch", "--base", str(llama), "--tuned", str(tuned / "final"), "--data", TRAIN, "--n-docs", "2",
                  "--max-tokens", "64", "--n-bootstrap", "10", "--no-progress", "--out", str(patch)]
    assert run_cli(patch_argv) == 0
    for folder in (tuned, patch):  # as an earlier process left them: its pid in the lock file
        (folder / ".sumcircuit.lock").write_text("4242\n")
    finished = {tuned: snapshot(tuned), patch: snapshot(patch)}
    cli_fails(_finetune(llama, tuned, "--rank", "4"), capsys, "different run", "config.rank")  # another config
    cli_fails([*patch_argv[:2], str(tmp_path / "missing"), *patch_argv[3:]], capsys, "missing")
    cli_fails([*patch_argv[:6], str(tmp_path / "missing.jsonl"), *patch_argv[7:]], capsys, "missing.jsonl")
    cli_fails(_analyze(llama, tuned / "final", patch), capsys, "--out", "patching")  # a folder of another kind
    for folder, before in finished.items():
        assert snapshot(folder) == before
    sc.load_run(patch)  # still readable


def test_refused_run_creates_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "deeper"
    cli_fails(_analyze(tmp_path / "nope", tmp_path / "nope", out), capsys, "nope")
    assert not (tmp_path / "new").exists()


def test_stale_temporary_files_go_on_the_next_run(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    assert run_cli(_analyze(llama, llama, out)) == 0
    # what a kill -9 during the final write leaves: the marker, and a temporary file of the summary
    (out / "INCOMPLETE.json").write_text(json.dumps({"command": "analyze", "pid": 1, "before": []}))
    (out / ".summary.json.k2j3h4g5.tmp").write_text("{")
    assert run_cli(_analyze(llama, llama, out)) == 0
    assert not list(out.glob(".*.tmp")) and not (out / "INCOMPLETE.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "--model", "gpt2", "--data", TRAIN, "--n-docs", "2"], "model 'gpt2' is on the Hugging Face hub"),
    (["evaluate", "--model", "{llama}", "--data", "hf:abisee/cnn_dailymail:3.0.0", "--n-docs", "2"],
     "data set hf:abisee/cnn_dailymail:3.0.0 is on the Hugging Face hub")])
def test_offline_hub_ids_fail_fast_and_leave_nothing(argv: list[str], needle: str, tiny_model_dirs: dict[str, Path],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig

    from sumcircuit import hub

    hub.reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what this machine is; CI may differ, the setting decides
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache

    def retrying(*args: object, **kwargs: object) -> None:  # where the 30 to 75 s of retries were spent
        raise AssertionError("the hub was asked although it cannot answer")

    monkeypatch.setattr(AutoConfig, "from_pretrained", retrying)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", retrying)
    out = tmp_path / "out"
    cli_fails([a.replace("{llama}", str(tiny_model_dirs["llama"])) for a in argv] + ["--out", str(out)], capsys,
              needle, "HF_HUB_OFFLINE is set", "offline, use")
    assert not out.exists()
    hub.reachable.cache_clear()


def test_disk_full_while_saving_state_is_one_line(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import SafetensorError

    from sumcircuit import artifacts

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(artifacts, "save_file", full)
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    cli_fails(_analyze(llama, llama, out), capsys, "no space left on the device", "accumulators.safetensors")
    assert (out / "INCOMPLETE.json").is_file() and not list(out.glob(".*.tmp"))  # visibly incomplete, no debris


def test_circuit_out_onto_an_input_or_another_commands_file(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    llama = tiny_model_dirs["llama"]
    out = tmp_path / "an"
    assert run_cli(_analyze(llama, llama, out)) == 0
    before = snapshot(out)
    cli_fails(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(out / "summary.json")], capsys,
              "summary.json", "another sumcircuit command")
    cli_fails(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(out / "heads.csv")], capsys,
              "heads.csv")
    assert snapshot(out) == before


def test_a_study_stage_record_is_sumcircuit_bookkeeping(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A study writes stage.json into a stage's folder after the stage's command finished; a rerun of that
    command there is not refused for it."""
    out = tmp_path / "full_s1"
    assert run_cli(_finetune(tiny_model_dirs["llama"], out)) == 0
    (out / "stage.json").write_text(json.dumps({"key": "abc"}))
    assert run_cli(_finetune(tiny_model_dirs["llama"], out)) == 0
    assert run_cli(_finetune(tiny_model_dirs["llama"], out, "--no-resume")) == 0
