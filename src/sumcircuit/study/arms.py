"""Study arms: the fine-tuning runs a study compares, each one registration.

An arm is a fine-tuning method, the preset's hyper-parameter group it uses,
and which layers it adapts (every layer, a circuit's, random sets of the
circuit's size ...). Every arm is trained once per training seed and
evaluated; its stage is ``<variant>_s<seed>``. An arm whose layers come from
another stage (a circuit) names that stage in ``needs``, so its stage key
changes when the circuit does. Adding an arm is :func:`register_arm` plus its
name in a preset's ``arms`` (``--set 'arms=[..., "mine"]'``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sumcircuit.registry import Registry


@dataclass(frozen=True)
class Variant:
    """One trained model of an arm: its stage prefix and what it adds to the fine-tuning config."""

    name: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StudyContext:
    """What arms can choose layers from once the core stages finished."""

    n_layers: int
    kl_layers: list[int]
    cause_layers: list[int]
    random_sets: list[list[int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


VariantFn = Callable[[StudyContext], Sequence[Variant]]


@dataclass(frozen=True)
class Arm:
    """One arm of the study.

    Args:
        name: the arm's name (what presets list).
        method: the registered fine-tuning method it trains with.
        hyper: the preset's hyper-parameter group it uses (``full``, ``lora``, ``targeted``).
        label: how the report names it.
        variants: ``fn(context) -> [Variant]``; None: one variant named like the arm, no extra config.
        needs: stages its variants read (their keys enter this arm's stage keys).
        seeds: ``"all"``: every training seed; ``"preset"``: as the preset's ``full_seeds`` says; ``"first"``:
            the first seed only.
        analyze: its first seed's model is also analysed against the base (stage ``analysis_<arm>``, the
            reference's documents), e.g. a control task whose change is subtracted from summarization's.

    Example:
        >>> Arm("targeted_top1", "targeted-lora", "targeted", "targeted (top layer)",
        ...     lambda ctx: [Variant("targeted_top1", {"layers": tuple(ctx.kl_layers[:1])})],
        ...     needs=("circuit",))  # doctest: +SKIP
    """

    name: str
    method: str
    hyper: str
    label: str
    variants: VariantFn | None = None
    needs: tuple[str, ...] = ()
    seeds: Literal["all", "preset", "first"] = "all"
    analyze: bool = False

    def expand(self, context: StudyContext) -> list[Variant]:
        """The arm's trained models in this study."""
        return list(self.variants(context)) if self.variants is not None else [Variant(self.name)]


ARMS: Registry[Arm] = Registry("study arm")


def register_arm(arm: Arm, *, replace: bool = False) -> Arm:
    """Make ``arm`` something a preset can list in ``arms``.

    Args:
        arm: the arm's declaration.
        replace: replace an arm of that name.

    Returns:
        ``arm``.

    Example:
        >>> register_arm(Arm("targeted_top1", "targeted-lora", "targeted", "targeted (top layer)",
        ...                  lambda ctx: [Variant("targeted_top1", {"layers": tuple(ctx.kl_layers[:1])})],
        ...                  needs=("circuit",)))  # doctest: +SKIP
    """
    return ARMS.register(arm.name, arm, replace=replace)


def random_control_sets(n_layers: int, size: int, n_sets: int, exclude: Sequence[int], seed: int) -> list[list[int]]:
    """``n_sets`` distinct random layer sets of ``size`` layers, drawn outside ``exclude`` when enough layers remain.

    The controls must not contain the circuit's own layers: a set overlapping
    the circuit would share part of the effect it is compared with. On a
    model too small for that, sets are drawn from every layer (the manifest
    says so). Sets have the circuit's layer count, so on a model whose layers
    all have one shape they train exactly as many LoRA parameters.
    """
    pool = [layer for layer in range(n_layers) if layer not in set(exclude)]
    if len(pool) < size:
        pool = list(range(n_layers))
    possible = math.comb(len(pool), size)
    rng = random.Random(seed)
    sets: list[list[int]] = []
    while len(sets) < min(n_sets, possible):
        draw = sorted(rng.sample(pool, size))
        if draw not in sets:
            sets.append(draw)
    return sets


register_arm(Arm("full", "full", "full", "full", seeds="preset"))
register_arm(Arm("lora_all", "lora", "lora", "LoRA-all"))
register_arm(Arm("targeted", "targeted-lora", "targeted", "targeted",
                 lambda ctx: [Variant("targeted", {"layers": tuple(ctx.kl_layers)})], needs=("circuit",)))
register_arm(Arm("targeted_attribution", "targeted-lora", "targeted", "targeted (by cause)",
                 lambda ctx: [Variant("targeted_attribution", {"layers": tuple(ctx.cause_layers)})],
                 needs=("circuit_attribution",)))
# Each random set differs from `targeted` only in its layers (drawn outside both circuits).
register_arm(Arm("random", "targeted-lora", "targeted", "random layer sets",
                 lambda ctx: [Variant(f"random{k}", {"layers": tuple(layers)})
                              for k, layers in enumerate(ctx.random_sets, start=1)]))
# The control task (a generalization study): the reference's method, data and budget, plain language
# modelling of the documents instead of summaries; analysed against the base like the reference.
register_arm(Arm("control", "full", "full", "control task (documents only)",
                 lambda ctx: [Variant("control", {"objective": "document"})], seeds="first", analyze=True))
# Transfer: targeted LoRA on another study's circuit (preset field `transfer_from`), trained and evaluated
# here beside this study's own circuit and its random sets; no variant when no circuit is given.
register_arm(Arm("transfer", "targeted-lora", "targeted", "targeted (transferred circuit)",
                 lambda ctx: [Variant("transfer", {"layers": tuple(ctx.extra["transfer_layers"])})]
                 if ctx.extra.get("transfer_layers") else []))
