"""Atomic, crash-safe writes of every file a run produces.

Writing to a temporary file in the same folder and renaming it means an
interrupted run leaves either the old file or the new one, never half of one,
so resumable stages can trust whatever exists on disk.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

_listeners: list[Callable[[Path], None]] = []


def on_write(listener: Callable[[Path], None]) -> None:
    """Call ``listener(path)`` before every write below (output folders learn that their run started writing)."""
    _listeners.append(listener)


def notify_write(path: str | Path) -> None:
    """Tell the listeners that ``path`` is about to be written (writers outside this module call it too)."""
    for listener in _listeners:
        listener(Path(path))


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    current = os.umask(0)
    os.umask(current)
    return current


def _public(fd_or_path: int | str) -> None:
    """Give a temporary file the mode a plain ``open`` would (0644 under umask 022), not mkstemp's 0600.

    Results are read by colleagues on shared servers; mkstemp's private mode would hide them.
    """
    mode = 0o666 & ~umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def make_public(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` the umask's mode (a library wrote some of them 0600)."""
    for path in (Path(folder), *Path(folder).rglob("*")):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def _atomic_replace(path: Path, write: Any, mode: str) -> None:
    notify_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    _public(fd)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text so that readers see the old file or the new one, never half of one."""
    _atomic_replace(Path(path), lambda fh: fh.write(text), "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically (PNGs)."""
    _atomic_replace(Path(path), lambda fh: fh.write(data), "wb")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    """JSON as every output writes it: indented, tensors and paths as plain values, NaN kept."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, to_json(obj))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; one nested past Python's recursion limit is a ValueError naming it, like other bad JSON."""
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to be read") from None


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`atomic_write_csv`; [] when the file does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by :func:`append_jsonl`; [] when the file does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]],
                     columns: Sequence[str]) -> None:
    """Write rows as CSV atomically, columns in the given order (floats to 8 significant digits)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors with safetensors, atomically. Metadata values must be strings."""
    path = Path(path)
    notify_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            save_file(clean, tmp, metadata=dict(metadata) if metadata else None)
        except SafetensorError as exc:  # safetensors' own type for a full disk or an I/O error
            full = any(s in str(exc) for s in ("StorageFull", "No space", "os error 28"))
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "no space left on the device" if full else f"cannot write it ({exc})", str(path)) from None
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json_line(record: Mapping[str, Any]) -> str:
    """One JSONL line, as :func:`append_jsonl` writes it."""
    return json.dumps(record, default=_json_default) + "\n"


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it: logs survive a kill -9 up to the last line."""
    path = Path(path)
    notify_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(to_json_line(record))
        fh.flush()
        os.fsync(fh.fileno())
