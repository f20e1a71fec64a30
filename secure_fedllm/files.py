"""Crash-safe file writes: the ledger and the checkpoints must never be left half-written."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content.

    The bytes go to a temporary file beside `path`, are fsynced, and the file is renamed over it.
    `mode` (e.g. 0o600 for a site's secrets) is set when the temporary file is created, so the
    content is never readable under a wider mode, not even for an instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself must survive a crash (the ledger and the release bindings rely on it)
        os.fsync(directory)
    finally:
        os.close(directory)
