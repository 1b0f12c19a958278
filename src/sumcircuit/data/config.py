"""What every data-reading operation takes: :class:`DataConfig`, and the prompt :class:`Template`.

Importable without torch: the CLI builds ``--data``, ``--max-tokens`` and the
other data flags from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sumcircuit.config import POSITIVE, Config, at_least, option
from sumcircuit.errors import ConfigError, DataError

DEFAULT_TEMPLATE = "{document}\nTL;DR: {summary}"
DEFAULT_MAX_TOKENS = 1024
MIN_MAX_TOKENS = 16  # below this a document and its summary cannot both keep tokens
DATA_PRESETS = ("cnn_dailymail", "xsum", "scitldr", "dialogsum", "samsum")


@dataclass(frozen=True)
class Template:
    """A prompt template split at its two slots: ``pre {document} mid {summary} post``.

    Example:
        >>> Template.parse("{document}\\nTL;DR: {summary}").mid
        '\\nTL;DR: '
    """

    pre: str
    mid: str
    post: str
    has_summary: bool

    @classmethod
    def parse(cls, template: str) -> Template:
        """Split ``template`` at ``{document}`` (or ``{text}``) and ``{summary}``; a bad template is a DataError."""
        doc_slot = "{document}" if "{document}" in template else "{text}"
        if template.count(doc_slot) != 1:
            raise DataError(f"template must contain {{document}} (or {{text}}) exactly once: {template!r}")
        pre, rest = template.split(doc_slot)
        if "{summary}" not in rest:
            if "{summary}" in pre:
                raise DataError(f"template must put {{summary}} after the document: {template!r}")
            return cls(pre, rest, "", has_summary=False)
        if rest.count("{summary}") != 1:
            raise DataError(f"template must contain {{summary}} at most once: {template!r}")
        mid, post = rest.split("{summary}")
        return cls(pre, mid, post, has_summary=True)


def template_needs_summary(template: str) -> bool:
    """Whether ``template`` has a ``{summary}`` slot (a loss or ROUGE needs one)."""
    return Template.parse(template).has_summary


def _data_name(value: Any) -> str:
    """A path, a source string, or an in-memory ``datasets.Dataset`` (registered under a ``memory:`` name)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "column_names") and hasattr(value, "__iter__"):  # a datasets.Dataset, duck-typed
        from sumcircuit.data.sources import register_dataset

        return register_dataset(value)
    raise ConfigError("data", f"expected a path, a source such as hf:ID or a preset name, or a datasets.Dataset; "
                              f"got {type(value).__name__}")


def _template(value: Any) -> Any:
    if isinstance(value, str):
        Template.parse(value)  # a bad template fails here, before any file is read
    return value


@dataclass(frozen=True)
class DataConfig(Config):
    """Which documents to read and how to format them (``--data``, ``--text-field``, ...).

    Args:
        data: a JSONL(.gz)/CSV/Parquet file, a folder (with ``split``), a ``datasets``
            ``save_to_disk`` folder, ``hf:ID[:CONFIG]``, a preset name, or an in-memory
            ``datasets.Dataset``.

    Example:
        >>> import sumcircuit as sc
        >>> sc.DataConfig("../shared/data/cnndm_gpt4", split="val", n_docs=8).n_docs
        8
    """

    data: str = option(help=f"JSONL(.gz)/CSV/Parquet file, a folder with --split, a `datasets` save_to_disk folder, "
                            f"hf:ID[:CONFIG], or a preset ({', '.join(DATA_PRESETS)})", normalize=_data_name,
                       group="data")
    text_field: str | None = option(None, help="document field (default: detected)", group="data")
    summary_field: str | None = option(None, help="summary field (default: detected)", group="data")
    template: str = option(DEFAULT_TEMPLATE, help="prompt template with {document} and {summary}; '{text}' = the "
                                                  "document alone, verbatim", normalize=_template, group="data")
    max_tokens: int = option(DEFAULT_MAX_TOKENS, help="document is truncated so document + summary fit",
                             bound=at_least(MIN_MAX_TOKENS), group="data")
    n_docs: int | None = option(None, help="use the first N valid records", bound=POSITIVE, group="data")
    split: str | None = option(None, help="split, for folders, presets and hf: sources", group="data")
    skip_invalid: bool = option(False, help="skip bad records (and report how many) instead of failing",
                                group="data")

    @classmethod
    def from_dataset(cls, dataset: Any, **options: Any) -> DataConfig:
        """A config reading an in-memory ``datasets.Dataset`` (the same as ``DataConfig(dataset, ...)``).

        Args:
            dataset: a ``datasets.Dataset`` with a document and a summary column.
            options: any other :class:`DataConfig` field.

        Returns:
            The config; fields are detected as for files.

        Example:
            >>> import datasets, sumcircuit as sc
            >>> ds = datasets.Dataset.from_list([{"article": "A long text.", "highlights": "Short."}])
            >>> sc.DataConfig(ds).data.startswith("memory:")
            True
        """
        return cls(dataset, **options)

    def with_split(self, split: str | None, n_docs: int | None = None) -> DataConfig:
        """The same source and formatting, another split (and document count)."""
        return self.replace(split=split, n_docs=n_docs)


def coerce_data(data: DataConfig | Any, param: str = "data") -> DataConfig:
    """What the operations accept as ``data``: a :class:`DataConfig`, a dict of its fields, a path or a Dataset.

    Args:
        data: the documents to read.
        param: the parameter name used in errors.

    Returns:
        A :class:`DataConfig` (a path or a ``datasets.Dataset`` gets the default formatting).
    """
    if isinstance(data, DataConfig):
        return data
    if isinstance(data, dict):
        from sumcircuit.config import coerce_config

        return coerce_config(DataConfig, data, param)
    if isinstance(data, (str, Path)) or hasattr(data, "column_names"):
        return DataConfig(data)
    raise ConfigError(param, f"expected a DataConfig, a path or a datasets.Dataset, got {type(data).__name__}")
