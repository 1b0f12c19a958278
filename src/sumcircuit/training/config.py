"""One fine-tuning run's settings: :class:`FinetuneConfig` (no torch).

``None`` hyper-parameters take the method's paper default (each method states
its own in :mod:`sumcircuit.training.methods`); :meth:`FinetuneConfig.resolved`
fills them in. ``batch_size`` is the micro-batch and ``grad_accum`` the
micro-batches per optimizer step *in total*: the effective batch is
``batch_size x grad_accum`` whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from sumcircuit.config import (
    NON_NEGATIVE,
    NON_NEGATIVE_REAL,
    POSITIVE,
    POSITIVE_REAL,
    PROBABILITY_OPEN,
    Config,
    between,
    option,
)
from sumcircuit.errors import ConfigError, SumcircuitError


class FinetuneError(SumcircuitError):
    """A fine-tuning request that cannot run as asked (bad layers, config, resume state)."""


def _method_names() -> tuple[str, ...]:
    from sumcircuit.training.methods import FINETUNE_METHODS

    return FINETUNE_METHODS.names()


def _layers(value: object) -> object:
    from sumcircuit.causal.config import layer_list

    return layer_list(value) or None


_METHOD, _OPT, _OUT = "method", "optimization (defaults: the method's paper values)", "outputs"


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """One fine-tuning run. ``None`` hyper-parameters take the method's paper default.

    Under N processes (``accelerate launch``) each runs ``grad_accum / N`` of a
    step's micro-batches (``grad_accum`` must be a multiple of N), so the same
    command trains the same model on 1 or N processes. ``patience`` counts
    evaluations without improvement; 0 disables early stopping.

    Example:
        >>> import sumcircuit as sc
        >>> sc.FinetuneConfig(method="targeted-lora", layers="2,3,5").resolved().lr
        5e-05
    """

    method: str = option("targeted-lora", help="the fine-tuning method (registered in "
                                               "sumcircuit.training.methods)", choices=_method_names, group=_METHOD)
    layers: tuple[int, ...] | None = option(None, help="targeted-lora: layers to adapt, e.g. 2,3,5 or 2-5",
                                            normalize=_layers, group=_METHOD)
    circuit: str | None = option(None, help="targeted-lora: circuit.json from `sumcircuit circuit`", group=_METHOD)
    random_layers: int | None = option(None, help="targeted-lora: K layers drawn uniformly (control); seeded by "
                                                  "--layer-seed", bound=POSITIVE, metavar="K", group=_METHOD)
    unit: Literal["layer", "head"] = option("layer", help="targeted-lora with --circuit: adapt whole layers, or only "
                                                          "the q rows of the circuit's heads and the v rows of their "
                                                          "key/value heads", group=_METHOD)
    layer_seed: int | None = option(None, help="seed of --random-layers (default: --seed)", bound=NON_NEGATIVE,
                                    group=_METHOD)
    # The control task of a generalization study: the same documents, steps and budget, no summaries, so
    # whatever it changes is generic fine-tuning, and summarization's own change is the difference.
    objective: Literal["summary", "document"] = option(
        "summary", help="summary: the loss on the summary given the document (the task); document: plain language "
                        "modelling of the documents alone (a control task)", group=_METHOD)
    rank: int = option(8, help="LoRA rank", bound=POSITIVE, group=_METHOD)
    alpha: float = option(16.0, help="LoRA alpha", bound=POSITIVE_REAL, group=_METHOD)
    lora_dropout: float = option(0.05, help="LoRA dropout", bound=between(0.0, 1.0, high_open=True), group=_METHOD)
    lr: float | None = option(None, help="learning rate (full 3e-5, LoRA 5e-5)", bound=POSITIVE_REAL, group=_OPT)
    batch_size: int | None = option(None, help="micro-batch per forward pass (full 32, LoRA 16)", bound=POSITIVE,
                                    group=_OPT)
    grad_accum: int = option(1, help="micro-batches per optimizer step, over all processes: the effective batch is "
                                     "batch-size x grad-accum for any number of processes (a multiple of them)",
                             bound=POSITIVE, group=_OPT)
    epochs: float | None = option(None, help="epochs (default: 10)", bound=POSITIVE_REAL, group=_OPT)
    max_steps: int | None = option(None, help="optimizer steps; overrides --epochs", bound=POSITIVE, group=_OPT)
    eval_every: int | None = option(None, help="validate every N optimizer steps (default: each epoch)",
                                    bound=POSITIVE, group=_OPT)
    save_every: int | None = option(None, help="checkpoint every N steps (default: at each evaluation)",
                                    bound=POSITIVE, group=_OPT)
    patience: int | None = option(None, help="stop after N evaluations without improvement; 0 = off (full 0, LoRA 3)",
                                  bound=NON_NEGATIVE, group=_OPT)
    # Validation-loss decrease (nats per summary token) that counts as an improvement, for both
    # patience and the best checkpoint: without it, a run creeping down by 1e-4 never stops.
    min_delta: float = option(0.0, help="validation-loss decrease that counts as an improvement",
                              bound=NON_NEGATIVE_REAL, group=_OPT)
    weight_decay: float = option(0.01, help="AdamW weight decay (not on biases and norms)", bound=NON_NEGATIVE_REAL,
                                 group=_OPT)
    warmup_steps: int = option(0, help="linear warm-up steps", bound=NON_NEGATIVE, group=_OPT)
    scheduler: Literal["linear", "constant"] = option("linear", help="learning-rate schedule after warm-up",
                                                      group=_OPT)
    max_grad_norm: float | None = option(1.0, help="clip gradients at this norm; 0 = off", bound=NON_NEGATIVE_REAL,
                                         group=_OPT)
    val_fraction: float = option(0.1, help="fraction held out when --val-data is not given",
                                 bound=PROBABILITY_OPEN, group="validation")
    seed: int = option(0, help="random seed (data order, LoRA initialization, dropout)", bound=NON_NEGATIVE,
                       group=_OPT)
    gradient_checkpointing: bool = option(False, help="trade compute for memory", group=_OPT)
    # Layers below the lowest trainable one are frozen: their output is cached for validation batches
    # (bitwise the same losses) and, where documents repeat over epochs, for training documents.
    prefix_cache_gb: float = option(2.0, help="memory for the frozen-prefix cache (the residual stream entering "
                                              "the lowest trainable layer, reused for repeated inputs); 0 = off",
                                    bound=NON_NEGATIVE_REAL, group=_OPT)
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="autocast (for CUDA)", group=_OPT)
    track_every: int | None = option(None, help="every N steps, per-head entropy/KL against the start model on a "
                                                "probe set -> tracking.csv", bound=POSITIVE, group=_OUT)
    track_docs: int = option(8, help="probe documents for --track-every", bound=POSITIVE, group=_OUT)
    final: Literal["best", "last"] = option("best", help="weights in final/: best validation loss or last step",
                                            group=_OUT)
    keep_checkpoints: int = option(2, help="step checkpoints kept", bound=POSITIVE, group=_OUT)
    log_with: str | None = option(None, help="also log the curves through Accelerate's trackers, comma-separated "
                                             "(tensorboard, wandb, mlflow, ...; each an optional package), files "
                                             "under OUT/trackers", group=_OUT)

    def check(self) -> None:
        if self.max_grad_norm == 0:  # the CLI's "0 = off"
            object.__setattr__(self, "max_grad_norm", None)

    def resolved(self) -> ResolvedFinetuneConfig:
        """This config with the method's paper defaults filled in (no hyper-parameter left None)."""
        from sumcircuit.training.methods import FINETUNE_METHODS

        try:
            defaults = FINETUNE_METHODS.get(self.method).defaults
        except SumcircuitError as exc:
            raise ConfigError("method", str(exc)) from None
        filled = {k: (defaults[k] if getattr(self, k) is None else getattr(self, k)) for k in defaults}
        return ResolvedFinetuneConfig(**{**asdict(self), **filled})


@dataclass(frozen=True)
class ResolvedFinetuneConfig(FinetuneConfig):
    """A :class:`FinetuneConfig` whose method defaults are filled in: no hyper-parameter is None."""

    lr: float = option(0.0, help="learning rate", bound=POSITIVE_REAL)
    batch_size: int = option(1, help="micro-batch", bound=POSITIVE)
    epochs: float = option(1.0, help="epochs", bound=POSITIVE_REAL)
    patience: int = option(0, help="evaluations without improvement before stopping", bound=NON_NEGATIVE)
