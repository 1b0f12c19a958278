"""Study arms, claims and presets are registries: a toy arm and a toy claim are one registration each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import sumcircuit as sc
from sumcircuit.study import ARMS, CLAIMS, ClaimResult, StudyConfig, register_claim, run_study
from sumcircuit.study.claims import INCONCLUSIVE

from helpers import CNNDM, TINY_STUDY

TINY = {**TINY_STUDY, "top_layers": 2, "random_controls": 2, "random_sets": 0}


@pytest.fixture
def toys() -> Iterator[None]:
    from toys.study_arm import register

    register()
    register_claim("toy", lambda ev: ClaimResult("(toy) the top-1 arm ran", "-",
                                                   f"{len(ev.scores('targeted_top1'))} seeds", INCONCLUSIVE, "toy"))
    yield
    ARMS.unregister("targeted_top1")
    CLAIMS.unregister("toy")


def test_builtin_arms_claims_and_presets() -> None:
    assert ARMS.names() == ("full", "lora_all", "targeted", "targeted_attribution", "random", "control", "transfer")
    assert len(CLAIMS) == 11
    assert sc.StudyConfig(model="m", data="d").resolved_preset().arms == ARMS.names()[:5]
    assert sc.StudyConfig(model="m", data="d", preset="generalize-cpu").resolved_preset().arms == \
        ("full", "control", "targeted", "random", "transfer")


def test_a_registered_arm_and_claim_join_the_study(toys: None, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = StudyConfig(model=str(tiny_model_dirs["llama"]), data=str(CNNDM), seeds=(1,),
                      overrides={**TINY, "arms": ["full", "lora_all", "targeted", "targeted_top1"]})
    study = run_study(cfg, tmp_path / "run", runtime=sc.Runtime(progress=False))
    circuit = json.loads((tmp_path / "run" / "circuit" / "circuit.json").read_text())
    top1 = json.loads((tmp_path / "run" / "targeted_top1_s1" / "train_summary.json").read_text())
    assert top1["layers"] == circuit["layers"][:1] and len(circuit["layers"]) == 2
    assert "targeted_top1_s1/eval" in study.summary["stages"]
    assert not (tmp_path / "run" / "targeted_attribution_s1").exists()  # not among this preset's arms
    claims = study.to_pandas()
    assert len(claims) == 12 and claims.iloc[-1]["this_run"] == "1 seeds"
    assert "targeted_top1_s1" in (tmp_path / "run" / "report.html").read_text()
    with pytest.raises(sc.ConfigError, match="unknown arm 'nope'"):
        run_study(cfg.replace(overrides={**TINY, "arms": ["nope"]}), tmp_path / "bad")
