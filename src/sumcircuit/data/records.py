"""Records become :class:`Example` s: fields detected or named, each bad record named by file, line and field.

:func:`load_examples` reads up to ``n_docs`` valid examples of a
:class:`~sumcircuit.data.config.DataConfig`; the :class:`DataSource` it
returns is what every output cites (file, split, hash, fields, how many
records were skipped or truncated). Torch-free.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sumcircuit.data.config import DataConfig, template_needs_summary
from sumcircuit.data.sources import PRESETS, iter_raw_records, resolve_source, source_hash
from sumcircuit.errors import DataError

log = logging.getLogger(__name__)


# Field pairs as real releases name them, tried in order.
TEXT_SUMMARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("article", "highlights"), ("article", "abstract"), ("article", "summary"),
    ("document", "summary"), ("dialogue", "summary"), ("source", "target"),
    ("text", "summary"), ("input", "output"), ("content", "summary"),
)
TEXT_FIELDS = tuple(dict.fromkeys(t for t, _ in TEXT_SUMMARY_PAIRS))
_MULTI_REF = re.compile(r"^(summary|highlights|target|abstract|reference)(\d+)$")


@dataclass(frozen=True)
class Example:
    doc_id: str
    text: str
    references: tuple[str, ...]  # empty when the template needs no summary
    where: str  # "file:line", for messages

    @property
    def summary(self) -> str:
        """The first reference (what training uses)."""
        return self.references[0] if self.references else ""


@dataclass
class DataSource:
    """A resolved source: what is cited in provenance."""

    name: str  # file path or hf:id:config
    split: str | None
    sha256: str | None
    text_field: str = ""
    summary_fields: tuple[str, ...] = ()
    skipped_invalid: int = 0  # records skipped with --skip-invalid: every output cites the count
    # set by encode_all(source=...): documents and summaries cut to fit --max-tokens, cited like the skips
    truncated_documents: int | None = None
    truncated_summaries: int | None = None

    def provenance(self) -> dict[str, Any]:
        """What outputs cite about the data: identity, skipped and truncated counts."""
        cuts = {k: v for k, v in (("truncated_documents", self.truncated_documents),
                                  ("truncated_summaries", self.truncated_summaries)) if v is not None}
        return {**self.identity(), "skipped_invalid_records": self.skipped_invalid, **cuts}

    def identity(self) -> dict[str, Any]:
        """What the data *is* (for resume keys): without counts that change with how many documents a run reads."""
        return {"data": self.name, "split": self.split, "sha256": self.sha256,
                "text_field": self.text_field, "summary_fields": list(self.summary_fields)}


@dataclass
class ExampleSet:
    examples: list[Example]
    source: DataSource
    invalid: list[DataError] = field(default_factory=list)


def detect_fields(record: dict[str, Any], text_field: str | None,
                  summary_field: str | None) -> tuple[str, tuple[str, ...]]:
    """Pick (text field, summary fields) from the user's choice or common names."""
    keys = set(record)
    if text_field is None:
        pairs = [t for t, s in TEXT_SUMMARY_PAIRS if t in keys and (summary_field or s) in keys]
        singles = [t for t in TEXT_FIELDS if t in keys]
        found = pairs or singles
        if not found:
            raise DataError(f"cannot detect the document field among {sorted(keys)}; "
                            f"name it with `text_field`")
        text_field = found[0]
    if summary_field is not None:
        return text_field, (summary_field,)
    for t, s in TEXT_SUMMARY_PAIRS:
        if t == text_field and s in keys:
            return text_field, (s,)
    multi = sorted((k for k in keys if _MULTI_REF.match(k)), key=lambda k: int(_MULTI_REF.match(k).group(2)))  # type: ignore[union-attr]
    if multi:
        return text_field, tuple(multi)
    for s in ("summary", "highlights", "abstract", "target", "output"):
        if s in keys:
            return text_field, (s,)
    return text_field, ()


def _as_text(value: Any, *, file: str, line: int, field_name: str, allow_list: bool) -> list[str]:
    if isinstance(value, str):
        values = [value]
    elif allow_list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = value
    elif value is None:
        raise DataError("missing", file=file, line=line, field=field_name)
    else:
        raise DataError(f"expected a string{' or a list of strings' if allow_list else ''}, "
                        f"got {type(value).__name__}", file=file, line=line, field=field_name)
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise DataError("empty", file=file, line=line, field=field_name)
    return values


def to_example(record: dict[str, Any], line: int, source: DataSource, need_summary: bool) -> Example:
    """One record as an Example; a missing or empty field is a DataError naming file, line and field."""
    file = source.name
    if source.text_field not in record:
        raise DataError("missing", file=file, line=line, field=source.text_field)
    # A list-valued document is a list of sentences (SciTLDR): join them.
    text = " ".join(_as_text(record[source.text_field], file=file, line=line,
                             field_name=source.text_field, allow_list=True))
    references: list[str] = []
    if need_summary:
        if not source.summary_fields:
            raise DataError("no summary field found; name it with `summary_field`", file=file, line=line)
        for name in source.summary_fields:
            if name not in record and len(source.summary_fields) > 1:
                continue  # multi-reference sets may have fewer references on some rows
            # A list-valued summary is a set of references (SciTLDR dev/test).
            references += _as_text(record.get(name), file=file, line=line, field_name=name,
                                   allow_list=True)
        if not references:
            raise DataError("missing", file=file, line=line, field=source.summary_fields[0])
    doc_id = next((str(record[k]) for k in ("id", "doc_id", "fname", "paper_id") if k in record),
                  f"{Path(file).name}:{line}")
    return Example(doc_id, text, tuple(references), f"{file}:{line}")


def load_examples(cfg: DataConfig) -> ExampleSet:
    """Read up to ``cfg.n_docs`` valid examples. Invalid records raise unless ``skip_invalid``.

    Args:
        cfg: which source, fields and how many documents.

    Returns:
        The examples, their source (what outputs cite) and the invalid records skipped.

    Example:
        >>> import sumcircuit as sc
        >>> sc.load_examples(sc.DataConfig("../shared/data/dialogsum", split="dev", n_docs=2)).source.text_field  # doctest: +SKIP
        'dialogue'
    """
    name, split = resolve_source(cfg.data, cfg.split)
    source = DataSource(name, split, source_hash(name))
    need_summary = template_needs_summary(cfg.template)
    examples: list[Example] = []
    invalid: list[DataError] = []
    for line, record in iter_raw_records(name, split):
        if cfg.n_docs is not None and len(examples) >= cfg.n_docs:
            break
        try:
            if isinstance(record, DataError):
                raise record
            if not source.text_field:
                preset = PRESETS.get(cfg.data)
                source.text_field, source.summary_fields = detect_fields(
                    record, cfg.text_field or (preset.text_field if preset else None),
                    cfg.summary_field or (preset.summary_field if preset else None))
            examples.append(to_example(record, line, source, need_summary))
        except DataError as err:
            if not cfg.skip_invalid:
                raise DataError(f"{err.reason} (set `skip_invalid` to skip bad records)",
                                file=err.file, line=err.line, field=err.field) from None
            invalid.append(err)
    if not examples:
        first = f" ({len(invalid)} invalid; first: {invalid[0]})" if invalid else ""
        raise DataError(f"no valid records in {name}{first}")
    if invalid:
        source.skipped_invalid = len(invalid)
        log.warning("skipped %d invalid record%s of %s (first: %s)", len(invalid), "" if len(invalid) == 1 else "s",
                    name, invalid[0])
    return ExampleSet(examples, source, invalid)


