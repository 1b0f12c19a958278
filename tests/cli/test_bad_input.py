"""Red team: what an unlucky user feeds the CLI gets exit code 2 and one line naming the problem.

Each case asserts the exit code, the absence of a traceback, and the file,
line, field or option in the message (or, where the input is valid but
unusual, that it is accepted correctly). Everything runs on tiny models.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sumcircuit.cli import main
from sumcircuit.errors import ModelError
from sumcircuit.models import load_model

from helpers import CNNDM

TRAIN = str(CNNDM / "train.jsonl.gz")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 before any work
        return int(exc.code or 0)


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI; assert exit 2, no traceback, and every needle in the last stderr line."""
    code = _run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def _tiny_copy(tiny_model_dirs: dict[str, Path], family: str, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dirs[family], dest))


def _patch_argv(base: Path | str, tuned: Path | str, out: Path | str, *extra: str, data: str = TRAIN) -> list[str]:
    return ["patch", "--base", str(base), "--tuned", str(tuned), "--data", data, "--n-docs", "2",
            "--max-tokens", "64", "--n-bootstrap", "10", "--out", str(out), *extra]


# ---------------------------------------------------------------- garbage in

def test_model_without_tokenizer_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_copy(tiny_model_dirs, "gpt2", tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (model / name).unlink(missing_ok=True)
    fails(_patch_argv(model, model, tmp_path / "out"), capsys, "tokenizer")


@pytest.mark.parametrize("value", ["0", "-5", "5", "abc"])
def test_max_tokens_range_checked_at_parse_time(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["analyze", "--base", "x", "--tuned", "y", "--data", TRAIN, "--out", "o", "--max-tokens", value],
          capsys, "--max-tokens")


def test_max_tokens_beyond_learned_positions(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = tiny_model_dirs["gpt2"]  # 256 learned positions
    fails(_patch_argv(gpt2, gpt2, tmp_path / "out", "--max-tokens", "512"), capsys,
          "--max-tokens 512 exceeds the model's 256 positions")


def test_training_template_without_summary_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    fails(["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", TRAIN, "--n-docs", "4",
           "--max-tokens", "64", "--method", "full", "--template", "{text}", "--max-steps", "1",
           "--out", str(tmp_path / "ft")], capsys, "--template", "{summary}")


@pytest.mark.parametrize("argv, option", [
    (["ablate", "--model", "m", "--data", "d", "--circuit", "c.json", "--out", "o", "--batch-size", "0"],
     "--batch-size"),
    (["patch", "--base", "a", "--tuned", "b", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["patch", "--base", "a", "--tuned", "b", "--data", "d", "--out", "o", "--n-bootstrap", "0"], "--n-bootstrap"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--method", "full", "--val-fraction", "1.5"],
     "--val-fraction"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--method", "full", "--lr", "nan"], "--lr"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--method", "full", "--min-delta", "-1"],
     "--min-delta"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--method", "full", "--lora-dropout", "1"],
     "--lora-dropout"),
    (["evaluate", "--model", "m", "--data", "d", "--out", "o", "--num-beams", "0"], "--num-beams"),
    (["circuit", "--analysis", "a", "--out", "c.json", "--top-layers", "0"], "--top-layers"),
    (["attribute", "--base", "a", "--tuned", "b", "--data", "d", "--out", "o", "--ig-steps", "0"], "--ig-steps"),
])
def test_numeric_options_have_ranges(argv: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    fails(argv, capsys, option)


# a device this machine lacks: plain CUDA on a CPU-only torch, an index past the last GPU on a GPU machine
MISSING_DEVICE = ("cuda:99", "CUDA device(s)") if torch.cuda.is_available() else ("cuda", "is not available here")


@pytest.mark.parametrize("argv", [["analyze", "--base", "a", "--tuned", "b", "--data", "d"],
                                  ["reproduce", "--model", "m", "--data", "d"]])
@pytest.mark.parametrize(("value", "needle"), [("foo", "unknown device 'foo'"), ("meta", "unknown device 'meta'"),
                                               MISSING_DEVICE])
def test_device_checked_at_parse_time(argv: list[str], value: str, needle: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Was torch's traceback from the first ``.to()``, after the weights had been read."""
    fails([*argv, "--out", str(tmp_path / "o"), "--device", value], capsys, "--device", needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["analyze", "--base", "a", "--tuned", "b", "--data", "d"],
                                  ["reproduce", "--model", "m", "--data", "d"]])
def test_dtype_checked_at_parse_time(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was an error after the output folder had been made (left INCOMPLETE)."""
    fails([*argv, "--out", str(tmp_path / "o"), "--dtype", "float64"], capsys, "--dtype", "unknown dtype 'float64'")
    assert not (tmp_path / "o").exists()


def test_load_model_checks_the_device_first() -> None:
    with pytest.raises(ModelError, match="is not available here|CUDA device") as info:
        load_model("no/such/model", device=MISSING_DEVICE[0])  # the device, before the spec is even looked up
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- data files

def test_non_utf8_jsonl_line_named_and_skippable(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"article": "A document about a town.", "highlights": "A summary of it."}).encode()
    path.write_bytes(good + b"\n" + b'{"article": "caf\xff", "highlights": "x"}\n' + good + b"\n")
    llama = tiny_model_dirs["llama"]
    fails(_patch_argv(llama, llama, tmp_path / "o1", data=str(path)), capsys, "bad.jsonl:2", "UTF-8")
    assert _run(_patch_argv(llama, llama, tmp_path / "o2", "--skip-invalid", data=str(path))) == 0
    summary = json.loads((tmp_path / "o2" / "patching.json").read_text())
    assert summary["n_docs"] == 2 and summary["provenance"]["data"]["skipped_invalid_records"] == 1  # stored
    assert "skipped 1 invalid record of" in caplog.text and "bad.jsonl:2" in caplog.text  # and printed


def test_truncated_and_fake_gzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = gzip.compress(b"".join(json.dumps({"article": f"Doc {i}.", "highlights": "Sum."}).encode() + b"\n"
                                   for i in range(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    fails(["data", str(tmp_path / "cut.jsonl.gz")], capsys, "cut.jsonl.gz")
    (tmp_path / "fake.jsonl.gz").write_text('{"article": "a", "highlights": "b"}\n')
    fails(["data", str(tmp_path / "fake.jsonl.gz")], capsys, "fake.jsonl.gz")


def test_csv_unquoted_comma_named_by_physical_line(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.csv"
    path.write_text('article,highlights\n"multi\nline doc",sum\nDoc, with comma,sum\n', encoding="utf-8")
    llama = tiny_model_dirs["llama"]
    fails(_patch_argv(llama, llama, tmp_path / "o", data=str(path)), capsys, "d.csv:4", "unquoted comma")


def test_csv_huge_field_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.csv"
    path.write_text('article,highlights\n"' + "word " * 40_000 + '",sum\n', encoding="utf-8")
    assert _run(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 read, 1 valid, 0 invalid" in out and "max 199999" in out


# ---------------------------------------------------------------- model files

def test_config_without_model_type(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_copy(tiny_model_dirs, "llama", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    fails(_patch_argv(model, model, tmp_path / "out"), capsys, "could not load model", str(model))


def test_truncated_safetensors(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_copy(tiny_model_dirs, "llama", tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    fails(_patch_argv(model, model, tmp_path / "out"), capsys, "could not load model", str(model))


def test_pickle_only_adapter_folder(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dirs["llama"]), "r": 2,
        "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    fails(_patch_argv(tiny_model_dirs["llama"], adapter, tmp_path / "out"), capsys, str(adapter))


# ---------------------------------------------------------------- output folders

def test_out_that_is_a_file_fails_before_any_work(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sumcircuit import models

    target = tmp_path / "taken"
    target.write_text("not a folder")
    llama = tiny_model_dirs["llama"]

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(models, "load_model", no_work)  # refused before loading a model or reading data
    fails(_patch_argv(llama, llama, target), capsys, "--out", "exists and is not a folder")
    fails(_patch_argv(llama, llama, target / "sub"), capsys, "--out", "cannot create it")
    fails(["ablate", "--model", str(llama), "--data", TRAIN, "--circuit", str(tmp_path / "c.json"), "--out",
           str(target)], capsys, "exists and is not a folder")


_HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
         "print('held', flush=True); time.sleep(60)")


def test_second_run_in_the_same_folder_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / ".sumcircuit.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        llama = tiny_model_dirs["llama"]
        fails(_patch_argv(llama, llama, out), capsys, "in use by another sumcircuit run", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock died with it and the next run takes the folder over
    assert _run(_patch_argv(tiny_model_dirs["llama"], tiny_model_dirs["llama"], out)) == 0
    assert (out / "patching.json").is_file() and not (out / "INCOMPLETE.json").exists()


def test_second_run_into_the_same_circuit_file_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    llama = str(tiny_model_dirs["llama"])
    analysis = tmp_path / "an"
    assert _run(["analyze", "--base", llama, "--tuned", llama, "--data", TRAIN, "--n-docs", "2", "--max-tokens", "64",
                 "--n-bootstrap", "10", "--out", str(analysis)]) == 0
    target = tmp_path / "c.json"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / ".c.json.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        fails(["circuit", "--analysis", str(analysis), "--top-layers", "1", "--out", str(target)], capsys,
              "in use by another sumcircuit run", f"pid {holder.pid}")
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    assert _run(["circuit", "--analysis", str(analysis), "--top-layers", "1", "--out", str(target)]) == 0
    assert json.loads(target.read_text())["layers"]
    assert _run(["circuit", "--analysis", str(analysis), "--top-layers", "1", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "circuit.json").is_file()  # a folder gets circuit.json inside, as documented


def test_interrupted_output_is_refused_by_readers(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sumcircuit as sc
    from sumcircuit.analysis import run as analysis

    llama = str(tiny_model_dirs["llama"])
    out = tmp_path / "an"
    argv = ["analyze", "--base", llama, "--tuned", llama, "--data", TRAIN, "--n-docs", "2", "--max-tokens", "64",
            "--n-bootstrap", "10", "--out", str(out)]
    assert _run(argv) == 0
    assert _run(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(tmp_path / "c.json")]) == 0

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # a kill in the middle of the restarted run

    monkeypatch.setattr(analysis, "accumulate", boom)
    assert _run([*argv, "--restart"]) == 130
    capsys.readouterr()
    assert not (out / "heads.csv").exists()  # --restart removed the old set first
    fails(["circuit", "--analysis", str(out), "--top-layers", "1", "--out", str(tmp_path / "c2.json")], capsys,
          "incomplete", "analyze")
    with pytest.raises(sc.SumcircuitError, match="incomplete"):
        sc.load_run(out)


def test_gguf_conversion_leftovers_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sumcircuit import models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = models.gguf_cache_dir(gguf, tmp_path / "cache")
    leftover = target.parent / f".{target.name}.abc123"
    (leftover / "sub").mkdir(parents=True)  # a killed conversion's temporary folder
    (leftover / "sub" / "model.safetensors").write_bytes(b"0" * 1000)

    def convert(path: Path, dest: Path) -> Path:
        dest.mkdir(parents=True)
        (dest / models._CACHE_META).write_text("{}")
        return dest

    monkeypatch.setattr(models, "_convert_gguf_locked", convert)
    assert models.convert_gguf(gguf, tmp_path / "cache") == target
    assert not leftover.exists()
    assert sorted(os.listdir(target.parent)) == sorted([target.name, f".{target.name}.lock"])


def test_resume_ignores_how_paths_are_spelled(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model_dirs["gpt2"]
    other_spelling = model.parent / ".." / model.parent.name / model.name
    data_spelling = str(CNNDM / ".." / CNNDM.name / "train.jsonl.gz")
    out = tmp_path / "ev"
    for spec, data in ((model, TRAIN), (other_spelling, data_spelling)):
        assert _run(["evaluate", "--model", str(spec), "--data", data, "--n-docs", "2", "--max-tokens", "64",
                     "--max-new-tokens", "4", "--bootstrap", "10", "--out", str(out)]) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2  # resumed (nothing to do), neither refused nor doubled


def test_damaged_resume_files(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from sumcircuit.analysis import STATE_FILE

    llama = str(tiny_model_dirs["llama"])
    out = tmp_path / "an"
    argv = ["analyze", "--base", llama, "--tuned", llama, "--data", TRAIN, "--n-docs", "2", "--max-tokens", "64",
            "--n-bootstrap", "10", "--shard-size", "1", "--out", str(out)]
    assert _run([*argv[:-4], "--n-docs", "1", "--out", str(out)]) == 0  # one document done: a resumable state
    state = out / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    fails(argv, capsys, str(state), "damaged", "--restart")
    ft = tmp_path / "ft"
    ft_argv = ["finetune", "--model", llama, "--data", TRAIN, "--n-docs", "6", "--max-tokens", "64", "--method",
               "lora", "--batch-size", "2", "--max-steps", "2", "--eval-every", "1", "--lr", "1e-3", "--no-progress",
               "--out", str(ft)]
    assert _run(ft_argv) == 0
    ckpt = sorted((ft / "checkpoints").glob("step-*"))[-1]
    (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10)
    fails([*ft_argv, "--resume"], capsys, "damaged", str(ckpt))


def test_reproduce_refuses_testing_on_training_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["reproduce", "--model", "m", "--data", TRAIN, "--out", str(tmp_path / "r")], capsys,
          "training and test documents would both come from", "--eval-data")


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_truncated_summaries_are_stored_in_every_output(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Summaries cut to fit --max-tokens are printed and cited in the outputs' provenance, not only logged."""
    model = str(tiny_model_dirs["gpt2"])
    assert main(["finetune", "--model", model, "--data", TRAIN, "--n-docs", "4", "--max-tokens", "32",
                 "--method", "full", "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0.5",
                 "--no-progress", "--out", str(tmp_path / "ft")]) == 0
    data = json.loads((tmp_path / "ft" / "train_summary.json").read_text())["provenance"]["data"]
    assert data["truncated_summaries"] == 4 and data["truncated_documents"] == 4  # GPT-4 abstracts > 32 tokens
    assert main(_patch_argv(model, tmp_path / "ft" / "final", tmp_path / "p")) == 0
    data = json.loads((tmp_path / "p" / "patching.json").read_text())["provenance"]["data"]
    assert data["truncated_summaries"] == 2 and data["truncated_documents"] == 2
    assert "2 of 2 summaries were cut to fit --max-tokens 64" in caplog.text


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ordinary token ids past the embedding: one line naming the folder, not an IndexError inside torch."""
    from helpers import TINY_VOCAB, save_tiny, train_tiny_tokenizer

    small = save_tiny("gpt2", tmp_path / "small", train_tiny_tokenizer(), vocab_size=TINY_VOCAB - 40)
    fails(_patch_argv(small, small, tmp_path / "out"), capsys, str(small), "embedding has 344 rows")


def test_added_special_tokens_past_the_embedding_are_tolerated(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from sumcircuit.models import load_model

    from helpers import TINY_VOCAB, save_tiny, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})  # id 384, no row
    folder = save_tiny("gpt2", tmp_path / "m", tokenizer, vocab_size=TINY_VOCAB)
    loaded = load_model(str(folder))
    assert len(loaded.tokenizer) == TINY_VOCAB + 1 and "past the model's 384 embedding rows" in caplog.text


def test_longer_rerun_resumes_although_truncation_counts_differ(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The truncation counts cited in provenance depend on --n-docs; they must not be part of the resume identity."""
    llama = str(tiny_model_dirs["llama"])
    argv = ["analyze", "--base", llama, "--tuned", llama, "--data", TRAIN, "--max-tokens", "32", "--n-bootstrap", "10",
            "--out", str(tmp_path / "an")]
    assert _run([*argv, "--n-docs", "2"]) == 0
    assert _run([*argv, "--n-docs", "3"]) == 0  # resumes: 2 documents done, 1 more
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["n_docs"] == 3 and summary["provenance"]["data"]["truncated_summaries"] == 3


# ---------------------------------------------------------------- adapters that are not what they seem

def _adapter_folder(folder: Path, config: dict[str, object]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapter_whose_base_is_itself(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "loop"
    _adapter_folder(adapter, {"peft_type": "LORA", "base_model_name_or_path": str(adapter), "r": 2,
                              "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})
    fails(_patch_argv(tiny_model_dirs["llama"], adapter, tmp_path / "out"), capsys, str(adapter),
          "is an adapter folder, not a model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "IA3", "PREFIX_TUNING"])
def test_adapter_that_is_not_lora(peft_type: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _adapter_folder(tmp_path / "a", {"peft_type": peft_type, "num_virtual_tokens": 8,
                                                "base_model_name_or_path": str(tiny_model_dirs["llama"]),
                                                "task_type": "CAUSAL_LM"})
    fails(_patch_argv(tiny_model_dirs["llama"], adapter, tmp_path / "out"), capsys, "adapter_config.json",
          f"peft_type '{peft_type}'", "LoRA adapters only")


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["circuit.json", "adapter_config.json", "config.json"])
def test_json_nested_past_the_recursion_limit(where: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    llama = tiny_model_dirs["llama"]
    if where == "circuit.json":
        bad = tmp_path / "circuit.json"
        bad.write_text('{"layers": ' + _DEEP + "}")
        argv = ["ablate", "--model", str(llama), "--data", TRAIN, "--circuit", str(bad), "--out", str(tmp_path / "o")]
    elif where == "adapter_config.json":
        bad = _adapter_folder(tmp_path / "a", {"peft_type": "LORA"}) / "adapter_config.json"
        bad.write_text('{"peft_type": "LORA", "x": ' + _DEEP + "}")
        argv = _patch_argv(llama, bad.parent, tmp_path / "o")
    else:
        model = _tiny_copy(tiny_model_dirs, "llama", tmp_path / "m")
        bad = model / "config.json"
        bad.write_text(bad.read_text().rstrip().rstrip("}") + ', "x": ' + _DEEP + "}")
        argv = _patch_argv(llama, model, tmp_path / "o")
    fails(argv, capsys, str(bad.parent))
    assert not (tmp_path / "o").exists()
