"""Output folders: checked before any work, one run at a time, whole or visibly incomplete, and only ever ours.

Every command that writes a folder holds it through :func:`claim_output`:

- the folder is checked *before* computing: not a file, writable, not the same
  as, inside, or around one of the run's inputs (a model, an adapter, data),
  and holding nothing sumcircuit did not write. A refused run leaves no trace:
  a folder it created is removed again, an existing one is not touched;
- an exclusive ``flock`` on ``.sumcircuit.lock`` keeps a second run out
  ("in use by pid N"). The kernel drops the lock when its process dies, so
  the lock of a killed run is taken over by the next run without any guess
  about stale pids;
- ``INCOMPLETE.json`` appears with the run's first write (a run refused while
  loading its inputs never writes it) and is removed only when the run
  finished, so an interrupted or killed run leaves a folder that every reader
  (:func:`require_complete`) refuses instead of mixing old and new files;
- ``.sumcircuit.json`` lists the entries sumcircuit wrote in the folder (the
  marker lists the ones that were there before, so a killed run's new entries
  are known too). Only those are ever replaced or removed; a folder holding
  anything else is refused, and temporary files of a killed run are removed
  by the next one.

Claims are re-entrant within a process (a command's ``save`` inside its own
run), and only rank 0 of a multi-process run holds them.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sumcircuit.artifacts import atomic_write_json, on_write
from sumcircuit.locks import take_lock, waiting_lock
from sumcircuit.ownership import (
    INCOMPLETE,
    LEDGER,
    LOCK_FILE,
    SHARED_COMMANDS,
    OutputError,
    check_out_against_inputs,
    foreign_entries,
    is_internal,
    is_temporary,
    ledger,
    listing,
    names_in,
    own_entries,
    read_json_dict,
)

P = ParamSpec("P")
R = TypeVar("R")
__all__ = ["INCOMPLETE", "LEDGER", "LOCK_FILE", "OutputError", "check_out_against_inputs", "claim_file",
           "claim_output", "foreign_entries", "incomplete_reason", "is_complete", "remove_outputs",
           "require_complete", "waiting_lock", "writes_file", "writes_output"]


# ---------------------------------------------------------------- claims

@dataclass
class _Claim:
    """One folder this process holds: what was there before, and whether the run has written anything yet."""

    folder: Path
    command: str
    before: list[str]
    created: list[Path] = field(default_factory=list)  # folders the claim made, deepest last
    fd: int | None = None
    lock_created: bool = False
    lock_before: bytes = b""  # what an existing lock file said (the last holder's pid), restored by a refused run
    written: bool = False

    def mark(self) -> None:
        """The run's first write: from now on the folder is visibly incomplete until the run finishes."""
        if self.written:
            return
        self.written = True
        atomic_write_json(self.folder / INCOMPLETE, {
            "command": self.command, "pid": os.getpid(), "started": time.time(), "before": self.before,
            "meaning": "this run has not finished: its files may be partial or mixed; rerun the command to "
                       "resume or restart it"})


_claims: dict[Path, _Claim] = {}  # resolved folder -> this process's claim of it
_file_claims: set[Path] = set()  # output files this process holds


def _note_write(path: Path) -> None:
    """Artifacts report every write here: the claims above it mark their folders incomplete."""
    if not _claims:
        return
    if path.name in (INCOMPLETE, LEDGER, LOCK_FILE):
        return
    where = path.resolve()
    for key, claim in list(_claims.items()):
        if claim.fd is not None and where.is_relative_to(key):
            claim.mark()


on_write(_note_write)


def check_output_dir(out: str | Path, option: str = "--out") -> Path:
    """Check ``out`` without creating it: not a file, and its nearest existing ancestor writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a folder")
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise OutputError(f"{option} {path}: cannot create it: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: not writable" if existing == path
                          else f"{option} {path}: cannot create it: {existing} is not writable")
    return path


def _make_dirs(path: Path, option: str) -> list[Path]:
    """Create ``path`` and missing parents; returns the folders created (outermost first)."""
    missing = [p for p in (*reversed(path.absolute().parents), path.absolute()) if not p.exists()]
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{option} {path}: cannot create it: {exc.strerror or exc}") from None
        _note_write(folder)
    return missing


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_command(folder: Path, command: str, option: str) -> None:
    """One run per folder: a folder that holds another command's outputs is refused."""
    record = ledger(folder) or {}
    previous = record.get("command")
    if previous and previous != command and command not in SHARED_COMMANDS and previous not in SHARED_COMMANDS:
        written = sorted(names_in(record.get("written")))
        raise OutputError(f"{option} {folder} holds the outputs of `sumcircuit {previous}` ({listing(written)}); "
                          f"choose another folder for `sumcircuit {command}`")


def _check_ours(folder: Path, option: str) -> None:
    foreign = foreign_entries(folder)
    if foreign:
        raise OutputError(f"{option} {folder} holds files sumcircuit did not write ({listing(foreign)}); choose "
                          "a new or empty folder, or move them away: sumcircuit never replaces or deletes them")


def _remove_stale(folder: Path) -> None:
    """Temporary files and folders of a killed run (never anything that is not sumcircuit's)."""
    for entry in folder.iterdir():
        if is_temporary(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _write_ledger(claim: _Claim) -> None:
    folder = claim.folder
    entries = {e.name for e in folder.iterdir()}
    own = own_entries(folder, entries) | (entries - set(claim.before))
    written = sorted(n for n in own if not is_internal(n))
    atomic_write_json(folder / LEDGER, {"command": (ledger(folder) or {}).get("command") or claim.command,
                                        "written": written})


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()[:4096]
    except OSError:
        return b""


def _undo(claim: _Claim) -> None:
    """A run that wrote nothing leaves nothing: its lock file and the folders it created go."""
    if claim.lock_created:
        (claim.folder / LOCK_FILE).unlink(missing_ok=True)
    elif claim.fd is not None:  # the lock file was there: its words too
        os.ftruncate(claim.fd, 0)
        os.pwrite(claim.fd, claim.lock_before, 0)
    for folder in reversed(claim.created):
        try:
            folder.rmdir()  # only if empty: something another process put there stays
        except OSError:
            break


@contextmanager
def claim_output(out: str | Path, command: str, option: str = "--out",
                 inputs: dict[str, Any] | None = None) -> Iterator[Path]:
    """Hold ``out`` for one run of ``command``: checked, locked, marked incomplete from its first write until it finishes."""
    path = check_output_dir(out, option)
    key = path.resolve()
    if key in _claims or not _is_rank0():  # nested claims and other ranks ride on the owner's
        yield path
        return
    if inputs:
        check_out_against_inputs(path, inputs, option.lstrip("-").replace("-", "_"))
    if path.exists():
        _check_ours(path, option)
        _check_command(path, command, option)
    created = _make_dirs(path, option)
    lock_created = not (path / LOCK_FILE).exists()
    claim = _Claim(key, command, before=[], created=created, lock_created=lock_created,
                   lock_before=b"" if lock_created else _read_bytes(path / LOCK_FILE))
    try:
        claim.fd = take_lock(path, option)
    except BaseException:
        _undo(claim)
        raise
    claim.before = sorted(e.name for e in path.iterdir() if not is_internal(e.name))
    record = read_json_dict(path / INCOMPLETE)
    if record is not None:  # a killed run: its marker stays until this one finishes; its new entries are ours
        claim.written = True
        claim.before = sorted(set(claim.before) & names_in(record.get("before"))) if "before" in record else []
    _remove_stale(path)
    _claims[key] = claim
    ok = False
    try:
        yield path
        ok = True
    finally:
        del _claims[key]
        try:
            if claim.written:
                _write_ledger(claim)
                if ok:
                    (path / INCOMPLETE).unlink(missing_ok=True)
            else:
                _undo(claim)
        finally:
            os.close(claim.fd)  # releases the lock


@contextmanager
def claim_file(out: str | Path, option: str = "--out", inputs: dict[str, Any] | None = None,
               names: tuple[str, ...] = ()) -> Iterator[Path]:
    """Hold one output *file* (a circuit.json) for one run: its folder checked first, the file locked meanwhile.

    The file itself is written atomically, so it is whole or absent; the lock
    (``.NAME.lock`` beside it, which also marks the file as sumcircuit's) makes a
    second run into the same file an error naming the first one's pid. A file
    of the same name that sumcircuit did not write is refused, never replaced, and
    so is one that another command wrote (an analysis's ``heads.csv``) unless it has
    one of the ``names`` this kind of file has (a report.html of an earlier version).
    """
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder, expected a file")
    lock_file = path.with_name(f".{path.name}.lock")
    if inputs:
        check_out_against_inputs(path, inputs, option.lstrip("-"), file=True)
    if (path.exists() or path.is_symlink()) and path.name not in own_entries(path.parent, {path.name}):
        raise OutputError(f"{option} {path}: exists and sumcircuit did not write it; choose another file name")
    if path.exists() and not lock_file.is_file() and path.name not in names:  # e.g. heads.csv of an analysis
        raise OutputError(f"{option} {path}: is an output of another sumcircuit command; choose another file name")
    check_output_dir(path.parent, option)
    key = path.resolve()
    if key in _file_claims:
        yield path
        return
    created = _make_dirs(path.parent, option)
    lock_created = not lock_file.exists()
    fd = take_lock(path, option, lock_file)
    _file_claims.add(key)
    try:
        yield path
    finally:
        _file_claims.discard(key)
        if not path.exists() and lock_created:  # nothing written: no trace
            lock_file.unlink(missing_ok=True)
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break
        os.close(fd)


def _inputs_of(bound: inspect.BoundArguments, param: str) -> dict[str, Any]:
    """The arguments that can name input files: everything but the output, the runtime and flags."""
    return {name: value for name, value in bound.arguments.items()
            if name not in (param, "self", "runtime", "rt", "resume")}


def writes_file(param: str, target: Callable[[Any], Path], names: tuple[str, ...] = ()
                ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function whose ``param`` names an output file (``target`` maps the argument to it)."""
    return _claiming(param, lambda out, inputs: claim_file(target(out), inputs=inputs, names=names))


def _claiming(param: str, claim: Callable[[Any, dict[str, Any]], AbstractContextManager[Path]]
              ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function inside ``claim(value of param, the other arguments)`` when that argument is given."""
    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            out = bound.arguments.get(param)
            if out is None:
                return fn(*args, **kwargs)
            with claim(out, _inputs_of(bound, param)):
                return fn(*args, **kwargs)
        return inner
    return wrap


def incomplete_reason(folder: str | Path) -> str | None:
    """Why ``folder`` is not a finished output, or None when it is (no marker)."""
    marker = Path(folder) / INCOMPLETE
    if not marker.is_file():
        return None
    info = read_json_dict(marker) or {}
    what = f"`sumcircuit {info.get('command')}` (pid {info.get('pid')})" if info.get("command") else "a sumcircuit run"
    return f"{folder} is incomplete: {what} did not finish writing it; rerun that command to resume or restart it"


def writes_output(command: str, param: str = "out") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function whose ``param`` names its output folder: it runs inside :func:`claim_output`.

    The function's other arguments are its inputs: an output folder equal to,
    inside or around one of them is refused before the folder is touched.
    """
    return _claiming(param, lambda out, inputs: claim_output(out, command, inputs=inputs))


def require_complete(folder: str | Path) -> Path:
    """Refuse a folder whose run did not finish (readers call this before trusting any file).

    A folder this process is writing (e.g. a study building its own report) is not refused.
    """
    if not is_complete(folder):
        raise OutputError(str(incomplete_reason(folder)))
    return Path(folder)


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder``'s files can be trusted: its run finished, or this process is the one writing it."""
    return Path(folder).resolve() in _claims or incomplete_reason(folder) is None


def remove_outputs(out: str | Path, names: Iterable[str]) -> list[str]:
    """Start over in ``out``: remove the files (or folders) ``names`` that a run of sumcircuit wrote there.

    Only the named outputs go, and only those sumcircuit wrote (see
    :func:`foreign_entries`), with their stale temporary files: anything else in
    the folder is never touched. Returns the names removed.
    """
    folder = Path(out)
    try:
        entries = {e.name for e in folder.iterdir()}
    except OSError:
        return []
    own = own_entries(folder, entries)
    removed = []
    for name in names:
        entry = folder / name
        if name not in own:
            continue
        _note_write(entry)  # removing is a change: the folder is incomplete from here on
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    return removed
