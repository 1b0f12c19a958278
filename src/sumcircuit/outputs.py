"""Output folders: checked before any work, one run at a time, whole or visibly incomplete.

Every command that writes a folder holds it through :func:`claim_output`:

- the folder is created (or found) and checked writable *before* computing,
  so a bad ``--out`` costs nothing;
- an exclusive ``flock`` on ``.sumcircuit.lock`` keeps a second run out
  ("in use by pid N"). The kernel drops the lock when its process dies, so
  the lock of a killed run is taken over by the next run without any guess
  about stale pids;
- ``INCOMPLETE.json`` exists while the run writes and is removed only when
  it finished, so an interrupted or killed run leaves a folder that every
  reader (:func:`require_complete`) refuses instead of mixing old and new files.

Claims are re-entrant within a process (a command's ``save`` inside its own
run), and only rank 0 of a multi-process run holds them.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sumcircuit.artifacts import atomic_write_json, umask
from sumcircuit.errors import SumcircuitError

LOCK_FILE = ".sumcircuit.lock"
INCOMPLETE = "INCOMPLETE.json"

_held: dict[Path, int] = {}  # resolved folder -> claim depth in this process
P = ParamSpec("P")
R = TypeVar("R")


class OutputError(SumcircuitError):
    """An output folder that cannot be used: not creatable, not writable, in use, or incomplete."""


def check_output_dir(out: str | Path, option: str = "--out") -> Path:
    """Create ``out`` if needed and check that files can be written there; one-line errors otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: not writable")
    return path


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())


def _lock(path: Path, option: str, lock_file: Path | None = None) -> int:
    """Take the lock of ``path`` (a folder's, or ``lock_file``) without waiting; a held lock names the holder's pid."""
    try:
        fd = _open_lock_file(lock_file or path / LOCK_FILE)
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot create its lock file: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise OutputError(f"{option} {path} is in use by another sumcircuit run (pid {holder}); "
                          "wait for it to finish or choose another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def claim_output(out: str | Path, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold ``out`` for one run of ``command``: checked, locked, marked incomplete until it finishes."""
    path = check_output_dir(out, option)
    key = path.resolve()
    owner = key not in _held and _is_rank0()  # nested claims and other ranks ride on the owner's
    fd = _lock(path, option) if owner else None
    marker = path / INCOMPLETE
    try:
        if owner:
            atomic_write_json(marker, {"command": command, "pid": os.getpid(), "started": time.time(),
                                       "meaning": "this run has not finished: its files may be partial or "
                                                  "mixed; rerun the command to resume or restart it"})
        with _holding(key):
            yield path
        if owner:
            marker.unlink(missing_ok=True)  # reached only when the run finished without an exception
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextmanager
def claim_file(out: str | Path, option: str = "--out") -> Iterator[Path]:
    """Hold one output *file* (a circuit.json) for one run: its folder checked first, the file locked meanwhile.

    The file itself is written atomically, so it is whole or absent; the lock
    (``.NAME.lock`` beside it) makes a second run into the same file an error
    naming the first one's pid, as for folders.
    """
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder, expected a file")
    check_output_dir(path.parent, option)
    key = path.resolve()
    fd = _lock(path, option, path.with_name(f".{path.name}.lock")) if key not in _held else None
    try:
        with _holding(key):
            yield path
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def _holding(key: Path) -> Iterator[None]:
    """Count this process's claims of ``key``: nested claims ride on the outermost one's lock."""
    _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]


def writes_file(param: str, target: Callable[[Any], Path]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function whose ``param`` names an output file (``target`` maps the argument to it)."""
    return _claiming(param, lambda out: claim_file(target(out)))


def _claiming(param: str, claim: Callable[[Any], AbstractContextManager[Path]]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function inside ``claim(value of param)`` when that argument is given."""
    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            out = signature.bind(*args, **kwargs).arguments.get(param)
            if out is None:
                return fn(*args, **kwargs)
            with claim(out):
                return fn(*args, **kwargs)
        return inner
    return wrap


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed), waiting for another holder to finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def incomplete_reason(folder: str | Path) -> str | None:
    """Why ``folder`` is not a finished output, or None when it is (no marker)."""
    marker = Path(folder) / INCOMPLETE
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        what = f"`sumcircuit {info.get('command')}` (pid {info.get('pid')})"
    except (OSError, ValueError, AttributeError):
        what = "a sumcircuit run"
    return f"{folder} is incomplete: {what} did not finish writing it; rerun that command to resume or restart it"


def writes_output(command: str, param: str = "out") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function whose ``param`` names its output folder: it runs inside :func:`claim_output`."""
    return _claiming(param, lambda out: claim_output(out, command))


def require_complete(folder: str | Path) -> Path:
    """Refuse a folder whose run did not finish (readers call this before trusting any file).

    A folder this process is writing (e.g. a study building its own report) is not refused.
    """
    if not is_complete(folder):
        raise OutputError(str(incomplete_reason(folder)))
    return Path(folder)


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder``'s files can be trusted: its run finished, or this process is the one writing it."""
    return Path(folder).resolve() in _held or incomplete_reason(folder) is None


def remove_outputs(out: str | Path, names: Iterable[str]) -> list[str]:
    """Start over in ``out``: remove the files (or folders) ``names`` that a run of sumcircuit writes there.

    Only the named outputs go, with their stale temporary files (``.NAME.*.tmp``):
    anything else in the folder -- a user's notes, other runs' files -- is never
    touched. Returns the names removed.
    """
    folder = Path(out)
    removed = []
    for name in names:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            removed.append(name)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
            removed.append(name)
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    return removed
