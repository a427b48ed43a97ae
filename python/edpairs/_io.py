"""Atomic file writes: the data goes to a temporary file in the destination's folder, is
flushed and fsynced, and replaces the destination in one rename, so a crash leaves either
the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def fsync_dir(path: str) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_atomic(path, write: Callable, *, mode: str = "wb"):
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.
    Returns what ``write`` returned. The temporary file is removed if anything fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return result
