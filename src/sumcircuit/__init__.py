"""sumcircuit: what changes inside a GPT-like model when it is fine-tuned to summarize.

Start here::

    import sumcircuit as sc
    base = sc.load_model("smollm2-135m-instruct")
    data = sc.DataConfig("../shared/data/cnndm_gpt4", split="val", n_docs=8, max_tokens=256)
    result = sc.analyze(base, "runs/ft/final", data)
    result                          # a one-line summary
    result.to_pandas()              # one row per head
    sc.patch(base, "runs/ft/final", data).to_pandas()

Every operation has one shape, ``op(inputs, config=None, *, runtime=None,
out=None, resume=True) -> Result``: inputs are specs, loaded models *or
results*; the result has a short repr, ``to_pandas()``, its tensors,
``save(dir)`` (the files the CLI writes) and ``XResult.read(dir)``;
:func:`load_run` reads any output folder back. Components are named by
:class:`Site` everywhere. Fine-tuning methods, causal methods, circuit
scores, claims, study arms and presets are registries: one registration
adds one. Names are imported on first use, so ``import sumcircuit`` (and
``sumcircuit --help``) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.lazy import lazy_getattr
from sumcircuit.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models, data, runtime, vocabulary
    "load_model": "sumcircuit.models", "LoadedModel": "sumcircuit.models", "load_adapter": "sumcircuit.models",
    "DataConfig": "sumcircuit.data.config", "load_examples": "sumcircuit.data.records",
    "Runtime": "sumcircuit.runtime", "Site": "sumcircuit.sites", "parse_sites": "sumcircuit.sites",
    "parse_layers": "sumcircuit.sites", "SumcircuitError": "sumcircuit.errors", "ConfigError": "sumcircuit.errors",
    # operations
    "analyze": "sumcircuit.analysis.run", "AnalysisConfig": "sumcircuit.analysis.config",
    "AnalysisResult": "sumcircuit.analysis.result",
    "finetune": "sumcircuit.training.run", "FinetuneConfig": "sumcircuit.training.config",
    "FinetuneResult": "sumcircuit.training.result",
    "evaluate": "sumcircuit.evaluation.run", "GenerationConfig": "sumcircuit.evaluation.config",
    "EvaluationConfig": "sumcircuit.evaluation.config", "EvaluationResult": "sumcircuit.evaluation.result",
    "select_circuit": "sumcircuit.circuit.select", "CircuitConfig": "sumcircuit.circuit.config",
    "read_circuit": "sumcircuit.circuit.result", "Circuit": "sumcircuit.circuit.result",
    "ablate": "sumcircuit.causal.ablation", "AblationConfig": "sumcircuit.causal.config",
    "AblationResult": "sumcircuit.causal.ablation",
    "patch": "sumcircuit.causal.patching", "PatchConfig": "sumcircuit.causal.config",
    "PatchResult": "sumcircuit.causal.patching",
    "attribute": "sumcircuit.causal.attribution", "AttributionConfig": "sumcircuit.causal.config",
    "AttributionResult": "sumcircuit.causal.attribution",
    "faithfulness": "sumcircuit.causal.faithfulness", "FaithfulnessConfig": "sumcircuit.causal.config",
    "FaithfulnessResult": "sumcircuit.causal.faithfulness",
    "run_causal": "sumcircuit.causal.registry",
    "trace": "sumcircuit.hooks", "run_with_cache": "sumcircuit.hooks", "TraceConfig": "sumcircuit.hooks",
    "TraceResult": "sumcircuit.hooks", "HookContext": "sumcircuit.hooks",
    "compare": "sumcircuit.generalization.run", "CompareConfig": "sumcircuit.generalization.config",
    "CompareResult": "sumcircuit.generalization.result",
    "run_study": "sumcircuit.study.run", "StudyConfig": "sumcircuit.study.config",
    "ExecutorConfig": "sumcircuit.study.executors",
    "StudyPreset": "sumcircuit.study.presets", "StudyResult": "sumcircuit.study.result",
    "load_run": "sumcircuit.results", "Result": "sumcircuit.results", "save_figure": "sumcircuit.plots",
    # registries
    "register_finetune_method": "sumcircuit.training.methods", "FinetuneMethod": "sumcircuit.training.methods",
    "register_causal_method": "sumcircuit.causal.registry", "CausalMethod": "sumcircuit.causal.registry",
    "register_circuit_score": "sumcircuit.circuit.config", "CircuitScore": "sumcircuit.circuit.config",
    "register_claim": "sumcircuit.study.claims", "register_arm": "sumcircuit.study.arms",
    "Arm": "sumcircuit.study.arms", "register_study_preset": "sumcircuit.study.presets",
    "register_result_kind": "sumcircuit.results",
}

__all__ = ["__version__", "load_model", "LoadedModel", "load_adapter", "DataConfig", "load_examples", "Runtime",
           "Site", "parse_sites", "parse_layers", "SumcircuitError", "ConfigError", "analyze", "AnalysisConfig",
           "AnalysisResult", "finetune", "FinetuneConfig", "FinetuneResult", "evaluate", "GenerationConfig",
           "EvaluationConfig", "EvaluationResult", "select_circuit", "CircuitConfig", "read_circuit", "Circuit",
           "ablate", "AblationConfig", "AblationResult", "patch", "PatchConfig", "PatchResult", "attribute",
           "AttributionConfig", "AttributionResult", "faithfulness", "FaithfulnessConfig", "FaithfulnessResult",
           "run_causal", "trace", "run_with_cache", "TraceConfig",
           "TraceResult", "HookContext", "compare", "CompareConfig", "CompareResult",
           "run_study", "StudyConfig", "ExecutorConfig", "StudyPreset", "StudyResult", "load_run",
           "Result", "register_finetune_method", "FinetuneMethod", "register_causal_method", "CausalMethod",
           "register_circuit_score", "CircuitScore", "register_claim", "register_arm", "Arm",
           "register_study_preset", "register_result_kind", "save_figure"]


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from sumcircuit.analysis.config import AnalysisConfig
    from sumcircuit.analysis.result import AnalysisResult
    from sumcircuit.analysis.run import analyze
    from sumcircuit.causal.ablation import AblationResult, ablate
    from sumcircuit.causal.attribution import AttributionResult, attribute
    from sumcircuit.causal.config import AblationConfig, AttributionConfig, FaithfulnessConfig, PatchConfig
    from sumcircuit.causal.faithfulness import FaithfulnessResult, faithfulness
    from sumcircuit.causal.patching import PatchResult, patch
    from sumcircuit.causal.registry import CausalMethod, register_causal_method, run_causal
    from sumcircuit.circuit.config import CircuitConfig, CircuitScore, register_circuit_score
    from sumcircuit.circuit.result import Circuit, read_circuit
    from sumcircuit.circuit.select import select_circuit
    from sumcircuit.data.config import DataConfig
    from sumcircuit.data.records import load_examples
    from sumcircuit.errors import ConfigError, SumcircuitError
    from sumcircuit.evaluation.config import EvaluationConfig, GenerationConfig
    from sumcircuit.evaluation.result import EvaluationResult
    from sumcircuit.evaluation.run import evaluate
    from sumcircuit.generalization.config import CompareConfig
    from sumcircuit.generalization.result import CompareResult
    from sumcircuit.generalization.run import compare
    from sumcircuit.hooks import HookContext, TraceConfig, TraceResult, run_with_cache, trace
    from sumcircuit.models import LoadedModel, load_adapter, load_model
    from sumcircuit.plots import save_figure
    from sumcircuit.results import Result, load_run, register_result_kind
    from sumcircuit.runtime import Runtime
    from sumcircuit.sites import Site, parse_layers, parse_sites
    from sumcircuit.study.arms import Arm, register_arm
    from sumcircuit.study.claims import register_claim
    from sumcircuit.study.config import StudyConfig
    from sumcircuit.study.executors import ExecutorConfig
    from sumcircuit.study.presets import StudyPreset, register_study_preset
    from sumcircuit.study.result import StudyResult
    from sumcircuit.study.run import run_study
    from sumcircuit.training.config import FinetuneConfig
    from sumcircuit.training.methods import FinetuneMethod, register_finetune_method
    from sumcircuit.training.result import FinetuneResult
    from sumcircuit.training.run import finetune
