"""Files that are never half-written and can be checked later: atomic writes, content digests, folder locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import BannermatchError

LOCK_FILE = ".lock"


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(fh)`` to a temporary file, sync it, then rename it over ``path``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def file_digest(path: Path, h=None) -> str:
    """sha256 of a file's content (hex); with ``h``, the content is added to that running hash instead."""
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``folder/.lock``: exclusive for a writer's read-modify-write, shared for a reader, so a reader never
    sees half of a writer's change. The OS releases it when the process ends, even by SIGKILL. Never nest two
    locks of one folder in one process (each ``open`` is its own lock: the second would wait for the first)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if not (shared and not os.access(folder, os.W_OK)):  # a read-only store: no writer can change it either
            raise BannermatchError(f"cannot lock {folder} for writing: {exc.strerror}") from None
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)
