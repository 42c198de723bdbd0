"""Writing a file so that a reader never sees a part of it."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path, write) -> None:
    """``write(tmp)`` writes a temporary file beside ``path``; it is flushed to disk and renamed over
    ``path``, so a reader (or a run interrupted at any moment) sees the old file or the whole new
    one, never a part. The temporary file is removed if anything fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
