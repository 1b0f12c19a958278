"""sumcircuit: what changes inside a GPT-like model when it is fine-tuned to summarize.

Start here::

    import sumcircuit as sc
    base = sc.load_model("smollm2-135m-instruct")
    data = sc.DataConfig("../shared/data/cnndm_gpt4", split="val", n_docs=8, max_tokens=256)
    result = sc.analyze(base, "runs/ft/final", data)
    result.to_pandas()              # one row per head
    sc.patch(base, "runs/ft/final", data).to_pandas()

Every function takes model specs *or* loaded models, returns a typed result
with ``to_pandas()``, tensors and ``save(dir)`` (the files the CLI writes),
and :func:`load_run` reads any output folder back. Components are named by
:class:`Site` everywhere. Names are imported on first use, so ``import
sumcircuit`` (and ``sumcircuit --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sumcircuit.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "sumcircuit.models", "LoadedModel": "sumcircuit.models", "load_adapter": "sumcircuit.models",
    "DataConfig": "sumcircuit.data", "load_examples": "sumcircuit.data",
    "analyze": "sumcircuit.analysis", "AnalysisConfig": "sumcircuit.analysis",
    "AnalysisResult": "sumcircuit.analysis",
    "attribute": "sumcircuit.causal.attribution", "AttributionConfig": "sumcircuit.causal.attribution",
    "AttributionResult": "sumcircuit.causal.attribution",
    "patch": "sumcircuit.causal.patching", "PatchConfig": "sumcircuit.causal.patching",
    "PatchResult": "sumcircuit.causal.patching",
    "ablate": "sumcircuit.causal.ablation", "AblationConfig": "sumcircuit.causal.ablation",
    "AblationResult": "sumcircuit.causal.ablation",
    "finetune": "sumcircuit.training.loop", "FinetuneConfig": "sumcircuit.training.config",
    "FinetuneResult": "sumcircuit.training.loop",
    "evaluate": "sumcircuit.evaluation", "GenerationConfig": "sumcircuit.evaluation",
    "EvaluationResult": "sumcircuit.evaluation",
    "select_circuit": "sumcircuit.circuit", "read_circuit": "sumcircuit.circuit", "Circuit": "sumcircuit.circuit",
    "run_study": "sumcircuit.reproduce", "StudyConfig": "sumcircuit.reproduce",
    "load_run": "sumcircuit.runs", "StudyResult": "sumcircuit.runs",
    "Site": "sumcircuit.sites", "parse_sites": "sumcircuit.sites", "parse_layers": "sumcircuit.sites",
    "SumcircuitError": "sumcircuit.errors",
}

__all__ = ["__version__", "load_model", "LoadedModel", "load_adapter", "DataConfig", "load_examples",
          "analyze", "AnalysisConfig", "AnalysisResult", "attribute", "AttributionConfig",
          "AttributionResult", "patch", "PatchConfig", "PatchResult", "ablate", "AblationConfig",
          "AblationResult", "finetune", "FinetuneConfig", "FinetuneResult", "evaluate", "GenerationConfig",
          "EvaluationResult", "select_circuit", "read_circuit", "Circuit", "run_study", "StudyConfig",
          "load_run", "StudyResult", "Site", "parse_sites", "parse_layers", "SumcircuitError"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sumcircuit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from sumcircuit.analysis import AnalysisConfig, AnalysisResult, analyze
    from sumcircuit.causal.ablation import AblationConfig, AblationResult, ablate
    from sumcircuit.causal.attribution import AttributionConfig, AttributionResult, attribute
    from sumcircuit.causal.patching import PatchConfig, PatchResult, patch
    from sumcircuit.circuit import Circuit, read_circuit, select_circuit
    from sumcircuit.data import DataConfig, load_examples
    from sumcircuit.errors import SumcircuitError
    from sumcircuit.evaluation import EvaluationResult, GenerationConfig, evaluate
    from sumcircuit.models import LoadedModel, load_adapter, load_model
    from sumcircuit.reproduce import StudyConfig, run_study
    from sumcircuit.runs import StudyResult, load_run
    from sumcircuit.sites import Site, parse_layers, parse_sites
    from sumcircuit.training.config import FinetuneConfig
    from sumcircuit.training.loop import FinetuneResult, finetune
