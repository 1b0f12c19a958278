"""Summarization data: from files or the hub to causal-LM inputs.

``config`` (:class:`DataConfig`, the prompt :class:`Template`; no torch),
``sources`` (files, ``save_to_disk`` folders, the hub, presets, in-memory
datasets), ``records`` (fields, :class:`Example`, :func:`load_examples`),
``encoding`` (token ids, loss masks, padded batches; torch) and ``overview`` (:func:`preview`).
The torch-using names are imported on first use, so ``import sumcircuit.data``
stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sumcircuit.data.config import (
    DATA_PRESETS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPLATE,
    MIN_MAX_TOKENS,
    DataConfig,
    Template,
    template_needs_summary,
)
from sumcircuit.data.records import DataSource, Example, ExampleSet, detect_fields, load_examples, to_example
from sumcircuit.data.sources import PRESETS, Preset, iter_raw_records, register_dataset, resolve_source
from sumcircuit.lazy import lazy_getattr

_LAZY = {"IGNORE_INDEX": "encoding", "Encoded": "encoding", "encode": "encoding", "encode_all": "encoding",
         "collate": "encoding", "check_context": "encoding", "preview": "overview"}

__all__ = ["DATA_PRESETS", "DEFAULT_MAX_TOKENS", "DEFAULT_TEMPLATE", "MIN_MAX_TOKENS", "PRESETS", "DataConfig",
           "DataSource", "Example", "ExampleSet", "Preset", "Template", "detect_fields", "iter_raw_records",
           "load_examples", "register_dataset", "resolve_source", "template_needs_summary", "to_example",
           "IGNORE_INDEX", "Encoded", "encode", "encode_all", "collate", "check_context", "preview"]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from sumcircuit.data.encoding import IGNORE_INDEX, Encoded, check_context, collate, encode, encode_all
    from sumcircuit.data.overview import preview
