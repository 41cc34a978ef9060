"""Crash-safe file writes shared by checkpoints, conversion, shard indexes and metrics.

A file is complete before anything names it: data is written to a temporary file in the same
folder, fsynced, renamed over the target (atomic on POSIX), and the folder is fsynced so the
rename itself survives a power loss. Readers therefore see the old or the new file, never a
truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make renames / unlinks inside ``path`` durable (a no-op where folders cannot be opened
    or fsynced, e.g. Windows or some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written by another library (e.g. ``safetensors``) to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in place and fsync it: for files inside a folder that is
    itself renamed into place afterwards (so no reader sees the file before it is whole)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temporary file, fsync, rename, folder fsync."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"))
