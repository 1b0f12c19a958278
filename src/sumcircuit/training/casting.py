"""Weights cast once to the autocast dtype, instead of at every forward (mixed-precision training).

Under autocast a matmul casts its fp32 weight to bf16 / fp16 every time it
runs. Autocast keeps a cast only for a leaf that requires grad, and only for
one autocast region (one forward), so a frozen weight -- LoRA's whole base
model, the layers below a targeted run's adapters -- is cast again for every
micro-batch and every validation batch, and a trainable one for every
validation batch. On smollm2 with bf16 on the CPU those casts are 15% of a
validation pass and 7% of a LoRA micro-step. A cast is a pure function of the
weight (round to nearest even), so casting once and handing autocast the cast
tensor gives it bitwise the operands it would have made itself: losses,
gradients and updates do not change.

Only modules whose forward is one op that autocast runs in the lower precision
take part (``nn.Linear`` -> ``linear``, transformers' ``Conv1D`` -> ``addmm``),
and only inside :meth:`WeightCasts.applied`. Outside it every module holds its
own fp32 parameters again, so checkpoints, exports and trackers see them.

Memory: the casts kept for the run are those of frozen weights that the
backward reaches (the lowest trainable layer and above, and the LM head), half
their fp32 bytes. A training step held exactly those anyway: autograd saves each
matmul's cast weight for the backward. So peak memory is no higher. Frozen
layers below the lowest trainable one run without autograd; their weights are
cast as autocast did (once per forward), except in validation, where every
weight is cast once per pass and dropped after it (``summary`` reports what is
kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from sumcircuit.training.prefix import frozen_prefix


def autocast_dtype(accelerator: Any) -> torch.dtype | None:
    """The dtype the accelerator's autocast gives a matmul, or None when it gives fp32 (no mixed precision)."""
    device = accelerator.device
    with accelerator.autocast():
        probe = torch.nn.functional.linear(torch.ones(1, 1, device=device), torch.ones(1, 1, device=device))
    return None if probe.dtype == torch.float32 else probe.dtype


def _autocast_matmul_modules() -> tuple[type[nn.Module], ...]:
    """Modules whose forward is a single op that autocast runs in the lower precision."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


class WeightCasts:
    """The fp32 parameters of a model's linear modules, cast once to an autocast dtype.

    Frozen parameters outside ``transient`` modules are cast the first time
    they are needed and kept (they must not change while this object is in
    use). Trainable ones, and those of ``transient`` modules (the no-grad
    prefix, whose casts autograd never kept), are cast anew on each
    :meth:`applied` that asks for them: a no-grad pass such as validation,
    where the weights stay fixed for the whole pass.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, transient: Iterable[nn.Module] = ()) -> None:
        self.dtype = dtype
        kinds = _autocast_matmul_modules()
        self.slots: list[tuple[nn.Module, str]] = [
            (module, name) for module in model.modules() if isinstance(module, kinds)
            for name in ("weight", "bias")
            if (p := module._parameters.get(name)) is not None and p.dtype == torch.float32]
        self.transient = {id(m) for root in transient for m in root.modules()}
        self.frozen: dict[int, nn.Parameter] = {}

    def _cast(self, param: nn.Parameter) -> nn.Parameter:
        return nn.Parameter(param.detach().to(self.dtype), requires_grad=False)

    def _frozen_cast(self, param: nn.Parameter) -> nn.Parameter:
        cast = self.frozen.get(id(param))
        if cast is None:  # a weight shared by two modules (tied embeddings) is cast once
            cast = self.frozen[id(param)] = self._cast(param)
        return cast

    @contextlib.contextmanager
    def applied(self, *, trainable: bool = False) -> Iterator[None]:
        """The kept casts stand in for the fp32 parameters; ``trainable``: every other one too, cast now
        (no-grad passes only).

        Every forward inside must run under the same autocast: outside it a
        matmul of fp32 activations with a cast weight fails on the dtypes.
        """
        fresh: dict[int, nn.Parameter] = {}
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            for module, name in self.slots:
                param = module._parameters[name]
                if param is None:
                    continue
                if not param.requires_grad and id(module) not in self.transient:
                    cast = self._frozen_cast(param)
                elif trainable:
                    if id(param) not in fresh:
                        fresh[id(param)] = self._cast(param)
                    cast = fresh[id(param)]
                else:
                    continue
                module._parameters[name] = cast
                swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    def summary(self) -> dict[str, Any]:
        """What is kept: dtype, frozen tensors cast, their MB."""
        size = sum(t.numel() * t.element_size() for t in self.frozen.values())
        return {"dtype": str(self.dtype).removeprefix("torch."), "frozen_tensors": len(self.frozen),
                "frozen_mb": round(size / 2**20, 2)}


def training_casts(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> WeightCasts:
    """The casts a training run keeps; ``layers``: the decoder layers, those below the lowest trainable one
    are the no-grad prefix (transient)."""
    return WeightCasts(model, dtype, transient=layers[:frozen_prefix(model, layers)])


def make_weight_casts(model: nn.Module, layers: nn.ModuleList, accelerator: Any) -> WeightCasts | None:
    """The run's weight casts (:func:`training_casts`), or None without mixed precision (nothing is cast)."""
    dtype = autocast_dtype(accelerator)
    return training_casts(model, layers, dtype) if dtype is not None else None


def cast_context(casts: WeightCasts | None, *, trainable: bool = False) -> contextlib.AbstractContextManager[None]:
    """``casts.applied(...)``, or nothing when the run has no casts."""
    return casts.applied(trainable=trainable) if casts is not None else contextlib.nullcontext()
