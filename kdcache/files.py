"""Atomic, durable file and directory writes: a reader sees the old version or the new one, never half of either.

The staged data is flushed to the disk before its rename and the rename after it, so that after a power cut a
name never points at data that did not reach the disk (a shard before the record marking it complete, say).
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `final` (file or directory) that replaces `final` only if the block succeeds;
    otherwise it is removed. The name is unique, so threads may stage beside one another."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}.partial")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        flush_tree(tmp)
        if final.is_dir():
            shutil.rmtree(final)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        remove(tmp)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(path: Path) -> None:
    """fsync a staged file, or every file and directory of a staged tree (directories after their entries)."""
    if path.is_dir():
        for entry in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            fsync_path(entry)
    if path.exists():
        fsync_path(path)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` through a temporary file and a rename."""
    with staged(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
