"""Stage keys name data by contents and model folders by resolved path: another spelling of the same path
reruns nothing."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from sumcircuit.data import DataConfig
from sumcircuit.models import spec_identity
from sumcircuit.study import StageRunner
from sumcircuit.study.graph import Stage, stage_key

from helpers import CNNDM


def _stages(data: str, calls: list[str], model: str = "m") -> list[Stage]:
    config = {"model": model, "data": asdict(DataConfig(data, split="train", n_docs=3))}

    def body(name: str) -> object:
        return lambda out: calls.append(name)

    return [Stage("first", "evaluate", config, (), body("first")),
            Stage("second", "select", {"top": 1}, ("first",), body("second"))]


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(CNNDM / "train.jsonl.gz", folder / "train.jsonl.gz")
    monkeypatch.chdir(tmp_path)
    return folder


def test_another_spelling_of_the_data_path_reruns_nothing(data_dir: Path, tmp_path: Path) -> None:
    calls: list[str] = []
    first = StageRunner(tmp_path / "run")
    first.run_all(_stages("data", calls))  # relative to the working directory
    assert calls == ["first", "second"]
    for spelling in (str(data_dir), str(data_dir) + "/", "./data/../data"):
        again = StageRunner(tmp_path / "run")
        again.run_all(_stages(spelling, calls))
        assert calls == ["first", "second"] and again.skipped == ["first", "second"]
        assert again.keys == first.keys
    # other contents under the same path: recomputed, the old result kept in .stale
    with gzip.open(data_dir / "train.jsonl.gz", "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(data_dir / "train.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines[1:]) + "\n")
    changed = StageRunner(tmp_path / "run")
    changed.run_all(_stages("data", calls))
    assert calls == ["first", "second", "first", "second"] and changed.keys["first"] != first.keys["first"]
    assert len(list((tmp_path / "run" / ".stale").iterdir())) == 2


def _spelled_key(config: dict, upstream: dict) -> str:
    """The key as stages finished before this change recorded it: over the path as spelled."""
    material = json.dumps({"config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def test_stages_keyed_by_spelling_stay_valid_under_their_key(data_dir: Path, tmp_path: Path) -> None:
    calls: list[str] = []
    run = tmp_path / "run"
    StageRunner(run).run_all(_stages("data", calls))
    first, second = (json.loads((run / n / "stage.json").read_text()) for n in ("first", "second"))
    first["key"] = _spelled_key(first["config"], {})  # rewrite both markers as the old code wrote them
    second["upstream"] = {"first": first["key"]}
    second["key"] = _spelled_key(second["config"], second["upstream"])
    for marker in (first, second):
        del marker["inputs"]
    (run / "first" / "stage.json").write_text(json.dumps(first))
    (run / "second" / "stage.json").write_text(json.dumps(second))
    assert first["key"] != stage_key(first["config"], {})
    again = StageRunner(run)
    again.run_all(_stages(str(data_dir), calls))  # the absolute spelling
    assert calls == ["first", "second"] and again.skipped == ["first", "second"]
    assert again.keys == {"first": first["key"], "second": second["key"]}
    changed = StageRunner(run)  # a changed config still reruns
    stages = _stages("data", calls)
    changed.run_all([stages[0], Stage("second", "select", {"top": 2}, ("first",), stages[1].run)])
    assert calls == ["first", "second", "second"]


def _model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")  # what resolve_spec checks a model folder by
    return path


def test_another_spelling_of_a_model_folder_reruns_nothing(data_dir: Path, tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "final")
    calls: list[str] = []
    first = StageRunner(tmp_path / "run")
    first.run_all(_stages("data", calls, model="./final"))
    for spelling in ("final", str(folder), str(folder) + "/", "./data/../final"):
        again = StageRunner(tmp_path / "run")
        again.run_all(_stages("data", calls, model=spelling))
        assert calls == ["first", "second"] and again.skipped == ["first", "second"] and again.keys == first.keys
    other = _model_folder(tmp_path / "other")
    changed = StageRunner(tmp_path / "run")
    changed.run_all(_stages("data", calls, model=str(other)))
    assert calls == ["first", "second", "first", "second"]
    # hub ids, named models and paths that do not resolve stand for themselves
    assert [spec_identity(s) for s in ("gpt2", "smollm2-135m-instruct", "./missing")] == \
        ["gpt2", "smollm2-135m-instruct", "./missing"]
    assert spec_identity("final") == spec_identity(str(folder) + "/") == f"local:{folder.resolve()}"


def test_stages_keyed_by_model_spelling_stay_valid_under_their_key(data_dir: Path, tmp_path: Path) -> None:
    """Markers written while data were named by contents but models by spelling (``inputs`` recorded)."""
    _model_folder(tmp_path / "final")
    calls: list[str] = []
    run = tmp_path / "run"
    StageRunner(run).run_all(_stages("data", calls, model="./final"))
    first, second = (json.loads((run / n / "stage.json").read_text()) for n in ("first", "second"))
    first["inputs"]["model"] = "./final"  # as the previous scheme recorded it, with its key over that
    first["key"] = _spelled_key(first["inputs"], {})
    second["upstream"] = {"first": first["key"]}
    second["key"] = _spelled_key(second["inputs"], second["upstream"])
    (run / "first" / "stage.json").write_text(json.dumps(first))
    (run / "second" / "stage.json").write_text(json.dumps(second))
    again = StageRunner(run)
    again.run_all(_stages("data", calls, model=str(tmp_path / "final")))  # the absolute spelling
    assert calls == ["first", "second"] and again.skipped == ["first", "second"]
    assert again.keys == {"first": first["key"], "second": second["key"]}
    with gzip.open(data_dir / "train.jsonl.gz", "rt") as fh:  # other data contents: the recorded hash differs
        lines = fh.read().splitlines()
    with gzip.open(data_dir / "train.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines[1:]) + "\n")
    StageRunner(run).run_all(_stages("data", calls, model="./final"))
    assert calls == ["first", "second", "first", "second"]
