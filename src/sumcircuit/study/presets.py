"""Study presets: sizes, hyper-parameters and arms of a whole study, registered by name.

A preset lists the *arms* it trains (each a registered
:class:`~sumcircuit.study.arms.Arm`) and the hyper-parameter groups they
draw on, so a new arm is a registration plus a name in a preset's ``arms``,
never a new preset field. ``paper`` follows arXiv 2505.17073.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from sumcircuit.causal.config import DIRECTIONS, Direction, directions
from sumcircuit.config import NON_NEGATIVE, POSITIVE, Config, at_least, option
from sumcircuit.errors import ConfigError
from sumcircuit.registry import Registry


def _seeds(value: Any) -> Any:
    """``"1,2,3"`` or a sequence of ints -> a tuple of distinct non-negative seeds."""
    if isinstance(value, str):
        try:
            value = tuple(int(s) for s in value.split(",") if s.strip())
        except ValueError:
            raise ConfigError("seeds", f"expected comma-separated integers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError("seeds", "needs at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value):
            raise ConfigError("seeds", f"expected non-negative integers, got {list(value)}")
        if len(set(value)) != len(value):
            raise ConfigError("seeds", f"must be distinct, got {list(value)}")
        return tuple(value)
    return value


@dataclass(frozen=True)
class StudyPreset(Config):
    """Sizes, hyper-parameters and arms of one study (every field can be overridden with ``--set FIELD=JSON``).

    Example:
        >>> from sumcircuit.study import STUDY_PRESETS
        >>> STUDY_PRESETS.get("quick").arms
        ('full', 'lora_all', 'targeted', 'targeted_attribution', 'random')
    """

    name: str = option(help="the preset's name")
    description: str = option(help="what the preset is for, and what it is not")
    train_docs: int | None = option(help="training documents (None: all)", bound=POSITIVE)
    val_docs: int = option(help="validation documents when the data set has a validation split", bound=POSITIVE)
    eval_docs: int = option(help="documents each model's ROUGE is measured on", bound=POSITIVE)
    analysis_docs: int = option(help="documents of the differential analysis", bound=POSITIVE)
    causal_docs: int = option(help="documents of attribution, ablation and patching", bound=POSITIVE)
    max_tokens: int = option(help="tokens per example (document + summary)", bound=at_least(16))
    max_new_tokens: int = option(help="generated tokens per summary at most", bound=POSITIVE)
    hyper: Mapping[str, Mapping[str, Any]] = option(
        help="hyper-parameter groups by name (full, lora, targeted): FinetuneConfig fields each arm's group sets")
    arms: tuple[str, ...] = option(("full", "lora_all", "targeted", "targeted_attribution", "random"),
                                   help="the fine-tuning arms trained on every seed (registered in "
                                        "sumcircuit.study.arms)")
    top_layers: int = option(3, help="layers in each circuit", bound=POSITIVE)
    top_heads: int = option(8, help="heads listed in both circuits (for comparison and head-level LoRA)",
                            bound=NON_NEGATIVE)
    random_controls: int = option(20, help="random same-size sets in the ablation", bound=NON_NEGATIVE)
    eval_batch_size: int = option(8, help="documents generated together", bound=POSITIVE)
    # Validation for early stopping: a split of the training data set (e.g. "validation"), or
    # None for a seeded held-out slice of the training documents. Never the evaluation split:
    # selecting checkpoints on the test documents would flatter every method.
    val_split: str | None = option(None, help="validation split of the training data (None: a seeded held-out "
                                              "slice of the training documents)")
    patch_directions: tuple[Direction, ...] = option(DIRECTIONS, help="directions of attribution and patching",
                                                     normalize=directions)
    seeds: tuple[int, ...] = option((1,), help="training seeds when --seeds is not given", normalize=_seeds)
    random_sets: int = option(5, help="random layer sets (outside both circuits), each trained once per seed",
                              bound=NON_NEGATIVE)
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="autocast while fine-tuning")
    # Full fine-tunes on every training seed, or on the first only: that one feeds the analysis and
    # causal stages, and no claim compares full fine-tunes, so "first" spends their time elsewhere.
    full_seeds: Literal["all", "first"] = option("all", help="full fine-tunes on every seed or on the first only")
    transfer_from: str | None = option(None, help="the `transfer` arm's circuit: another study's folder (its KL "
                                                  "circuit) or a circuit.json, of the same model")
    causal_stages: tuple[Literal["ablate", "patch", "faithfulness"], ...] = option(
        ("ablate", "patch", "faithfulness"), help="the causal tests of the reference that close the study")

    @property
    def full(self) -> Mapping[str, Any]:
        """The ``full`` hyper-parameter group."""
        return self.hyper.get("full", {})

    @property
    def lora(self) -> Mapping[str, Any]:
        """The ``lora`` hyper-parameter group."""
        return self.hyper.get("lora", {})

    @property
    def targeted(self) -> Mapping[str, Any]:
        """The ``targeted`` hyper-parameter group."""
        return self.hyper.get("targeted", {})

    def with_overrides(self, overrides: Mapping[str, Any]) -> StudyPreset:
        """This preset with ``overrides``: fields, or a hyper-parameter group by its name (``full={...}``)."""
        known = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in known:
                changes[key] = value
            elif key in self.hyper:
                if not isinstance(value, Mapping):
                    raise ConfigError(key, f"a hyper-parameter group is a JSON object, got {value!r}")
                groups[key] = value
            else:
                raise ConfigError("overrides", f"unknown preset field(s) {key}; fields: "
                                               f"{', '.join(sorted(known | set(self.hyper)))}")
        if groups:
            changes["hyper"] = {**dict(changes.get("hyper", self.hyper)), **groups}
        return self.replace(**changes)

    def check(self) -> None:
        from sumcircuit.training.config import FinetuneConfig

        for group, values in self.hyper.items():  # a bad hyper-parameter fails before the first stage
            if not isinstance(values, Mapping):
                raise ConfigError(group, f"a hyper-parameter group is a JSON object, got {values!r}")
            try:
                FinetuneConfig(**dict(values))
            except TypeError as exc:
                raise ConfigError(group, f"not a FinetuneConfig field: {exc}") from None
            except ConfigError as exc:
                raise ConfigError(group, f"{exc.param}: {exc.reason}") from None


STUDY_PRESETS: Registry[StudyPreset] = Registry("study preset")


def register_study_preset(preset: StudyPreset, *, replace: bool = False) -> StudyPreset:
    """Make ``preset`` a choice of ``reproduce --preset``.

    Args:
        preset: the preset.
        replace: replace a preset of that name.

    Returns:
        ``preset``.

    Example:
        >>> from sumcircuit.study import STUDY_PRESETS
        >>> register_study_preset(STUDY_PRESETS.get("quick").replace(name="tiny", eval_docs=4))  # doctest: +SKIP
    """
    return STUDY_PRESETS.register(preset.name, preset, replace=replace)


register_study_preset(StudyPreset(
    name="quick",
    description="pipeline-scale study for a 2-core CPU (~15 min with smollm2-135m-instruct): few "
                "optimizer steps, short inputs, higher LoRA learning rate than the paper so that "
                "adapters move at all within the budget; numbers are a smoke test, not a replication",
    train_docs=256, val_docs=16, eval_docs=24, analysis_docs=16, causal_docs=8, max_tokens=256,
    max_new_tokens=48,
    hyper={"full": dict(lr=3e-5, batch_size=2, grad_accum=2, max_steps=24, eval_every=8, save_every=24,
                        patience=3, val_fraction=0.0625, keep_checkpoints=1, track_every=8, track_docs=4),
           "lora": dict(lr=1e-3, batch_size=2, grad_accum=2, max_steps=16, eval_every=4, save_every=16,
                        patience=3, val_fraction=0.0625, keep_checkpoints=1),
           "targeted": dict(lr=1e-3, batch_size=2, grad_accum=2, max_steps=16, eval_every=4, save_every=16,
                            patience=3, val_fraction=0.0625, keep_checkpoints=1)},
    random_controls=20, patch_directions=("denoise",), seeds=(1,), random_sets=2))
register_study_preset(StudyPreset(
    name="cpu",
    description="the most evidence that fits about 60 minutes on 2 CPU cores with smollm2-135m-instruct: "
                "3 training seeds, 5 random layer sets, 192-token inputs, 16 evaluation documents with "
                "summaries of up to 104 tokens (generated in one batch), bf16 autocast while fine-tuning, "
                "full fine-tune on the first seed only; constant learning rates (LoRA 3e-3 for every LoRA "
                "method) and early stopping on a held-out slice when 2 evaluations (every 5 steps) bring no "
                "validation-loss gain over 0.015 nats, under a 60-step cap; a small study, not a replication "
                "at the paper's scale",
    train_docs=320, val_docs=16, eval_docs=16, analysis_docs=16, causal_docs=8, max_tokens=192,
    max_new_tokens=104,
    hyper={"full": dict(lr=3e-5, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=10,
                        patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05, keep_checkpoints=1),
           "lora": dict(lr=3e-3, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=5,
                        patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05, keep_checkpoints=1),
           "targeted": dict(lr=3e-3, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=5,
                            patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05,
                            keep_checkpoints=1)},
    random_controls=20, eval_batch_size=16, patch_directions=("denoise",), seeds=(1, 2, 3), random_sets=5,
    mixed_precision="bf16", full_seeds="first"))
register_study_preset(StudyPreset(
    name="gpu",
    description="the paper's hyper-parameters where one H200-class GPU allows in about 20 minutes: "
                "3 training seeds, 5 random layer sets, bf16 autocast, 512-token inputs, full fine-tune "
                "lr 3e-5 and LoRA rank 8 on q/v lr 5e-5 (batch 32 / 16), early stopping with patience 3 "
                "(gains under 0.01 nats do not count, so a run creeping down under the decaying rate stops) "
                "on a held-out slice; sized for the 1,000 training documents of ../shared/data/cnndm_gpt4; "
                "not yet run on a GPU",
    train_docs=None, val_docs=64, eval_docs=100, analysis_docs=100, causal_docs=32, max_tokens=512,
    max_new_tokens=96,
    hyper={"full": dict(lr=3e-5, batch_size=8, grad_accum=4, epochs=3, eval_every=10, save_every=10, patience=3,
                        min_delta=0.01, val_fraction=0.064, keep_checkpoints=1),
           "lora": dict(lr=5e-5, batch_size=16, grad_accum=1, epochs=5, eval_every=20, save_every=20, patience=3,
                        min_delta=0.01, val_fraction=0.064, keep_checkpoints=1),
           "targeted": dict(lr=5e-5, batch_size=16, grad_accum=1, epochs=5, eval_every=20, save_every=20,
                            patience=3, min_delta=0.01, val_fraction=0.064, keep_checkpoints=1)},
    random_controls=20, eval_batch_size=32, seeds=(1, 2, 3), random_sets=5, mixed_precision="bf16"))
register_study_preset(StudyPreset(
    name="paper",
    description="the paper's hyper-parameters (full: AdamW wd 0.01, lr 3e-5, batch 32, 10 epochs; "
                "LoRA rank 8 on q/v; targeted: lr 5e-5, batch 16, early stopping) at 1024 tokens; "
                "needs a GPU",
    train_docs=None, val_docs=500, eval_docs=1000, analysis_docs=500, causal_docs=200, max_tokens=1024,
    max_new_tokens=128,
    hyper={"full": dict(lr=3e-5, batch_size=8, grad_accum=4, epochs=10, eval_every=500, patience=3),
           "lora": dict(lr=5e-5, batch_size=8, grad_accum=2, epochs=10, eval_every=500, patience=3),
           "targeted": dict(lr=5e-5, batch_size=8, grad_accum=2, epochs=10, eval_every=500, patience=3)},
    random_controls=20, eval_batch_size=16, val_split="validation", seeds=(1, 2, 3), random_sets=5))
_LORA_CPU = dict(lr=3e-3, batch_size=2, grad_accum=2, max_steps=16, eval_every=4, save_every=16, patience=2,
                 min_delta=0.015, scheduler="constant", val_fraction=0.0625, keep_checkpoints=1)
register_study_preset(StudyPreset(
    name="generalize-cpu",
    description="one domain of a generalization matrix on 2 CPU cores (~30 min with smollm2-135m-instruct): "
                "the reference full fine-tune and the control task (documents only, same budget) on the first "
                "seed, analysed on 32 documents; the KL circuit's targeted LoRA, 2 random layer sets and (with "
                "transfer_from) another domain's circuit on 3 seeds, 16 evaluation documents; faithfulness "
                "curves only; `sumcircuit compare` reads two or more such studies; small, not a replication",
    train_docs=256, val_docs=16, eval_docs=16, analysis_docs=32, causal_docs=8, max_tokens=192,
    max_new_tokens=48,
    hyper={"full": dict(lr=3e-5, batch_size=2, grad_accum=2, max_steps=16, eval_every=8, save_every=16,
                        patience=3, val_fraction=0.0625, keep_checkpoints=1),
           "lora": _LORA_CPU, "targeted": _LORA_CPU},
    arms=("full", "control", "targeted", "random", "transfer"), random_controls=20, eval_batch_size=8,
    patch_directions=("denoise",), seeds=(1, 2, 3), random_sets=2, full_seeds="first",
    causal_stages=("faithfulness",)))
register_study_preset(StudyPreset(
    name="generalize-gpu",
    description="one domain of the generalization matrix at the gpu preset's scale (3 domains x 2+ models, "
                "each study with the control task and, with transfer_from, another domain's circuit); not yet "
                "run on a GPU",
    train_docs=None, val_docs=64, eval_docs=100, analysis_docs=100, causal_docs=32, max_tokens=512,
    max_new_tokens=96,
    hyper=STUDY_PRESETS.get("gpu").hyper,
    arms=("full", "control", "lora_all", "targeted", "targeted_attribution", "random", "transfer"),
    random_controls=20, eval_batch_size=32, seeds=(1, 2, 3), random_sets=5, mixed_precision="bf16",
    full_seeds="first"))
