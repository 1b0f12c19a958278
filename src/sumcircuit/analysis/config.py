"""How an analysis collects and summarizes its statistics: :class:`AnalysisConfig` (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from sumcircuit.config import NON_NEGATIVE, NON_NEGATIVE_REAL, POSITIVE, PROBABILITY_OPEN, Config, at_least, option
from sumcircuit.errors import SumcircuitError

KernelMode = Literal["auto", "compiled", "eager", "fused"]  # sumcircuit.kernels: which statistics kernels run
Region = Literal["all", "document", "summary"]
CIMethod = Literal["bootstrap", "normal"]


class AnalysisError(SumcircuitError):
    """An analysis that cannot run as asked (bad option, output folder from another run)."""


class IncompatibleModelsError(AnalysisError):
    """Base and tuned models that cannot be compared token by token."""


@dataclass(frozen=True)
class AnalysisConfig(Config):
    """How statistics are collected and summarized (the data side is a :class:`~sumcircuit.data.DataConfig`).

    Example:
        >>> import sumcircuit as sc
        >>> sc.AnalysisConfig(region="summary", n_bootstrap=200).region
        'summary'
    """

    region: Region = option("all", help="which query positions count", group="analysis")
    batch_size: int = option(4, help="documents per forward pass", bound=POSITIVE, group="analysis")
    top_k: int = option(100, help="neurons listed in neurons.csv", bound=NON_NEGATIVE, group="analysis")
    neuron_threshold: float = option(0.5, help="|standardized change| (Cohen's d) above which a neuron counts as "
                                               "changed", bound=NON_NEGATIVE_REAL, group="analysis")
    sign_flip_eps: float = option(0.1, help="in pooled-sd units; smaller |means| never count as a sign flip",
                                  bound=NON_NEGATIVE_REAL, cli=False)
    neuron_rank_by: Literal["standardized", "abs_change"] = option(
        "standardized", help="ordering of neurons.csv", aliases=("--rank-neurons-by",), group="analysis")
    shard_size: int = option(32, help="documents per resumable shard; under N processes each process takes one "
                                      "shard per round", bound=POSITIVE, group="analysis")
    seed: int = option(0, help="bootstrap resampling seed", bound=NON_NEGATIVE, group="analysis")
    ci_method: CIMethod = option("bootstrap", help="95% CI from per-document values: percentile bootstrap over "
                                                   "documents, or normal approximation", aliases=("--ci",),
                                 group="analysis")
    ci_level: float = option(0.95, help="confidence level of the intervals", bound=PROBABILITY_OPEN, group="analysis")
    n_bootstrap: int = option(1000, help="bootstrap replicates", bound=at_least(10), group="analysis")
    cka: bool = option(True, help="linear CKA (3 d x d products per layer; --no-cka skips it)", group="analysis")
    rows_per_tile: int | None = option(None, help="query rows per score tile; None: sized for the device",
                                       bound=POSITIVE, cli=False)
    kernels: KernelMode = option("auto", help="statistics kernels compiled in C++ for this CPU (needs a C++ compiler, "
                                              "built once; 2-4x faster), run eagerly, or fused: from one attention "
                                              "call per model returning the log-sum-exp (CUDA's memory-efficient "
                                              "kernel; elsewhere its explicit statement, slower); auto: compiled on "
                                              "CPU (eager without a compiler), fused on CUDA", group="analysis")

    def validate(self) -> None:
        """Kept for callers of earlier versions: a config is checked when it is made."""

    def fingerprint_fields(self) -> dict[str, Any]:
        """Fields that change the accumulated sums (a resumed run must agree on them)."""
        skip = {"top_k", "neuron_threshold", "sign_flip_eps", "neuron_rank_by", "seed",
                "ci_method", "ci_level", "n_bootstrap",  # these only change the final summary
                "rows_per_tile", "kernels"}  # float rounding at most
        return {k: v for k, v in asdict(self).items() if k not in skip}
