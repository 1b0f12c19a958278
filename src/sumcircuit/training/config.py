"""Fine-tuning configuration: methods, paper defaults, which layers (or heads) to adapt."""


from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sumcircuit.circuit import read_circuit
from sumcircuit.errors import SumcircuitError
from sumcircuit.sites import Site

log = logging.getLogger(__name__)

METHODS = ("full", "lora", "targeted-lora")
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"lr": 3e-5, "batch_size": 32, "epochs": 10.0, "patience": 0},
    "lora": {"lr": 5e-5, "batch_size": 16, "epochs": 10.0, "patience": 3},
    "targeted-lora": {"lr": 5e-5, "batch_size": 16, "epochs": 10.0, "patience": 3},
}


class FinetuneError(SumcircuitError):
    """A fine-tuning request that cannot run as asked (bad layers, config, resume state)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``None`` hyperparameters take the method's paper default.

    ``batch_size`` is the micro-batch and ``grad_accum`` the micro-batches per
    optimizer step *in total*: the effective batch is ``batch_size x grad_accum``
    whatever the number of processes. Under N processes (``accelerate launch``)
    each runs ``grad_accum / N`` of a step's micro-batches (``grad_accum`` must
    be a multiple of N), so the same command trains the same model on 1 or N
    processes. ``patience`` counts evaluations without improvement; 0 disables
    early stopping.
    """

    method: str = "targeted-lora"
    layers: tuple[int, ...] | None = None
    circuit: str | None = None
    random_layers: int | None = None
    unit: Literal["layer", "head"] = "layer"  # head: only the circuit's heads' q/v rows (needs circuit heads)
    layer_seed: int | None = None  # for --random-layers; default: seed
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    lr: float | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    epochs: float | None = None
    max_steps: int | None = None
    eval_every: int | None = None  # optimizer steps; None: once per epoch
    save_every: int | None = None  # optimizer steps; None: at every evaluation
    patience: int | None = None
    # Validation-loss decrease (nats per summary token) that counts as an improvement, for both
    # patience and the best checkpoint: without it, a run creeping down by 1e-4 never stops.
    min_delta: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 0
    scheduler: str = "linear"  # linear | constant
    max_grad_norm: float | None = 1.0
    val_fraction: float = 0.1  # held out of the training file when no validation data is given
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; meant for CUDA)
    track_every: int | None = None
    track_docs: int = 8
    final: str = "best"  # best | last: which weights final/ holds
    keep_checkpoints: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True

    def resolved(self) -> ResolvedFinetuneConfig:
        """This config with the method's paper defaults filled in, validated."""
        if self.method not in METHODS:
            raise FinetuneError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        defaults = PAPER_DEFAULTS[self.method]
        filled = {k: (defaults[k] if getattr(self, k) is None else getattr(self, k)) for k in defaults}
        cfg = ResolvedFinetuneConfig(**{**asdict(self), **filled})
        checks = [(cfg.rank > 0, "--rank must be positive"), (cfg.grad_accum > 0, "--grad-accum must be positive"),
                  (cfg.batch_size > 0, "--batch-size must be positive"), (cfg.lr > 0, "--lr must be positive"),
                  (cfg.epochs > 0, "--epochs must be positive"), (cfg.patience >= 0, "--patience must be >= 0"),
                  (cfg.min_delta >= 0, "--min-delta must be >= 0"),
                  (cfg.max_steps is None or cfg.max_steps > 0, "--max-steps must be positive"),
                  (cfg.eval_every is None or cfg.eval_every > 0, "--eval-every must be positive"),
                  (cfg.save_every is None or cfg.save_every > 0, "--save-every must be positive"),
                  (cfg.track_every is None or cfg.track_every > 0, "--track-every must be positive"),
                  (0 < cfg.val_fraction < 1, "--val-fraction must be in (0, 1)"),
                  (cfg.scheduler in ("linear", "constant"), "--scheduler must be linear or constant"),
                  (cfg.mixed_precision in ("no", "bf16", "fp16"), "--mixed-precision must be no, bf16 or fp16"),
                  (cfg.final in ("best", "last"), "--final must be best or last"),
                  (cfg.unit in ("layer", "head"), "--unit must be layer or head"),
                  (cfg.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        return cfg


@dataclass(frozen=True)
class ResolvedFinetuneConfig(FinetuneConfig):
    """A :class:`FinetuneConfig` whose method defaults are filled in: no hyper-parameter is None."""

    lr: float = 0.0
    batch_size: int = 1
    epochs: float = 1.0
    patience: int = 0


# ---------------------------------------------------------------- layer choice

@dataclass(frozen=True)
class LayerChoice:
    layers: list[int]
    source: str  # how they were chosen, for the summary
    heads: list[Site] | None = None


def random_layers(n_layers: int, k: int, seed: int) -> list[int]:
    """K distinct layers drawn uniformly with ``random.Random(seed)``: the control the paper lacked."""
    if not 0 < k <= n_layers:
        raise FinetuneError(f"--random-layers {k}: choose 1..{n_layers} (the model has {n_layers} layers)")
    return sorted(random.Random(seed).sample(range(n_layers), k))


def choose_layers(cfg: FinetuneConfig, n_layers: int) -> LayerChoice:
    given = [name for name, v in (("--layers", cfg.layers), ("--circuit", cfg.circuit),
                                  ("--random-layers", cfg.random_layers)) if v is not None]
    if cfg.method != "targeted-lora":
        if cfg.unit == "head":
            raise FinetuneError("--unit head is for --method targeted-lora")
        if given:
            raise FinetuneError(f"{given[0]} selects layers for --method targeted-lora; "
                                f"--method {cfg.method} trains every layer")
        return LayerChoice(list(range(n_layers)), "all")
    if cfg.unit == "head" and given != ["--circuit"]:
        raise FinetuneError("--unit head adapts the heads of a circuit: give --circuit circuit.json "
                            "(from `sumcircuit circuit --top-heads K`)")
    if len(given) != 1:
        raise FinetuneError("--method targeted-lora needs exactly one of --layers, --circuit, "
                            f"--random-layers (got {', '.join(given) or 'none'})")
    if cfg.layers is not None:
        layers, source, heads = sorted(set(cfg.layers)), "--layers", None
    elif cfg.circuit is not None:
        try:
            circuit = read_circuit(cfg.circuit)
        except SumcircuitError as exc:
            raise FinetuneError(str(exc)) from None
        layers, heads, source = circuit.layers, circuit.heads or None, f"circuit {cfg.circuit}"
        if cfg.unit == "head":
            if not heads:
                raise FinetuneError(f"--unit head: circuit {cfg.circuit} lists no heads "
                                    "(select some with `sumcircuit circuit --top-heads K`)")
            layers, source = sorted({h.layer for h in heads}), f"heads of circuit {cfg.circuit}"
    else:
        seed = cfg.seed if cfg.layer_seed is None else cfg.layer_seed
        layers, source, heads = random_layers(n_layers, int(cfg.random_layers or 0), seed), \
            f"random {cfg.random_layers} (seed {seed})", None
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise FinetuneError(f"layer {layer} out of range: the model has {n_layers} layers "
                                f"(valid: 0..{n_layers - 1})")
    return LayerChoice(layers, source, heads)


