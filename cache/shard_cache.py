"""The local shard cache: whole shard files of remote stores on local disk, by manifest digest, size-bounded.

Training reads random sequences, so every shard of a remote store is needed again each epoch: fetching each
shard file whole (one request) and keeping it on local disk makes every later read a local memory-mapped read,
where fetching byte ranges per batch costs a request per sequence and array, every epoch. A shard is cached under
the digest the store's manifest lists for it (`kdcache.cache.manifest`), only once its bytes match it, and every
cached copy is checked again when a process maps it: a copy of another store, another version of the store, or a
damaged file is never served. Files are written atomically (several DataLoader workers or runs may share the
cache); beyond `max_bytes`, the least recently used are removed (a process that has one mapped keeps reading it).
Set by the environment: KDCACHE_SHARD_CACHE (the directory, default ~/.cache/kdcache/shards; "off": none) and
KDCACHE_SHARD_CACHE_GB (default 50).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdcache.files import atomic_write

DEFAULT_GB = 50.0


class ShardCache:
    """Shard files by digest under `directory`, at most about `max_bytes` in all."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    @classmethod
    def from_env(cls) -> ShardCache | None:
        where = os.environ.get("KDCACHE_SHARD_CACHE", str(Path.home() / ".cache" / "kdcache" / "shards"))
        if where.lower() in ("", "off", "none", "0"):
            return None
        gigabytes = float(os.environ.get("KDCACHE_SHARD_CACHE_GB", DEFAULT_GB))
        return cls(where, int(gigabytes * 2**30))

    def path(self, digest: str) -> Path:
        return self.directory / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def get(self, digest: str) -> Path | None:
        """The cached file, marked as just used; None when absent."""
        path = self.path(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def put(self, digest: str, data: np.ndarray) -> Path:
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data.tobytes())
        self.trim(keep=path)
        return path

    def evict(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def trim(self, keep: Path | None = None) -> None:
        """Remove the least recently used files until the cache holds at most `max_bytes` (never `keep`)."""
        files = []
        for entry in self.directory.glob("*/*"):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            files.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in files)
        for _, size, entry in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size
