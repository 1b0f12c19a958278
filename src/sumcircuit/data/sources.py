"""Where records come from: files (JSONL, CSV, Parquet), ``save_to_disk`` folders, the hub, presets, memory.

:func:`resolve_source` maps what the user typed (a path, a folder plus a
split, ``hf:ID[:CONFIG]``, a preset name, an in-memory dataset) to one
source name; :func:`iter_raw_records` yields its records with the line (or
row) each came from, so every error can name it. Torch-free.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sumcircuit import hub
from sumcircuit.errors import DataError
from sumcircuit.provenance import file_sha256

_SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".csv", ".csv.gz", ".parquet")


@dataclass(frozen=True)
class Preset:
    """A data set on the hub under a short name, with its fields and the split read by default."""

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
            raise DataError(f"{path} is a folder: name the split with `split` "
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
    raise DataError(f"data not found: {data} (a JSONL/CSV file, a folder with `split`, "
                    f"hf:ID[:CONFIG], or one of the presets {', '.join(PRESETS)})")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_IN_MEMORY: dict[str, Any] = {}  # "memory:<fingerprint>" -> datasets.Dataset handed to the API
MAX_RECORD_BYTES = 16 * 2**20  # one record (line) at most: a long book chapter fits, a decompression bomb does not
csv.field_size_limit(MAX_RECORD_BYTES)  # news articles are long; the csv module's default cap is 131,072


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
            for line_no in itertools.count(1):
                raw = fh.readline(MAX_RECORD_BYTES + 1)  # memory stays bounded whatever the file expands to
                if not raw:
                    return
                if len(raw) > MAX_RECORD_BYTES:
                    raise DataError(f"longer than {MAX_RECORD_BYTES // 2**20} MiB, the limit for one record (a file "
                                    "without line breaks, or a decompression bomb?)", file=name, line=line_no)
                yield raw.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else raw  # a byte-order mark (Excel)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read the file ({type(exc).__name__}: {exc}); is it truncated or "
                        "not what its name says?", file=name) from None


class _DuplicateKey(ValueError):
    """A JSON object with a key twice: json keeps the last silently, a record must not."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


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
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            yield line_no, DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", file=name, line=line_no)
            continue
        except _DuplicateKey as exc:
            yield line_no, DataError(f"the key {exc.args[0]!r} appears twice in one record (which one is meant?)",
                                     file=name, line=line_no)
            continue
        except RecursionError:
            yield line_no, DataError("JSON nested too deeply to be a record", file=name, line=line_no)
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
    if not hub.reachable():  # streamed data needs the hub: say so in seconds, not after a minute of retries
        raise DataError(hub.offline_reason(f"data set {name}", "a local data file (JSONL, CSV, Parquet or a "
                                           "`datasets` save_to_disk folder)", cache=False))
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id, config, split=split or "test", streaming=True)
    except Exception as exc:  # network, unknown id, unknown split
        raise DataError(f"could not load {name} split '{split}' from the Hugging Face hub: {exc}") from exc
    for row_no, row in enumerate(dataset, start=1):
        yield row_no, dict(row)


def source_hash(name: str) -> str | None:
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


def content_id(data: str, split: str | None) -> str:
    """What a data spec reads, by contents (``sha256:...`` of its files), so that two spellings of one path agree.

    A hub id has no local contents and stands for itself; a spec that does not
    resolve is returned as given (reading it fails later, with its own error).
    """
    try:
        name, _ = resolve_source(data, split)
    except DataError:
        return data
    if name.startswith("hf:"):
        return name
    try:
        if name.startswith(("disk:", "memory:")):  # a folder's stat does not follow its files
            digest = source_hash(name)
        else:
            stat = Path(name).stat()
            digest = _source_hash_as_of(name, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return data
    return f"sha256:{digest}"


@functools.lru_cache(maxsize=64)
def _source_hash_as_of(name: str, size: int, mtime_ns: int) -> str | None:
    """``source_hash``, once per file version: a study names the same files in many stage keys."""
    return source_hash(name)

