"""What ``compare`` takes: :class:`CompareConfig` (null sizes, resamples, levels; no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sumcircuit.config import NON_NEGATIVE, POSITIVE, PROBABILITY_OPEN, Config, option

Level = Literal["layers", "heads"]
LEVELS: tuple[Level, ...] = ("layers", "heads")


@dataclass(frozen=True)
class CompareConfig(Config):
    """How circuits of several studies are compared: permutation nulls, document resamples, levels.

    Example:
        >>> import sumcircuit as sc
        >>> sc.CompareConfig(levels="layers").levels
        ('layers',)
    """

    levels: tuple[Level, ...] = option(LEVELS, help="what overlaps are computed: circuit layers (any two models, at "
                                                    "relative depth) and heads (the same model only), comma separated",
                                       normalize=lambda v: tuple(s.strip() for s in v.split(",") if s.strip())
                                       if isinstance(v, str) else v)
    n_permutations: int = option(5000, help="random circuits of equal size (and permuted score profiles) in each "
                                            "null distribution", bound=POSITIVE, group="statistics")
    n_bootstrap: int = option(1000, help="document resamples of each run's analysis for the intervals",
                              bound=POSITIVE, group="statistics")
    ci_level: float = option(0.95, help="confidence level of the intervals", bound=PROBABILITY_OPEN,
                             group="statistics")
    seed: int = option(0, help="seed of the nulls and resamples", bound=NON_NEGATIVE, group="statistics")
