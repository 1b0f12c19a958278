"""The study as a graph of stages: each declares its inputs and config, and runs once per key.

A :class:`Stage` names the stages it reads (``needs``), the config that
determines its output (``config``) and a body that writes ``RUN/<name>/``.
Its *key* is the hash of its config (data by contents and model folders by
resolved path, not by how a path is spelled) and of its needs' keys; when it finishes,
``stage.json`` records the key. :class:`StageRunner` walks stages in order: a
stage whose key matches is skipped, a stage whose inputs changed is moved to
``RUN/.stale/`` and recomputed, an interrupted stage resumes (fine-tuning,
analysis and evaluation resume inside). The declared needs are what a
scheduler needs to run independent stages side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sumcircuit.artifacts import atomic_write_json, read_json

log = logging.getLogger(__name__)

StageKind = Literal["evaluate", "train", "analyze", "select", "causal"]


def _plain(config: Mapping[str, Any]) -> Any:
    """``config`` as JSON gives it back (tuples as lists): how ``stage.json`` records it."""
    return json.loads(json.dumps(config, default=str))


def by_contents(config: Any) -> Any:
    """``config`` with every data spec (a mapping with ``data`` and ``split``) named by its contents, and
    every local ``model`` by its resolved path.

    ``../shared/data/cnndm_gpt4`` and its absolute path are one input; a key
    over the spelling made a rerun with the other spelling retire and
    recompute every stage. A model folder is named by where it is, not by
    what it holds: hashing its weights would cost seconds per gigabyte at
    every run.
    """
    return _named(config, data=True)


def _named(config: Any, *, data: bool) -> Any:
    """:func:`by_contents`; with ``data`` False, only the models (for inputs recorded with data already by
    contents)."""
    from sumcircuit.data.sources import content_id
    from sumcircuit.models import spec_identity

    if isinstance(config, Mapping):
        out = {k: _named(v, data=data) for k, v in config.items()}
        if data and isinstance(out.get("data"), str) and "split" in out:
            out["data"] = content_id(out["data"], out["split"])
        if isinstance(out.get("model"), str):
            out["model"] = spec_identity(out["model"])
        return out
    if isinstance(config, list | tuple):
        return [_named(v, data=data) for v in config]
    return config


def stage_inputs(config: Mapping[str, Any]) -> Any:
    """What a stage's key is made of besides its upstream keys: its config, data named by contents and model
    folders by resolved path (:func:`by_contents`)."""
    return by_contents(_plain(config))


def _key(inputs: Any, upstream: Mapping[str, str]) -> str:
    material = json.dumps({"config": inputs, "upstream": dict(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def stage_key(config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """The key of a stage: its inputs (:func:`stage_inputs`) and the keys of the stages it reads."""
    return _key(stage_inputs(config), upstream)


def same_inputs(done: Mapping[str, Any], inputs: Any, upstream: Mapping[str, str]) -> bool:
    """Whether a stage finished under an older key scheme has these inputs, its paths spelled in any way.

    Two older schemes stay valid under the key they recorded, when the
    upstream keys are the same:

    - no ``inputs`` recorded (keys over the spelling of every path): its
      recorded config names the files and models this config names. What the
      files held then is not recorded, so, as before, a change of contents
      under the same path goes unseen for it.
    - ``inputs`` recorded with a model folder as spelled (data by contents
      already): those inputs, the model named by its resolved path, are these.

    A stage finished since is judged by its key alone.
    """
    if done.get("upstream") != dict(upstream):
        return False
    if "inputs" in done:
        return bool(_named(done["inputs"], data=False) == inputs)
    recorded = done.get("config")
    return isinstance(recorded, Mapping) and by_contents(recorded) == inputs


@dataclass(frozen=True)
class Stage:
    """One stage of a study.

    Args:
        name: its folder under the run (``full_s1``, ``full_s1/eval``, ``analysis``).
        kind: what it does (a scheduler's hint: training wants a GPU, selection a CPU).
        config: what determines its output (hashed into its key, recorded in ``stage.json``).
        needs: the stages it reads.
        run: writes the stage's outputs into the folder it is given.
    """

    name: str
    kind: StageKind
    config: Mapping[str, Any]
    needs: tuple[str, ...]
    run: Callable[[Path], object]


@dataclass(frozen=True)
class StageOutcome:
    """What running one stage gave: its key, its wall time and whether it was already done (picklable)."""

    name: str
    key: str
    wall_time_s: float
    skipped: bool


def retire(run_dir: Path, name: str, why: str) -> None:
    """Move a stage folder to ``.stale/`` so that nothing reads it as part of this study."""
    out = run_dir / name
    marker = out / "stage.json"
    key = read_json(marker).get("key") if marker.is_file() else "unfinished"
    stale = run_dir / ".stale" / f"{name.replace('/', '_')}-{key}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stale, ignore_errors=True)
    out.rename(stale)
    print(f"[reproduce] stage {name}: {why}; previous result moved to {stale}", flush=True)


def execute_stage(run_dir: Path, stage: Stage, upstream: Mapping[str, str]) -> StageOutcome:
    """Run ``stage`` unless its folder already holds the result for its key (any process may call this).

    Args:
        run_dir: the study folder.
        stage: the stage.
        upstream: the keys of the stages it needs.
    """
    inputs = stage_inputs(stage.config)  # data files hashed (or looked up) once per stage
    key = _key(inputs, upstream)
    out = run_dir / stage.name
    marker = out / "stage.json"
    if marker.is_file():
        done = read_json(marker)
        if done.get("key") == key or same_inputs(done, inputs, upstream):
            key = str(done["key"])  # what the stages that read it recorded
            log.info("stage %s: up to date (key %s), skipped", stage.name, key)
            return StageOutcome(stage.name, key, float(done.get("wall_time_s", 0.0)), True)
        retire(run_dir, stage.name, "inputs changed")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[reproduce] stage {stage.name} ...", flush=True)
    stage.run(out)
    wall = time.perf_counter() - start
    atomic_write_json(marker, {"stage": stage.name, "key": key, "config": stage.config,
                               "inputs": inputs, "upstream": dict(upstream),
                               "wall_time_s": wall})
    print(f"[reproduce] stage {stage.name} done in {wall:.1f} s", flush=True)
    return StageOutcome(stage.name, key, wall, False)


@dataclass
class StageRunner:
    """Runs stages once per key; records keys and wall times (what ``reproduce.json`` holds).

    Args:
        run_dir: the study folder.
        executor: runs a list of stages whose needs are met in order (default: one after
            another in this process; see :mod:`sumcircuit.study.executors`).
    """

    run_dir: Path
    executor: Callable[[StageRunner, list[Stage]], None] | None = None
    keys: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def retire(self, name: str, why: str) -> None:
        """Move a stage folder to ``.stale/`` so that nothing reads it as part of this study."""
        retire(self.run_dir, name, why)

    def retire_all_but(self, stages: Iterable[Stage], why: str = "not part of this study") -> None:
        """Retire every stage folder that none of ``stages`` writes (e.g. after fewer seeds)."""
        wanted = {s.name.split("/")[0] for s in stages}
        for stale in sorted(p.name for p in self.run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if stale not in wanted:
                self.retire(stale, why)

    def record(self, outcome: StageOutcome) -> None:
        """Note a finished (or skipped) stage: later stages read its key."""
        self.keys[outcome.name], self.timings[outcome.name] = outcome.key, outcome.wall_time_s
        if outcome.skipped:
            self.skipped.append(outcome.name)

    def upstream(self, stage: Stage, submitted: Collection[str] = ()) -> dict[str, str]:
        """The keys of the stages ``stage`` needs that have run; every other need must be in ``submitted``
        (stages of the same batch, which an executor waits on itself)."""
        missing = [n for n in stage.needs if n not in self.keys and n not in submitted]
        if missing:
            raise RuntimeError(f"stage {stage.name} needs {missing}, which have not run")
        return {u: self.keys[u] for u in stage.needs if u not in submitted}

    def run(self, stage: Stage) -> Path:
        """Run ``stage`` in this process unless it is up to date; returns its folder."""
        self.record(execute_stage(self.run_dir, stage, self.upstream(stage)))
        return self.run_dir / stage.name

    def run_all(self, stages: Iterable[Stage]) -> None:
        """Run ``stages`` (each listed after the stages it needs) with this runner's executor."""
        todo = list(stages)
        if self.executor is None:
            for stage in todo:
                self.run(stage)
        else:
            self.executor(self, todo)
