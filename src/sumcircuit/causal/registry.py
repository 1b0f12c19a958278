"""The causal methods, by name: each is one registration, and the CLI and :func:`run_causal` read it.

A causal method takes a model (``inputs="model"``: ablation) or a base/tuned
pair (``inputs="pair"``: patching, attribution), data and its config, and
returns a :class:`~sumcircuit.results.Result`. Registering one makes it an
API call (:func:`run_causal`) and a command (``sumcircuit NAME --model ...``
or ``--base ... --tuned ...``) whose flags come from its config. Torch-free:
the functions are named as ``"module:attribute"`` and imported when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sumcircuit.causal.config import AblationConfig, AttributionConfig, FaithfulnessConfig, PatchConfig
from sumcircuit.config import Config
from sumcircuit.registry import Registry, resolve

if TYPE_CHECKING:
    from sumcircuit.results import Result
    from sumcircuit.runtime import Runtime


@dataclass(frozen=True)
class CausalMethod:
    """One causal method: what it takes, how it runs, what the CLI prints.

    Args:
        name: its name (the CLI command).
        config: its config class (the CLI's flags come from its fields).
        run: ``fn(*models, data, config, *, runtime=, out=, resume=) -> Result``, or ``"module:fn"``.
        inputs: ``"model"`` (one model) or ``"pair"`` (base and tuned).
        help: one line for ``sumcircuit --help``.
        description: the command's ``--help`` text.
        report: ``fn(result) -> list[str]``, the lines the CLI prints (or ``"module:fn"``).

    Example:
        >>> CausalMethod("scale-mlp", ScaleConfig, scale_mlp, "model", "scale MLP outputs")  # doctest: +SKIP
    """

    name: str
    config: type[Config]
    run: str | Callable[..., Result]
    inputs: Literal["model", "pair"]
    help: str
    description: str = ""
    report: str | Callable[[Any], list[str]] | None = None

    def function(self) -> Callable[..., Result]:
        """The method's function (imported on first use)."""
        fn: Callable[..., Result] = resolve(self.run)
        return fn

    def report_lines(self, result: Result) -> list[str]:
        """What the CLI prints about ``result``."""
        return list(resolve(self.report)(result)) if self.report is not None else []


CAUSAL_METHODS: Registry[CausalMethod] = Registry("causal method")


def register_causal_method(method: CausalMethod, *, replace: bool = False) -> CausalMethod:
    """Make ``method`` an API call (:func:`run_causal`) and a ``sumcircuit`` command.

    Args:
        method: the method's declaration.
        replace: replace a method already registered under that name.

    Returns:
        ``method``.

    Example:
        >>> register_causal_method(CausalMethod("toy", ToyConfig, toy_fn, "model", "a toy"))  # doctest: +SKIP
    """
    return CAUSAL_METHODS.register(method.name, method, replace=replace)


def run_causal(name: str, *models: Any, data: Any, config: Config | None = None, runtime: Runtime | None = None,
               out: str | Path | None = None, resume: bool = True) -> Result:
    """Run the causal method ``name`` (one model, or base then tuned) on ``data``.

    Args:
        name: a registered method (``ablate``, ``patch``, ``attribute``, or one of yours).
        models: one model, or base and tuned, as the method takes (specs, loaded models or results).
        data: a :class:`~sumcircuit.data.DataConfig` (or encoded examples).
        config: the method's config (default: its defaults).
        runtime: device, dtype, progress.
        out: folder to write the result into.
        resume: reuse a finished identical result in ``out``.

    Returns:
        The method's result.

    Example:
        >>> sc.run_causal("patch", base, tuned, data=data, config=sc.PatchConfig(granularity="head"))  # doctest: +SKIP
    """
    method = CAUSAL_METHODS.get(name)
    expected = 1 if method.inputs == "model" else 2
    if len(models) != expected:
        from sumcircuit.errors import ConfigError

        raise ConfigError("models", f"{name} takes {'one model' if expected == 1 else 'a base and a tuned model'}, "
                                    f"got {len(models)}")
    return method.function()(*models, data, config, runtime=runtime, out=out, resume=resume)


register_causal_method(CausalMethod(
    "ablate", AblationConfig, "sumcircuit.causal.ablation:ablate", "model",
    "ablate heads/layers (zero or mean) and compare with random same-size sets",
    "Does removing the circuit hurt summarization more than removing random parts?\n\n"
    "Ablates attention heads (--heads) or whole attention / MLP blocks (--layers, --component), by zero or by "
    "the data-set mean, and measures the rise in teacher-forced summary loss per document. With "
    "--random-controls N the same-size random sets give a null distribution and an empirical p-value. Writes "
    "ablation.json/.csv/.png and per-document losses.",
    "sumcircuit.causal.ablation:report_lines"))
register_causal_method(CausalMethod(
    "patch", PatchConfig, "sumcircuit.causal.patching:patch", "pair",
    "activation patching between base and tuned models: loss-gap recovery per component",
    "Which components carry the fine-tuning's effect?\n\n"
    "Activation patching between a base and a tuned model on the same inputs: denoise runs the base model with "
    "one component taken from the tuned model, noise the reverse. Reports (L_base - L_patched) / (L_base - "
    "L_tuned) on the mean teacher-forced summary loss, per layer (attention and MLP separately), per head, or "
    "per whole block, with bootstrap CIs over documents. Writes patching.json/.csv/.png and per-document losses.",
    "sumcircuit.causal.patching:report_lines"))
register_causal_method(CausalMethod(
    "attribute", AttributionConfig, "sumcircuit.causal.attribution:attribute", "pair",
    "attribution patching: every head, block and neuron scored in one backward pass",
    "Which components carry the fine-tuning's effect, all at once?\n\n"
    "Attribution patching between a base and a tuned model: for every attention head, attention and MLP "
    "contribution and MLP neuron, the loss change of patching it from the other model is estimated as (a_donor - "
    "a_receiver) . dL/da, the gradient taken in the receiving run (denoise: base, noise: tuned), L the same "
    "teacher-forced summary loss as `patch`. One forward per model and one backward per direction score every "
    "component; --validate K checks the top-K and K random components against exact patching. Writes "
    "attribution.json/.csv/.png and attribution_neurons.safetensors; the CSV has the columns and component names "
    "of patching.csv. Attention/MLP blocks are patched exactly (--blocks estimate keeps the first-order estimate, "
    "whose sign can be wrong); --confirm K (default 5) patches the K heads and K neurons of largest estimate "
    "exactly, as AtP* verifies its candidates.",
    "sumcircuit.causal.attribution:report_lines"))
register_causal_method(CausalMethod(
    "faithfulness", FaithfulnessConfig, "sumcircuit.causal.faithfulness:faithfulness", "pair",
    "faithfulness curves: how much of the gap each circuit's top-k layers recover, against random sets",
    "Is the circuit faithful, and more so than random layers?\n\n"
    "For each circuit.json, its layers are added in its ranking order and the attention and MLP outputs of the "
    "first k layers are patched together (denoise: base run, tuned outputs; noise: the reverse), k = 1..K; the "
    "area under the curve (mean effect over k) summarises it, with a bootstrap interval over documents. Random "
    "layer sets of the same size give the baseline (count beaten, empirical p-value). Writes "
    "faithfulness.json/.csv/.png.",
    "sumcircuit.causal.faithfulness:report_lines"))
