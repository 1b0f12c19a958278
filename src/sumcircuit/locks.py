"""File locks: ``flock`` that the kernel drops when the holder dies, so no run ever guesses about stale pids."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sumcircuit.artifacts import umask
from sumcircuit.ownership import LOCK_FILE, OutputError


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote into it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def open_lock_file(path: Path) -> int:
    """Open (or create, with the umask's mode: colleagues read shared folders) a lock file."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())


def take_lock(path: Path, option: str, lock_file: Path | None = None) -> int:
    """Take the lock of ``path`` (a folder's, or ``lock_file``) without waiting; a held lock names the holder's pid.

    A lock file can be removed by the run that created it (a refused run leaves
    no trace), so a lock taken on a file that is no longer the one at its path is retried.
    """
    target = lock_file or path / LOCK_FILE
    for _ in range(10):
        try:
            fd = open_lock_file(target)
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
        try:
            same = os.stat(target).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise OutputError(f"{option} {path}: could not take its lock file")


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed), waiting for another holder to finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
