"""Which entries of an output folder sumcircuit wrote, and which paths a run reads: what it may never touch.

A folder's ``.sumcircuit.json`` lists the entries sumcircuit wrote there; the
``INCOMPLETE.json`` of a run that died lists what was there before it, so that
run's new entries are known too. Folders written before ledgers existed are
recognised by the names sumcircuit writes. Everything else is someone else's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from sumcircuit.errors import SumcircuitError

LOCK_FILE = ".sumcircuit.lock"
INCOMPLETE = "INCOMPLETE.json"
LEDGER = ".sumcircuit.json"
STAGE_RECORD = "stage.json"  # a study writes it into each stage's folder once the stage finished
SHARED_COMMANDS = ("save",)  # ``Result.save`` may write into the folder of the command that made the result

# what sumcircuit's own temporary files look like: mkstemp's ``.NAME.XXXXXXXX.tmp``, folders' ``.NAME.tmpPID``
# and ``.NAME.oldPID``, and the ``.NAME.lock`` of a claimed file
_TEMPORARY = re.compile(r"^\..+\.([A-Za-z0-9_]{8}\.tmp|tmp\d+|old\d+)$")
_INTERNAL = re.compile(r"^\..+\.lock$")
_KNOWN_NAMES: set[str] = {"stage.json", "accumulators.safetensors", "checkpoints"}  # written by earlier versions



class OutputError(SumcircuitError):
    """An output folder that cannot be used: not creatable, not writable, in use, incomplete, or not ours."""


def known_outputnames_in() -> set[str]:
    """Every name a run writes (each output kind's files and run state): how folders of versions without a
    ledger are recognised as sumcircuit's."""
    from sumcircuit.results import RESULT_KINDS

    names = set(_KNOWN_NAMES)
    for _, kind in RESULT_KINDS.items():
        try:
            names.update(kind.result_class().files)
        except Exception:  # a kind whose module cannot be imported here: its marker still counts
            names.add(kind.marker)
    return names


# ---------------------------------------------------------------- which entries are sumcircuit's

def is_temporary(name: str) -> bool:
    """A temporary file or folder of a sumcircuit write (left behind only by a killed run)."""
    return bool(_TEMPORARY.match(name))


def is_internal(name: str) -> bool:
    """sumcircuit's bookkeeping: the lock, ledger and marker files, a study stage's record, claimed files' locks,
    temporaries."""
    return name in (LOCK_FILE, LEDGER, INCOMPLETE, STAGE_RECORD) or bool(_INTERNAL.match(name) or _TEMPORARY.match(name))


def read_json_dict(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing or damaged (bookkeeping is never trusted blindly)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def names_in(value: Any) -> set[str]:
    """The names a bookkeeping list holds (nothing when it is not a list)."""
    return {str(v) for v in value} if isinstance(value, list) else set()


def _marks_ours(folder: Path, depth: int = 2) -> bool:
    """A folder some sumcircuit run claimed (its lock, ledger or a stage record), looked for ``depth`` levels down."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    if any(e.name in (LOCK_FILE, LEDGER, "stage.json") or _INTERNAL.match(e.name) for e in entries):
        return True
    return depth > 1 and any(e.is_dir() and not e.is_symlink() and _marks_ours(e, depth - 1) for e in entries)


def ledger(folder: Path) -> dict[str, Any] | None:
    """What ``.sumcircuit.json`` says about ``folder`` (None when sumcircuit never finished a claim there)."""
    return read_json_dict(folder / LEDGER)


def own_entries(folder: Path, entries: set[str]) -> set[str]:
    """The entries of ``folder`` that sumcircuit wrote."""
    own = {n for n in entries if is_internal(n)}
    own |= {n for n in entries if (folder / f".{n}.lock").is_file()}  # a claimed file (circuit.json)
    record = ledger(folder)
    if record is not None:
        own |= names_in(record.get("written")) & entries
    marker = read_json_dict(folder / INCOMPLETE)
    if marker is not None and "before" in marker:  # a run that died: what it found is all that is not its own
        own |= entries - names_in(marker.get("before"))
    if record is None and (marker is not None or (folder / LOCK_FILE).exists()):
        # a folder of an earlier version (no ledger): its outputs are known by name, or as folders of runs
        known = known_outputnames_in()
        own |= {n for n in entries if n in known
                or ((folder / n).is_dir() and _marks_ours(folder / n))}
    return own


def foreign_entries(folder: str | Path) -> list[str]:
    """Entries of ``folder`` that sumcircuit did not write (sorted; [] for a new or empty folder)."""
    path = Path(folder)
    try:
        entries = {e.name for e in path.iterdir()}
    except OSError:
        return []
    return sorted(entries - own_entries(path, entries))


def listing(names: list[str], limit: int = 3) -> str:
    """A few names for a one-line message: ``a, b, c and 4 more``."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------- inputs that an --out must stay away from

def _paths_in(name: str, value: Any, depth: int = 0) -> Iterator[tuple[str, Path]]:
    """The local paths an argument names: model specs, loaded models (their folders), data and circuit files."""
    if value is None or depth > 3:
        return
    if isinstance(value, (str, Path)):
        text = str(value)
        if text and "\n" not in text and len(text) < 4096:
            path = Path(text).expanduser()
            if path.exists():
                yield name, path.resolve()
        return
    source = getattr(value, "source", None)
    if source is not None and hasattr(value, "folder"):  # a LoadedModel: its spec's location and the folder read
        yield from _paths_in(name, getattr(source, "location", None), depth + 1)
        yield from _paths_in(name, getattr(value, "folder", None), depth + 1)
        return
    spec = getattr(value, "model_spec", None)
    if callable(spec):  # a result that holds a model
        yield from _paths_in(name, spec(), depth + 1)
        return
    if is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):  # a data config's source is its argument; other configs name their own inputs
            yield from _paths_in(name if f.name == "data" else f.name, getattr(value, f.name, None), depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths_in(name, item, depth + 1)


def check_out_against_inputs(out: str | Path, inputs: dict[str, Any], option: str = "out", file: bool = False) -> None:
    """Refuse an output that is, lies inside, or contains one of the inputs: writing would change them.

    An output *file* (``file``) may lie inside an input folder (a circuit.json beside its analysis);
    it must not be one of the inputs.
    """
    target = Path(out).expanduser().resolve()
    for name, path in (p for arg, value in inputs.items() for p in _paths_in(arg, value)):
        if path == target:
            raise OutputError(f"`{option}` {out} is the input `{name}` itself; write the outputs somewhere else")
        if file:
            continue
        if path.is_dir() and target.is_relative_to(path):
            raise OutputError(f"`{option}` {out} lies inside the input `{name}` ({path}); write the outputs "
                              "somewhere else")
        if path.is_relative_to(target):
            raise OutputError(f"`{option}` {out} contains the input `{name}` ({path}); write the outputs "
                              "somewhere else")
