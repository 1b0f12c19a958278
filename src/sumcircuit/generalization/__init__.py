"""Comparing studies: do circuits, the entropy shift and targeted LoRA generalize across domains and models?

``config`` (:class:`CompareConfig`; no torch), ``overlap`` (Jaccard, Spearman,
permutation nulls, relative depth; numpy), ``profile`` (a study folder read
as a :class:`RunProfile`), ``stats`` (overlap rows with nulls and intervals),
``control`` (the change specific to summarization against the control task),
``result`` (:class:`CompareResult`), ``report`` (``compare.html``) and ``run``
(:func:`compare`). Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.generalization.config import CompareConfig
from sumcircuit.lazy import lazy_getattr

_LAZY = {"compare": "run", "compare_profiles": "run", "CompareResult": "result", "read_profile": "profile",
         "RunProfile": "profile", "CompareError": "profile"}

__all__ = ["CompareConfig", "compare", "compare_profiles", "CompareResult", "read_profile", "RunProfile",
           "CompareError"]

__getattr__ = lazy_getattr(__name__, _LAZY, globals())

if TYPE_CHECKING:
    from sumcircuit.generalization.profile import CompareError, RunProfile, read_profile
    from sumcircuit.generalization.result import CompareResult
    from sumcircuit.generalization.run import compare, compare_profiles
