"""The store's write lock: one writing command at a time, named in `<store>.lock` beside the store.

A writer (`kdcache data`, `kdcache precompute`; under torchrun its rank 0 alone) holds an exclusive flock on the
lock file and records its pid, host and command in it, so a second writer is refused with who holds the store.
The kernel drops a flock when its process dies, however it dies: a lock file left by a killed writer is taken
over with a note on stderr, and the temporary files that writer left (`*.<hex>.partial` of kdcache's and
zarr's atomic writes) are removed. A lock recorded by another host is never taken over: its process cannot be
checked from here. Readers take no lock; they refuse incomplete teacher groups (`schema.check_store`).
A remote store (an fsspec URL) is locked by a lease object beside it instead (`kdcache.cache.lease`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdcache.cache.layout import local_path
from kdcache.cache.lease import Lease, read_lease, take_lease
from kdcache.cache.storage import StoreFiles
from kdcache.cache.schema import StoreError
from kdcache.files import remove

DEBRIS = re.compile(r"\.[0-9a-f]{32}\.partial$")  # a temporary file of an atomic write (kdcache.files, zarr)


def lock_path(store: str | os.PathLike) -> Path | None:
    """`<store>.lock` beside a local store; None for other stores."""
    directory = local_path(store)
    return None if directory is None else directory.with_name(directory.name + ".lock")


def describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


class StoreLock:
    """A held write lock (a context manager); `release` removes the lock file."""

    def __init__(self, path: Path | None, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before the flock goes: a waiting writer then finds no record to take over
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_store(store: str | os.PathLike, command: str) -> StoreLock | Lease:
    """Take the write lock of `store` for `command`, or raise a StoreError naming the writer that holds it."""
    path = lock_path(store)
    if path is None:
        files = StoreFiles(store)
        return take_lease(files.fs, f"{files.root}.lock", str(store), command, describe, _alive)
    fd, locked = _open_locked(path, store)
    holder, here = _read(fd), socket.gethostname()
    if locked is False or (holder and (holder.get("host") != here or (locked is None and _alive(holder)))):
        os.close(fd)
        elsewhere = holder and holder.get("host") != here
        fix = (f"it cannot be checked from {here}: if that process is gone, delete {path}" if elsewhere else
               "wait for it to finish")
        who = describe(holder) if holder else "another process"
        raise StoreError(f"{store}: being written by {who}, which holds {path}; {fix}")
    if holder:
        print(f"{path}: taking over the lock of {describe(holder)}, which is no longer running; "
              "removing its temporary files", file=sys.stderr)
        sweep(store)
    record = {"pid": os.getpid(), "host": here, "command": command,
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return StoreLock(path, fd)


def live_writer(store: str | os.PathLike) -> str | None:
    """Who else holds the write lock of a local store now (`describe`d), or None; the lock is not taken."""
    path = lock_path(store)
    if path is None:
        return _lease_holder(store)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: no writer holds the exclusive lock
            held = False
        except OSError as e:
            held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        holder = _read(fd)
    finally:
        os.close(fd)  # drops our shared lock, if we got it
    here = socket.gethostname()
    if holder and holder.get("host") == here and holder.get("pid") == os.getpid():
        return None  # this process's own lock (`kdcache seal` verifies under it)
    return describe(holder or {}) if held or (holder and holder.get("host") != here) else None


def _lease_holder(store: str | os.PathLike) -> str | None:
    """Who holds the unexpired lease of a remote store (cache.lease), other than this process."""
    files = StoreFiles(store)
    holder = read_lease(files.fs, f"{files.root}.lock")
    if not holder or float(holder.get("expires", 0)) < time.time():
        return None
    if holder.get("host") == socket.gethostname() and (holder.get("pid") == os.getpid() or not _alive(holder)):
        return None
    return describe(holder)


def sweep(store: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes in and beside a local store; returns them."""
    directory = local_path(store)
    found = [directory.parent / name for name in _listdir(directory.parent)
             if name.startswith(directory.name + ".") and DEBRIS.search(name)]
    for parent, dirs, files in os.walk(directory):
        found += [Path(parent, name) for name in dirs + files if DEBRIS.search(name)]
        dirs[:] = [name for name in dirs if not DEBRIS.search(name)]
    for path in found:
        remove(path)
    return found


def _open_locked(path: Path, store: str | os.PathLike) -> tuple[int, bool | None]:
    """The lock file opened, and whether we got its flock (see `_flock`); again when its holder removed it
    between our open and our flock (we would hold a file no one else sees)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise StoreError(f"{store}: not found (no directory {path.parent})") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store's lock file ({e.strerror})") from None
        locked = _flock(fd)
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if locked is False or same_file:
            return fd, locked
        os.close(fd)


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return None
        raise


def _read(fd: int) -> dict[str, Any] | None:
    """The holder recorded in the lock file; None when it is empty (a holder that had not written it is no one)."""
    data = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(data) if data.strip() else None
    except ValueError:
        holder = {"command": "an unknown writer", "raw": data[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) or holder is None else {"command": repr(holder)}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded process still runs (without flock, the only evidence left)."""
    try:
        os.kill(int(holder["pid"]), 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
