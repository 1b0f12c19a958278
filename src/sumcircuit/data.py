"""Summarization data: from files or the hub to causal-LM inputs.

Sources: JSONL (plain or ``.gz``), CSV, a folder plus ``--split`` (``train`` ->
``train.jsonl.gz``), the hub (``hf:abisee/cnn_dailymail:3.0.0``) or a named
preset. Records become :class:`Example` (document text plus one or more
reference summaries); :func:`encode` turns one into token ids with the
document truncated so that the summary always survives, and labels masked so
the loss covers exactly the summary tokens (and the closing EOS).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import re
import statistics
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sumcircuit.errors import DataError
from sumcircuit.options import DEFAULT_MAX_TOKENS, DEFAULT_TEMPLATE, MIN_MAX_TOKENS
from sumcircuit.provenance import file_sha256

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Field pairs as real releases name them, tried in order.
TEXT_SUMMARY_PAIRS: tuple[tuple[str, str], ...] = (
    ("article", "highlights"), ("article", "abstract"), ("article", "summary"),
    ("document", "summary"), ("dialogue", "summary"), ("source", "target"),
    ("text", "summary"), ("input", "output"), ("content", "summary"),
)
TEXT_FIELDS = tuple(dict.fromkeys(t for t, _ in TEXT_SUMMARY_PAIRS))
_MULTI_REF = re.compile(r"^(summary|highlights|target|abstract|reference)(\d+)$")
_SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".csv", ".csv.gz", ".parquet")


@dataclass(frozen=True)
class Preset:
    hub_id: str
    config: str | None
    text_field: str
    summary_field: str
    default_split: str


PRESETS: dict[str, Preset] = {
    "cnn_dailymail": Preset("abisee/cnn_dailymail", "3.0.0", "article", "highlights", "test"),
    "xsum": Preset("EdinburghNLP/xsum", None, "document", "summary", "test"),
    "scitldr": Preset("allenai/scitldr", "Abstract", "source", "target", "test"),
    "dialogsum": Preset("knkarthick/dialogsum", None, "dialogue", "summary", "test"),
    "samsum": Preset("knkarthick/samsum", None, "dialogue", "summary", "test"),
}


@dataclass(frozen=True)
class DataConfig:
    """What every data-reading command takes (``--data``, ``--text-field``, ...)."""

    data: str
    text_field: str | None = None
    summary_field: str | None = None
    template: str = DEFAULT_TEMPLATE
    max_tokens: int = DEFAULT_MAX_TOKENS
    n_docs: int | None = None
    split: str | None = None
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < MIN_MAX_TOKENS:
            raise DataError(f"--max-tokens must be an integer >= {MIN_MAX_TOKENS}, got {self.max_tokens!r}")
        if self.n_docs is not None and (not isinstance(self.n_docs, int) or self.n_docs < 1):
            raise DataError(f"--n-docs must be a positive integer, got {self.n_docs!r}")
        Template.parse(self.template)  # a bad template fails here, before any file is read

    @classmethod
    def from_dataset(cls, dataset: Any, **options: Any) -> DataConfig:
        """A config reading an in-memory ``datasets.Dataset`` (fields detected as for files)."""
        return cls(register_dataset(dataset), **options)


@dataclass(frozen=True)
class Example:
    doc_id: str
    text: str
    references: tuple[str, ...]  # empty when the template needs no summary
    where: str  # "file:line", for messages

    @property
    def summary(self) -> str:
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


# ---------------------------------------------------------------- sources

def resolve_source(data: str, split: str | None) -> tuple[str, str | None]:
    """Map ``data`` (+ split) to a file path or ``hf:`` id; presets become hub ids."""
    if data in PRESETS:
        preset = PRESETS[data]
        name = f"hf:{preset.hub_id}" + (f":{preset.config}" if preset.config else "")
        return name, split or preset.default_split
    if data.startswith("hf:"):
        return data, split or "test"
    if data.startswith("memory:"):
        if data not in _IN_MEMORY:
            raise DataError(f"{data}: no such in-memory dataset in this process")
        return data, split
    path = Path(data).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return f"disk:{path.resolve()}", split
    if path.is_dir():
        if split is None:
            raise DataError(f"{path} is a folder: name the split with --split "
                            f"(files there: {', '.join(sorted(p.name for p in path.iterdir()))})")
        for suffix in _SUFFIXES:
            if (candidate := path / f"{split}{suffix}").is_file():
                return str(candidate), split
        raise DataError(f"no file for split '{split}' in {path}")
    if path.is_file():
        return str(path), split
    for suffix in _SUFFIXES:  # ../shared/data/cnndm_gpt4/train -> train.jsonl.gz
        if (candidate := path.with_name(path.name + suffix)).is_file():
            return str(candidate), split or path.name
    raise DataError(f"data not found: {data} (a JSONL/CSV file, a folder with --split, "
                    f"hf:ID[:CONFIG], or one of the presets {', '.join(PRESETS)})")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_IN_MEMORY: dict[str, Any] = {}  # "memory:<fingerprint>" -> datasets.Dataset handed to the API
csv.field_size_limit(2**31 - 1)  # news articles are long; the csv module's default cap is 131,072


def register_dataset(dataset: Any) -> str:
    """A name for an in-memory ``datasets.Dataset`` (its fingerprint is what provenance cites)."""
    fingerprint = getattr(dataset, "_fingerprint", None) or f"{id(dataset):x}"
    name = f"memory:{fingerprint}"
    _IN_MEMORY[name] = dataset
    return name


def _binary_lines(name: str) -> Iterator[bytes]:
    """Raw lines of a (possibly gzipped) file; unreadable or truncated files become one DataError."""
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(name, "rb") as fh:
            yield from fh
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read the file ({type(exc).__name__}: {exc}); is it truncated or "
                        "not what its name says?", file=name) from None


def _iter_jsonl(name: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    for line_no, raw in enumerate(_binary_lines(name), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, DataError(f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})",
                                     file=name, line=line_no)
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", file=name, line=line_no)
            continue
        if not isinstance(record, dict):
            yield line_no, DataError(f"expected a JSON object, got {type(record).__name__}",
                                     file=name, line=line_no)
            continue
        yield line_no, record


def _iter_csv(name: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """CSV rows with the *physical* line each ends on (quoted fields may span lines)."""
    lines = (raw.decode("utf-8", errors="surrogateescape") for raw in _binary_lines(name))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, DataError(f"malformed CSV: {exc}", file=name, line=reader.line_num)
            continue
        if not any(cell.strip() for cell in row):
            continue
        if any(_SURROGATE.search(cell) for cell in row):
            yield reader.line_num, DataError("not UTF-8 text", file=name, line=reader.line_num)
            continue
        if len(row) != len(header):
            yield reader.line_num, DataError(
                f"{len(row)} fields where the header has {len(header)} (an unquoted comma?)",
                file=name, line=reader.line_num)
            continue
        yield reader.line_num, dict(zip(header, row))


def _iter_parquet(name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(name)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"not a readable Parquet file: {exc}", file=name) from None
    row_no = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row_no += 1
            yield row_no, record


def _iter_disk(path: str, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict with ``split``)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(f"cannot read this save_to_disk folder: {exc}", file=path) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not in this DatasetDict (splits: {', '.join(loaded)}); "
                            "name it with --split", file=path)
        loaded = loaded[split]
    for row_no, row in enumerate(loaded, start=1):
        yield row_no, dict(row)


def iter_raw_records(name: str, split: str | None) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Yield (line, record) pairs; a record that cannot be parsed comes as a DataError."""
    if name.startswith("hf:"):
        yield from _iter_hub(name, split)
    elif name.startswith("memory:"):
        yield from ((i, dict(row)) for i, row in enumerate(_IN_MEMORY[name], start=1))
    elif name.startswith("disk:"):
        yield from _iter_disk(name[5:], split)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(name)
    elif (name[:-3] if name.endswith(".gz") else name).endswith(".csv"):
        yield from _iter_csv(name)
    else:
        yield from _iter_jsonl(name)


def _iter_hub(name: str, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    parts = name[3:].split(":")
    hub_id, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id, config, split=split or "test", streaming=True)
    except Exception as exc:  # network, unknown id, unknown split
        raise DataError(f"could not load {name} split '{split}' from the Hugging Face hub: {exc}") from exc
    for row_no, row in enumerate(dataset, start=1):
        yield row_no, dict(row)


# ---------------------------------------------------------------- fields

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
                            f"name it with --text-field")
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
    file = source.name
    if source.text_field not in record:
        raise DataError("missing", file=file, line=line, field=source.text_field)
    # A list-valued document is a list of sentences (SciTLDR): join them.
    text = " ".join(_as_text(record[source.text_field], file=file, line=line,
                             field_name=source.text_field, allow_list=True))
    references: list[str] = []
    if need_summary:
        if not source.summary_fields:
            raise DataError("no summary field found; name it with --summary-field", file=file, line=line)
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


def _source_hash(name: str) -> str | None:
    """What provenance cites: a file's sha256, a save_to_disk folder's data files, a Dataset's fingerprint."""
    if name.startswith("hf:"):
        return None
    if name.startswith("memory:"):
        return name.split(":", 1)[1]
    if name.startswith("disk:"):
        digest = hashlib.sha256()
        for path in sorted(Path(name[5:]).rglob("*.arrow")):
            digest.update(file_sha256(path).encode())
        return digest.hexdigest()
    return file_sha256(name)


def load_examples(cfg: DataConfig) -> ExampleSet:
    """Read up to ``cfg.n_docs`` valid examples. Invalid records raise unless ``skip_invalid``."""
    name, split = resolve_source(cfg.data, cfg.split)
    source = DataSource(name, split, _source_hash(name))
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
                raise DataError(f"{err.reason} (use --skip-invalid to skip bad records)",
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


# ---------------------------------------------------------------- encoding

@dataclass(frozen=True)
class Template:
    """A prompt template split at its two slots: ``pre {document} mid {summary} post``."""

    pre: str
    mid: str
    post: str
    has_summary: bool

    @classmethod
    def parse(cls, template: str) -> Template:
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
    return Template.parse(template).has_summary


@dataclass(frozen=True)
class Encoded:
    """One tokenized example. Spans are [start, end) token positions."""

    doc_id: str
    input_ids: list[int]
    labels: list[int]
    document_span: tuple[int, int]
    summary_span: tuple[int, int]  # the summary tokens and the EOS; empty without {summary}
    document_tokens: int  # before truncation
    truncated: bool
    summary_truncated: bool

    @property
    def prompt_length(self) -> int:
        """Tokens before the summary: the prompt a generator continues."""
        return self.summary_span[0] if self.summary_span[1] > self.summary_span[0] else len(self.input_ids)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # split_special_tokens: a document that contains "<|im_end|>" is text, not a control token.
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS token if this tokenizer adds one by itself (Gemma does, GPT-2 and SmolLM2 do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _move_trailing_spaces(left: str, right: str) -> tuple[str, str]:
    """'TL;DR: ' + 'The' -> 'TL;DR:' + ' The': byte-level BPE attaches spaces to the next word."""
    stripped = left.rstrip(" ")
    return stripped, left[len(stripped):] + right


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, template: str = DEFAULT_TEMPLATE,
           max_tokens: int = DEFAULT_MAX_TOKENS, *, with_summary: bool = True,
           summary_budget: int | None = None) -> Encoded:
    """Tokenize ``example`` with ``template``; truncate the document to fit ``max_tokens``.

    Pieces are tokenized separately so the summary's tokens and the loss mask
    are exact. With ``with_summary=False`` only the prompt is produced (for
    generation). With ``summary_budget`` (the generation length) the document
    is truncated to leave that many tokens, so the prompt does not depend on
    the reference; without it, the document is truncated as in training.
    """
    tpl = Template.parse(template)
    summary_text = example.summary if tpl.has_summary else ""
    if tpl.has_summary and not summary_text and with_summary:
        raise DataError("empty summary", file=example.where, field="summary")
    pre, doc_text = _move_trailing_spaces(tpl.pre, example.text)
    mid, summ_text = _move_trailing_spaces(tpl.mid, summary_text) if tpl.has_summary else (tpl.mid, "")
    bos, pre_ids, mid_ids = _bos(tokenizer), _tokens(tokenizer, pre), _tokens(tokenizer, mid)
    doc_ids = _tokens(tokenizer, doc_text)
    sum_ids, post_ids, eos = [], [], []
    if tpl.has_summary:
        sum_ids, post_ids = _tokens(tokenizer, summ_text), _tokens(tokenizer, tpl.post)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fixed = len(bos) + len(pre_ids) + len(mid_ids)
    if not with_summary and summary_budget is not None:  # the reference's length must not leak
        sum_ids = [0] * max(0, summary_budget - len(post_ids) - len(eos))
    tail = sum_ids + post_ids + eos
    min_doc = min(len(doc_ids), max(1, max_tokens // 8))
    summary_truncated = fixed + min_doc + len(tail) > max_tokens
    if summary_truncated:  # only when the summary alone nearly fills the window
        keep = max(0, max_tokens - fixed - min_doc - len(post_ids) - len(eos))
        sum_ids = sum_ids[:keep]
        tail = sum_ids + post_ids + eos
    budget = max(0, max_tokens - fixed - len(tail))
    kept_doc = doc_ids[:budget]
    if doc_ids and not kept_doc:
        raise DataError(f"--max-tokens {max_tokens} leaves no room for the document after the template and "
                        f"{len(tail)} summary tokens", file=example.where)
    prompt = bos + pre_ids + kept_doc + mid_ids
    doc_start = len(bos) + len(pre_ids)
    document_span = (doc_start, doc_start + len(kept_doc))
    if not with_summary:
        return Encoded(example.doc_id, prompt, [IGNORE_INDEX] * len(prompt), document_span,
                       (len(prompt), len(prompt)), len(doc_ids), len(kept_doc) < len(doc_ids),
                       summary_truncated)
    input_ids = prompt + tail
    summary_span = (len(prompt), len(input_ids)) if tpl.has_summary else (len(input_ids), len(input_ids))
    labels = [IGNORE_INDEX] * len(prompt) + (list(tail) if tpl.has_summary else [])
    return Encoded(example.doc_id, input_ids, labels, document_span, summary_span, len(doc_ids),
                   len(kept_doc) < len(doc_ids), summary_truncated)


def check_context(tokenizer: PreTrainedTokenizerBase, max_tokens: int, what: str | None = None) -> None:
    """Every sequence must fit the model's positions (``load_model`` records them on the tokenizer).

    One rule for every family and command: past its learned positions GPT-2 fails inside torch, and
    past its trained context a RoPE model still runs but gives numbers nobody should cite.
    ``what`` names the length in the message (default: ``--max-tokens N``).
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_tokens:
        raise DataError(f"{what or f'--max-tokens {max_tokens}'} exceeds the model's {limit} positions")


def encode_all(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: DataConfig, *,
               need_summary_tokens: bool = False, source: DataSource | None = None) -> list[Encoded]:
    """Encode every example. ``need_summary_tokens``: a loss on summaries must have some to average over.

    ``source``: the examples' source, which then records how many documents and
    summaries were cut, so that every output citing it says so.
    """
    check_context(tokenizer, cfg.max_tokens)
    encoded = [encode(tokenizer, ex, cfg.template, cfg.max_tokens) for ex in examples]
    cut = sum(e.summary_truncated for e in encoded)
    if source is not None:
        source.truncated_documents, source.truncated_summaries = sum(e.truncated for e in encoded), cut
    if cut:  # the loss then covers only part of those summaries: say so
        log.warning("%d of %d summaries were cut to fit --max-tokens %d (%s)", cut, len(encoded), cfg.max_tokens,
                    cfg.data)
    if need_summary_tokens:
        if not template_needs_summary(cfg.template):
            raise DataError(f"--template {cfg.template!r} has no {{summary}}: a summary loss needs one")
        if encoded and not any(e.summary_span[1] > e.summary_span[0] for e in encoded):
            raise DataError(f"no summary tokens in {len(encoded)} documents at --max-tokens {cfg.max_tokens}",
                            file=cfg.data)
    return encoded


def collate(batch: Sequence[Encoded], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Right padding for training/analysis, left padding for generation.

    Besides ids, mask and labels, returns ``document_mask`` and ``summary_mask``
    (bool, [B, T]) so statistics can be restricted to a region.
    """
    length = max(len(e.input_ids) for e in batch)
    out = {k: torch.full((len(batch), length), v, dtype=torch.long)
           for k, v in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    out["document_mask"] = torch.zeros((len(batch), length), dtype=torch.bool)
    out["summary_mask"] = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids)
        off = length - n if padding_side == "left" else 0
        out["input_ids"][row, off:off + n] = torch.tensor(enc.input_ids)
        out["attention_mask"][row, off:off + n] = 1
        out["labels"][row, off:off + n] = torch.tensor(enc.labels)
        out["document_mask"][row, off + enc.document_span[0]:off + enc.document_span[1]] = True
        out["summary_mask"][row, off + enc.summary_span[0]:off + enc.summary_span[1]] = True
    return out


# ---------------------------------------------------------------- preview

def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1]}


def preview(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> dict[str, Any]:
    """What the pipeline will eat: counts, fields, lengths, truncation, invalid records."""
    cfg_all = DataConfig(**{**cfg.__dict__, "skip_invalid": True})
    result = load_examples(cfg_all)
    examples = result.examples
    report: dict[str, Any] = {
        **result.source.provenance(), "records": len(examples) + len(result.invalid),
        "valid": len(examples), "invalid": len(result.invalid),
        "invalid_examples": [str(e) for e in result.invalid[:10]],
        "references_per_example": _stats([len(e.references) for e in examples]),
        "document_chars": _stats([len(e.text) for e in examples]),
        "summary_chars": _stats([len(e.summary) for e in examples]),
    }
    if tokenizer is not None:
        encoded = encode_all(tokenizer, examples, cfg)
        report.update({
            "template": cfg.template, "max_tokens": cfg.max_tokens,
            "document_tokens": _stats([e.document_tokens for e in encoded]),
            "summary_tokens": _stats([e.summary_span[1] - e.summary_span[0] for e in encoded]),
            "total_tokens": _stats([len(e.input_ids) for e in encoded]),
            "truncated_documents": sum(e.truncated for e in encoded),
            "truncated_summaries": sum(e.summary_truncated for e in encoded),
        })
    return report
