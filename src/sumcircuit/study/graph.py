"""The study as a graph of stages: each declares its inputs and config, and runs once per key.

A :class:`Stage` names the stages it reads (``needs``), the config that
determines its output (``config``) and a body that writes ``RUN/<name>/``.
Its *key* is the hash of its config and of its needs' keys; when it finishes,
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sumcircuit.artifacts import atomic_write_json, read_json

log = logging.getLogger(__name__)

StageKind = Literal["evaluate", "train", "analyze", "select", "causal"]


def stage_key(config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """The key of a stage: its config and the keys of the stages it reads."""
    material = json.dumps({"config": config, "upstream": dict(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


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


@dataclass
class StageRunner:
    """Runs stages once per key; records keys and wall times (what ``reproduce.json`` holds)."""

    run_dir: Path
    keys: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def retire(self, name: str, why: str) -> None:
        """Move a stage folder to ``.stale/`` so that nothing reads it as part of this study."""
        out = self.run_dir / name
        marker = out / "stage.json"
        key = read_json(marker).get("key") if marker.is_file() else "unfinished"
        stale = self.run_dir / ".stale" / f"{name.replace('/', '_')}-{key}"
        stale.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stale, ignore_errors=True)
        out.rename(stale)
        print(f"[reproduce] stage {name}: {why}; previous result moved to {stale}", flush=True)

    def retire_all_but(self, stages: Iterable[Stage], why: str = "not part of this study") -> None:
        """Retire every stage folder that none of ``stages`` writes (e.g. after fewer seeds)."""
        wanted = {s.name.split("/")[0] for s in stages}
        for stale in sorted(p.name for p in self.run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if stale not in wanted:
                self.retire(stale, why)

    def run(self, stage: Stage) -> Path:
        """Run ``stage`` unless its folder already holds the result for its key; returns the folder."""
        upstream = {u: self.keys[u] for u in stage.needs}
        key = stage_key(stage.config, upstream)
        out = self.run_dir / stage.name
        marker = out / "stage.json"
        if marker.is_file():
            done = read_json(marker)
            if done.get("key") == key:
                self.keys[stage.name], self.timings[stage.name] = key, float(done.get("wall_time_s", 0.0))
                self.skipped.append(stage.name)
                log.info("stage %s: up to date (key %s), skipped", stage.name, key)
                return out
            self.retire(stage.name, "inputs changed")
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"[reproduce] stage {stage.name} ...", flush=True)
        stage.run(out)
        wall = time.perf_counter() - start
        atomic_write_json(marker, {"stage": stage.name, "key": key, "config": stage.config, "upstream": upstream,
                                   "wall_time_s": wall})
        self.keys[stage.name], self.timings[stage.name] = key, wall
        print(f"[reproduce] stage {stage.name} done in {wall:.1f} s", flush=True)
        return out

    def run_all(self, stages: Iterable[Stage]) -> None:
        """Run ``stages`` in the given order (each after the stages it needs)."""
        for stage in stages:
            missing = [n for n in stage.needs if n not in self.keys]
            if missing:
                raise RuntimeError(f"stage {stage.name} needs {missing}, which have not run")
            self.run(stage)
