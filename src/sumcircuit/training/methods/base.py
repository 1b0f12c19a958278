"""What a fine-tuning method is (:class:`FinetuneMethod`), the registry, and which layers (or heads) it adapts."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sumcircuit.errors import SumcircuitError
from sumcircuit.registry import Registry, resolve
from sumcircuit.sites import Site
from sumcircuit.training.config import FinetuneError, ResolvedFinetuneConfig

if TYPE_CHECKING:
    from sumcircuit.models import LoadedModel


@dataclass(frozen=True)
class LayerChoice:
    """The layers a run adapts, how they were chosen (for the summary), and the circuit's heads if any."""

    layers: list[int]
    source: str
    heads: list[Site] | None = None


@dataclass
class PreparedModel:
    """The model ready to train: which parameters train, how many, and how many were expected."""

    model: Any  # a PeftModel for LoRA methods, else the model itself
    trainable_params: int
    total_params: int
    expected_trainable: int | None


Prepare = Callable[["LoadedModel", LayerChoice, ResolvedFinetuneConfig], PreparedModel]


@dataclass(frozen=True)
class FinetuneMethod:
    """One way to fine-tune.

    Args:
        name: the method's name (``--method``).
        description: one line for the docs.
        defaults: the paper's values of the hyper-parameters left None (``lr``, ``batch_size``, ``epochs``,
            ``patience``).
        layers: ``"all"`` (every layer trains) or ``"chosen"`` (exactly one of ``layers``, ``circuit``,
            ``random_layers`` picks them; ``unit="head"`` narrows a circuit to its heads).
        adapter: whether it trains a LoRA adapter (``rank``/``alpha`` apply; ``final/`` is an adapter folder).
        prepare: ``fn(loaded, choice, config) -> PreparedModel`` that sets what trains (or ``"module:fn"``).

    Example:
        >>> FinetuneMethod("bias-only", "biases and norms only", {"lr": 1e-3, "batch_size": 4, "epochs": 1.0,
        ...                "patience": 0}, layers="all", adapter=False, prepare=prepare_bias_only)  # doctest: +SKIP
    """

    name: str
    description: str
    defaults: Mapping[str, Any]
    layers: Literal["all", "chosen"]
    adapter: bool
    prepare: str | Prepare

    def prepare_model(self, loaded: LoadedModel, choice: LayerChoice, cfg: ResolvedFinetuneConfig) -> PreparedModel:
        """Make ``loaded``'s model trainable the method's way."""
        prepared: PreparedModel = resolve(self.prepare)(loaded, choice, cfg)
        return prepared


FINETUNE_METHODS: Registry[FinetuneMethod] = Registry("fine-tuning method")


def register_finetune_method(method: FinetuneMethod, *, replace: bool = False) -> FinetuneMethod:
    """Make ``method`` a choice of :class:`~sumcircuit.training.FinetuneConfig` and ``finetune --method``.

    Args:
        method: the method's declaration.
        replace: replace a method of that name.

    Returns:
        ``method``.

    Example:
        >>> register_finetune_method(FinetuneMethod("bias-only", "biases and norms only", {...}, "all", False,
        ...                                         prepare_bias_only))  # doctest: +SKIP
    """
    return FINETUNE_METHODS.register(method.name, method, replace=replace)


def prepare_model(loaded: LoadedModel, cfg: ResolvedFinetuneConfig, layers: list[int] | None = None,
                  heads: list[Site] | None = None) -> PreparedModel:
    """Make ``loaded`` trainable the way ``cfg.method`` does, on ``layers`` (default: every layer).

    Benchmarks and tests use it to time or check one method's training step without a run folder.
    """
    chosen = list(range(loaded.adapter.n_layers)) if layers is None else list(layers)
    return FINETUNE_METHODS.get(cfg.method).prepare_model(loaded, LayerChoice(chosen, "given", heads), cfg)


def random_layers(n_layers: int, k: int, seed: int) -> list[int]:
    """K distinct layers drawn uniformly with ``random.Random(seed)``: the control the paper lacked."""
    if not 0 < k <= n_layers:
        raise FinetuneError(f"random_layers {k}: choose 1..{n_layers} (the model has {n_layers} layers)")
    return sorted(random.Random(seed).sample(range(n_layers), k))


def choose_layers(cfg: ResolvedFinetuneConfig, n_layers: int) -> LayerChoice:
    """Which layers (and heads) ``cfg`` adapts in a model of ``n_layers`` layers, checked."""
    from sumcircuit.circuit.result import read_circuit

    method = FINETUNE_METHODS.get(cfg.method)
    given = [name for name, v in (("layers", cfg.layers), ("circuit", cfg.circuit),
                                  ("random_layers", cfg.random_layers)) if v is not None]
    if method.layers == "all":
        if cfg.unit == "head":
            raise FinetuneError("`unit` head is for a method that adapts chosen layers (targeted-lora)")
        if given:
            raise FinetuneError(f"`{given[0]}` selects layers for a targeted method; method {cfg.method} trains "
                                "every layer")
        return LayerChoice(list(range(n_layers)), "all")
    if cfg.unit == "head" and given != ["circuit"]:
        raise FinetuneError("`unit` head adapts the heads of a circuit: give `circuit` circuit.json "
                            "(from `sumcircuit circuit --top-heads K`)")
    if len(given) != 1:
        raise FinetuneError(f"method {cfg.method} needs exactly one of `layers`, `circuit`, `random_layers` "
                            f"(got {', '.join(given) or 'none'})")
    heads: list[Site] | None = None
    if cfg.layers is not None:
        layers, source = sorted(set(cfg.layers)), "--layers"
    elif cfg.circuit is not None:
        try:
            circuit = read_circuit(cfg.circuit)
        except SumcircuitError as exc:
            raise FinetuneError(str(exc)) from None
        layers, heads, source = circuit.layers, circuit.heads or None, f"circuit {cfg.circuit}"
        if cfg.unit == "head":
            if not heads:
                raise FinetuneError(f"`unit` head: circuit {cfg.circuit} lists no heads "
                                    "(select some with `sumcircuit circuit --top-heads K`)")
            layers, source = sorted({h.layer for h in heads}), f"heads of circuit {cfg.circuit}"
    else:
        seed = cfg.seed if cfg.layer_seed is None else cfg.layer_seed
        layers, source = random_layers(n_layers, int(cfg.random_layers or 0), seed), \
            f"random {cfg.random_layers} (seed {seed})"
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise FinetuneError(f"layer {layer} out of range: the model has {n_layers} layers "
                                f"(valid: 0..{n_layers - 1})")
    return LayerChoice(layers, source, heads)
