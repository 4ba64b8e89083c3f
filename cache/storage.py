"""Where a store's files live: a local directory or any fsspec URL (s3://, gs://, memory://), behind the few
operations the manifest, the reader, verify and the lock need, so each of them has one code path for both.

A local shard file is memory-mapped. A remote one is fetched whole (one request) and, when the store's manifest
lists it, kept in the local shard cache (`kdcache.cache.shard_cache`) under its manifest digest once its
fingerprint matches: a batch then reads a cached shard as fast as a local one, and a cached copy can never be
a stale or foreign one. Credentials, endpoints and other options of a remote store come from the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., or fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables), never from a config.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable, Sequence

import fsspec
import numpy as np

from kdcache.cache.layout import local_path
from kdcache.cache.shard_cache import ShardCache
from kdcache.files import atomic_write
from kdcache.progress import with_progress

FETCH_CONCURRENCY = 32  # requests in flight while a batch's missing shards are fetched (KDCACHE_FETCH_CONCURRENCY)
Fingerprint = Callable[[np.ndarray], str]  # a shard's bytes -> its manifest digest


class StoreFiles:
    """The files of one store (or of one array of it, `store` being the array's directory or URL), by path
    relative to it, "/"-separated."""

    def __init__(self, store: str | os.PathLike, cache: ShardCache | None = None):
        self.store = str(store).rstrip("/")
        self.directory = local_path(store)
        self._fs, self.root = (None, None) if self.directory else fsspec.core.url_to_fs(self.store)
        self._pid = os.getpid()
        self.cache = cache if cache is not None or self.directory else ShardCache.from_env()

    @property
    def fs(self) -> fsspec.AbstractFileSystem | None:
        """The remote filesystem of this process: a forked DataLoader worker (or a spawned one, which receives
        none) makes its own, as an async filesystem's event loop cannot cross a fork."""
        if self.directory is None and (self._fs is None or self._pid != os.getpid()):
            self._fs = fsspec.core.url_to_fs(self.store, skip_instance_cache=True)[0]
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}

    @property
    def local(self) -> bool:
        return self.directory is not None

    def under(self, rel: str) -> StoreFiles:
        """The files below `rel` (an array's directory), sharing this store's shard cache."""
        return StoreFiles(self.name(rel), self.cache)

    def name(self, rel: str) -> str:
        """How errors name a file: its local path, or its URL."""
        return str(self.directory / rel) if self.local else f"{self.store}/{rel}"

    def _url(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes | None:
        """A file's bytes; None when it does not exist."""
        return self.read_many([rel])[rel]

    def read_many(self, rels: Sequence[str]) -> dict[str, bytes | None]:
        """Several files (concurrently on a remote store); None for each that does not exist."""
        if self.local:
            return {rel: _read_local(self.directory / rel) for rel in rels}
        found = self.fs.cat([self._url(rel) for rel in rels], on_error="omit") if rels else {}
        return {rel: found.get(self._url(rel)) for rel in rels}

    def exists(self, rel: str) -> bool:
        return (self.directory / rel).is_file() if self.local else self._fresh().isfile(self._url(rel))

    def _fresh(self):
        """The remote filesystem without its cached listings: other processes (or zarr) change the store."""
        self.fs.invalidate_cache()  # all of it: a listing below the root may be cached too
        return self.fs

    def has_folder(self, rel: str) -> bool:
        """Whether anything lies below `rel` (a directory, or an object key prefix)."""
        return (self.directory / rel).is_dir() if self.local else self._fresh().isdir(self._url(rel))

    def files(self) -> dict[str, int]:
        """Every file below the store: relative path -> size in bytes."""
        if self.local:
            return {path.relative_to(self.directory).as_posix(): path.stat().st_size
                    for path in _walk(self.directory)}
        if not self._fresh().isdir(self.root):
            return {}
        found = self.fs.find(self.root, detail=True)
        prefix = f"{self.root}/"
        return {name[len(prefix):]: info["size"] for name, info in found.items()
                if name.startswith(prefix) and info["type"] == "file"}

    def write(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: a local rename, or one object PUT (an object is visible whole or not
        at all)."""
        if self.local:
            atomic_write(self.directory / rel, data)
        else:
            self.fs.pipe_file(self._url(rel), data)

    def remove(self, rel: str) -> None:
        if self.local:
            (self.directory / rel).unlink(missing_ok=True)
        elif self._fresh().isfile(self._url(rel)):
            self.fs.rm_file(self._url(rel))

    def publish(self, source: Path, manifest: str) -> None:
        """Replace this remote store by the local store `source`: the old manifest goes first (the store reads as
        unsealed from then on), then every old object, then each file as one object, `manifest` last of all."""
        self.remove(manifest)
        old = [self._url(rel) for rel in self.files()]
        if old:
            self.fs.rm(old)
        files = sorted(path.relative_to(source).as_posix() for path in _walk(source))
        order = [rel for rel in files if rel != manifest] + [manifest]
        for rel in with_progress(order, len(order), desc=f"upload {self.store}", unit="object"):
            self.fs.put_file(str(source / rel), self._url(rel))

    def shard(self, rel: str, digest: str | None = None, fingerprint: Fingerprint | None = None,
              fetch: bool = False) -> np.ndarray:
        """A shard file's bytes (uint8): memory-mapped, locally or from the shard cache. `digest` is what the
        manifest lists for it and `fingerprint` computes that from the bytes: a remote shard so listed is served
        from the cache when a copy there matches (unless `fetch`: what the store holds now), and cached once
        fetched when it matches. FileNotFoundError when there is no such file; ValueError when it is empty."""
        if self.local:
            return _map(self.directory / rel)
        cacheable = self.cache is not None and digest is not None and fingerprint is not None
        if cacheable and not fetch and (cached := self.cache.get(digest)) is not None:
            data = _map(cached)
            if fingerprint(data) == digest:
                return data
            self.cache.evict(digest)  # damaged on the local disk: fetched again below
        data = np.frombuffer(self.fs.cat_file(self._url(rel)), dtype=np.uint8)
        if data.size == 0:
            raise ValueError(f"{self.name(rel)}: empty")
        if cacheable and fingerprint(data) == digest:
            return _map(self.cache.put(digest, data))
        return data

    def prefetch(self, wanted: dict[str, tuple[str, Fingerprint]]) -> None:
        """Fetch the shards `wanted` (relative path -> (manifest digest, fingerprint)) that the shard cache lacks,
        concurrently, and cache each whose fingerprint matches its digest (`shard` then maps it)."""
        if self.local or self.cache is None:
            return
        missing = {rel: check for rel, check in wanted.items() if not self.cache.has(check[0])}
        if not missing:
            return
        urls = [self._url(rel) for rel in missing]
        width = {"batch_size": int(os.environ.get("KDCACHE_FETCH_CONCURRENCY", FETCH_CONCURRENCY))}
        fetched = self.fs.cat(urls, on_error="omit", **(width if self.fs.async_impl else {}))
        for rel, (digest, fingerprint) in missing.items():
            data = fetched.get(self._url(rel))
            if isinstance(data, bytes) and fingerprint(array := np.frombuffer(data, dtype=np.uint8)) == digest:
                self.cache.put(digest, array)


def _read_local(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _walk(directory: Path):
    for parent, _, names in os.walk(directory):
        for name in names:
            if (path := Path(parent, name)).is_file():
                yield path


def _map(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
