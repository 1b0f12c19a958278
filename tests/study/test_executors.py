"""Stages on Ray: the same study as the sequential run, resumed after the driver is killed, errors as they are."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sumcircuit as sc
from sumcircuit.cli import main
from sumcircuit.errors import ConfigError, DataError
from sumcircuit.study import StageRunner, StudyConfig, run_study
from sumcircuit.study.executors import RayExecutor, ray_session
from sumcircuit.study.graph import Stage

from helpers import CNNDM
from helpers import TINY_STUDY as TINY


def _study(model: Path) -> StudyConfig:
    return StudyConfig(model=str(model), data=str(CNNDM), seeds=(1, 2), overrides=TINY)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path]) -> sc.StudyResult:
    """The tiny study run one stage after another in this process (one torch thread, as each Ray stage has)."""
    assert torch.get_num_threads() == 1
    return run_study(_study(tiny_model_dirs["llama"]), tmp_path_factory.mktemp("seq") / "run")


def assert_same_study(a: Path, b: Path) -> int:
    """Every table and tensor of two study folders equal (bitwise); returns how many files were compared."""
    compared = 0
    for f in sorted(a.rglob("*")):
        if ".stale" in f.parts or not f.is_file() or f.suffix not in (".csv", ".safetensors", ".jsonl"):
            continue
        g = b / f.relative_to(a)
        assert g.is_file(), g
        if f.suffix == ".safetensors":
            x, y = load_file(f), load_file(g)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
        elif f.name == "predictions.jsonl":
            texts = [[json.loads(line)["prediction"] for line in p.read_text().splitlines()] for p in (f, g)]
            assert texts[0] == texts[1], f
        elif f.suffix == ".csv":
            assert filecmp.cmp(f, g, shallow=False), f
        else:
            continue
        compared += 1
    return compared


def test_ray_study_through_the_cli_equals_the_sequential_run(tmp_path: Path, tiny_model_dirs: dict[str, Path],
                                                             sequential: sc.StudyResult,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "ray"
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    args = ["reproduce", "--model", str(tiny_model_dirs["llama"]), "--data", str(CNNDM), "--seeds", "1,2", *sets]
    assert main([*args, "--executor", "ray", "--workers", "2", "--out", str(run)]) == 0
    manifest = json.loads((run / "reproduce.json").read_text())
    assert manifest["stages"] == sequential.summary["stages"] and manifest["skipped"] == []
    assert manifest["executor"] == {"executor": "ray", "workers": 2, "cpus_per_stage": 1, "gpus_per_stage": None}
    assert assert_same_study(sequential.folder, run) > 60  # weights, accumulators, tables, generated texts
    assert sc.load_run(run).claims == sequential.claims
    capsys.readouterr()
    # options of the Ray executor without it are a one-line usage error, and nothing is written
    assert main([*args, "--workers", "2", "--out", str(tmp_path / "refused")]) == 2
    assert "--workers: applies to executor 'ray' only" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


_DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from sumcircuit.study import StudyConfig, run_study
model, data, out, overrides = sys.argv[1:5]
cfg = StudyConfig(model=model, data=data, seeds=(1, 2), overrides=json.loads(overrides))
run_study(cfg, out, executor={"executor": "ray", "workers": 2})
"""


def test_a_killed_driver_resumes_from_the_finished_stages(tmp_path: Path, tiny_model_dirs: dict[str, Path],
                                                          sequential: sc.StudyResult) -> None:
    run = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tiny_model_dirs["llama"]), str(CNNDM), str(run),
                               json.dumps(TINY)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "full_s1" / "stage.json").is_file():
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before the reference"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray's processes are left to notice
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # then whatever of its session is still alive
        except ProcessLookupError:
            pass
    finished = {p.parent.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("stage.json")}
    assert "full_s1" in finished and len(finished) < len(sequential.summary["stages"])
    resumed = run_study(_study(tiny_model_dirs["llama"]), run, executor={"executor": "ray", "workers": 2})
    assert set(finished) <= set(resumed.summary["skipped"])  # nothing that had finished ran again
    assert all((run / name / "stage.json").read_bytes() == marker for name, marker in finished.items())
    assert resumed.summary["stages"] == sequential.summary["stages"]
    assert assert_same_study(sequential.folder, run) > 60 and resumed.claims == sequential.claims


# ------------------------------------------------------------ the executor on stages without models


def _write(name: str, text: str, out: Path) -> None:
    (out / f"{name}.txt").write_text(text)


def _concat(names: tuple[str, ...], out: Path) -> None:
    run = out.parent
    (out / "all.txt").write_text("".join((run / n / f"{n}.txt").read_text() for n in names))


def _fail(error: Exception, out: Path) -> None:
    raise error


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    with ray_session(2):
        yield


def test_ray_runs_each_stage_after_the_stages_it_needs(tmp_path: Path, ray_local: None) -> None:
    import functools

    stages = [Stage("a", "select", {"v": 1}, (), functools.partial(_write, "a", "x")),
              Stage("b", "select", {"v": 2}, (), functools.partial(_write, "b", "y")),
              Stage("c", "select", {"v": 3}, ("a", "b"), functools.partial(_concat, ("a", "b")))]
    runner = StageRunner(tmp_path, RayExecutor(sc.ExecutorConfig(executor="ray"), "cpu"))
    runner.run_all(stages)
    assert (tmp_path / "c" / "all.txt").read_text() == "xy" and list(runner.keys) == ["a", "b", "c"]
    sequential = StageRunner(tmp_path / "seq")
    (tmp_path / "seq").mkdir()
    sequential.run_all(stages)
    assert sequential.keys == runner.keys  # the same keys, whichever executor ran the stages
    again = StageRunner(tmp_path, RayExecutor(sc.ExecutorConfig(executor="ray"), "cpu"))
    again.run_all(stages)
    assert again.skipped == ["a", "b", "c"]


@pytest.mark.parametrize("error", [ConfigError("top_layers", "must be >= 1, got 0"),
                                   DataError("empty summary", file="x.jsonl", line=3, field="summary"),
                                   ValueError("plain")])
def test_a_failing_stage_raises_its_own_error_and_stops_the_stages_after_it(tmp_path: Path, ray_local: None,
                                                                             error: Exception) -> None:
    import functools

    stages = [Stage("a", "select", {}, (), functools.partial(_write, "a", "x")),
              Stage("b", "select", {}, ("a",), functools.partial(_fail, error)),
              Stage("c", "select", {}, ("b",), functools.partial(_write, "c", "z"))]
    runner = StageRunner(tmp_path, RayExecutor(sc.ExecutorConfig(executor="ray"), "cpu"))
    with pytest.raises(type(error)) as raised:
        runner.run_all(stages)
    assert str(raised.value) == str(error)  # the one line the CLI prints, not Ray's traceback
    assert list(runner.keys) == ["a"] and not (tmp_path / "c").exists() and not (tmp_path / "b" / "stage.json").exists()


def test_ray_executor_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="gpus_per_stage: applies to executor 'ray' only"):
        sc.ExecutorConfig(gpus_per_stage=1)
    with pytest.raises(ConfigError, match="executor: choose one of"):
        sc.ExecutorConfig(executor="slurm")  # type: ignore[arg-type]
    cfg = sc.ExecutorConfig(executor="ray", cpus_per_stage=2)
    cpu, cuda = RayExecutor(cfg, "cpu"), RayExecutor(cfg, "cuda")
    train = Stage("t", "train", {}, (), print)
    select = Stage("s", "select", {}, (), print)
    assert cpu.resources(train) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert cuda.resources(train) == {"num_cpus": 2.0, "num_gpus": 1.0} and cuda.resources(select)["num_gpus"] == 0


def test_without_ray_the_ray_executor_is_a_one_line_error_and_nothing_is_written(
        monkeypatch: pytest.MonkeyPatch, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where Ray is not installed
    with pytest.raises(ConfigError, match=r"executor: 'ray' needs Ray: pip install 'sumcircuit\[ray\]'"):
        run_study(_study(tiny_model_dirs["llama"]), tmp_path / "run", executor={"executor": "ray"})
    assert not (tmp_path / "run").exists()


def test_a_stage_can_need_stages_of_this_batch_and_of_an_earlier_one(tmp_path: Path, ray_local: None) -> None:
    import functools

    runner = StageRunner(tmp_path, RayExecutor(sc.ExecutorConfig(executor="ray"), "cpu"))
    runner.run_all([Stage("a", "select", {}, (), functools.partial(_write, "a", "x"))])  # an earlier batch
    runner.run_all([Stage("b", "select", {}, (), functools.partial(_write, "b", "y")),
                    Stage("c", "select", {}, ("a", "b"), functools.partial(_concat, ("a", "b")))])
    assert (tmp_path / "c" / "all.txt").read_text() == "xy"
    with pytest.raises(RuntimeError, match=r"stage d needs \['nope'\]"):
        runner.run_all([Stage("d", "select", {}, ("nope",), functools.partial(_write, "d", "z"))])
