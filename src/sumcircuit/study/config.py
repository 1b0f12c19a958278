"""What a study runs on: :class:`StudyConfig` (model, data, preset, seeds, overrides; no torch)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sumcircuit.config import Config, option
from sumcircuit.errors import ConfigError, SumcircuitError
from sumcircuit.study.presets import STUDY_PRESETS, StudyPreset, _seeds


def _preset_names() -> tuple[str, ...]:
    return STUDY_PRESETS.names()


def parse_overrides(items: list[str] | tuple[str, ...] | Mapping[str, Any]) -> dict[str, Any]:
    """``["eval_docs=8", 'full={"max_steps": 4}']`` (``--set FIELD=JSON``) -> a dict; a mapping passes."""
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError("overrides", f"{item}: expected FIELD=JSON, e.g. eval_docs=8")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError("overrides", f"{item}: the value is not JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError("overrides", f"{key.strip()}: the value is nested too deeply") from None
    return out


@dataclass(frozen=True)
class StudyConfig(Config):
    """The study: which model and data, which preset, which seeds, and any preset field overridden.

    Example:
        >>> import sumcircuit as sc
        >>> cfg = sc.StudyConfig(model="smollm2-135m-instruct", data="../shared/data/cnndm_gpt4", preset="cpu",
        ...                      overrides={"eval_docs": 8})
        >>> cfg.resolved_preset().eval_docs, cfg.resolved_seeds()
        (8, (1, 2, 3))
    """

    model: str = option(help="base model spec (see `sumcircuit models`)")
    data: str = option(help="training data (file, folder with --split, hf:..., preset)")
    eval_data: str | None = option(None, help="evaluation data (default: --data with split 'val')")
    split: str | None = option("train", help="training split")
    eval_split: str | None = option(None, help="split of --eval-data")
    val_split: str | None = option(None, help="split of --data for early-stopping validation (default: the preset's; "
                                              "quick holds out a seeded slice of the training docs)")
    preset: str = option("quick", help="quick: CI-sized smoke test (~15 min on a 2-core CPU); cpu: ~60 min on 2 CPU "
                                       "cores, 3 seeds; gpu: ~20 min on one H200-class GPU, 3 seeds; paper: the "
                                       "paper's hyper-parameters at full scale (GPU); generalize-cpu / generalize-gpu: "
                                       "one domain of a generalization matrix, with the control task and transfer "
                                       "(see `sumcircuit compare`)", choices=_preset_names)
    seeds: tuple[int, ...] | None = option(None, help="comma-separated training seeds: every method and every random "
                                                      "layer set is trained once per seed (default: the preset's)",
                                           normalize=_seeds)
    overrides: Mapping[str, Any] = option(help="override a preset field, e.g. --set eval_docs=8 --set "
                                               "'full={\"max_steps\": 4}' (repeatable; fields: see "
                                               "sumcircuit.study.StudyPreset)", default_factory=dict,
                                          flag="--set", repeat=True, metavar="FIELD=JSON", normalize=parse_overrides)

    def check(self) -> None:
        try:
            self.resolved_preset()  # an unknown field or a bad value fails here, before any stage runs
        except ConfigError as exc:
            if exc.param in ("overrides", "preset"):
                raise
            raise ConfigError("overrides", f"{exc.param}: {exc.reason}") from None

    def resolved_preset(self) -> StudyPreset:
        """The preset with the overrides applied, every field checked."""
        try:
            preset = STUDY_PRESETS.get(self.preset)
        except SumcircuitError as exc:
            raise ConfigError("preset", str(exc)) from None
        return preset.with_overrides(self.overrides)

    def resolved_seeds(self) -> tuple[int, ...]:
        """The seeds given, else the preset's."""
        return tuple(self.seeds) if self.seeds is not None else tuple(self.resolved_preset().seeds)


