"""sumcircuit: what changes inside a GPT-like model when it is fine-tuned to summarize.

The package is flat, one module per concern: ``adapters`` (architecture table),
``models`` (loading), ``data`` (summarization pairs to model inputs),
``provenance`` and ``artifacts`` (what every output carries and how it is written),
and ``cli`` (the ``sumcircuit`` command).
"""

__version__ = "0.1.0"
