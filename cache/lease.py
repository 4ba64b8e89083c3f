"""The write lock of a remote store: a lease object `<store>.lock` beside it, created only if absent, with an expiry.

An object store has no flock, but S3 (since 2024), GCS and recent MinIO and Ceph create an object only if no
object has its key (S3: `If-None-Match: *`; fsspec: `pipe_file(..., mode="create")`): of two writers creating the
lease at once, one gets FileExistsError. The lease records the holder (pid, host, command) and an expiry that a
thread of the holder pushes forward every third of `KDCACHE_LEASE_SECONDS` (default 300), so a writer killed
without a word holds the store only until its lease expires; one on this host whose process is gone is taken over
at once. A store that ignores the condition (an old S3-compatible server) lets a second create overwrite: each
writer reads the lease back after writing it and refuses to go on when it is not its own, which narrows the race
to the time between two writes but cannot close it (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from kdcache.cache.schema import StoreError

DEFAULT_SECONDS = 300.0


def lease_seconds() -> float:
    return float(os.environ.get("KDCACHE_LEASE_SECONDS", DEFAULT_SECONDS))


class Lease:
    """A held lease on a remote store (a context manager, like a local StoreLock); `release` deletes it."""

    def __init__(self, fs: Any, url: str, record: dict[str, Any]):
        self.fs, self.url, self.record = fs, url, record
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(lease_seconds() / 3):
            self.record["expires"] = time.time() + lease_seconds()
            self.fs.pipe_file(self.url, json.dumps(self.record).encode())

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._renewer.join()
        if read_lease(self.fs, self.url) == self.record:  # never delete a lease another writer took over
            self.fs.rm_file(self.url)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_lease(fs: Any, url: str, store: str, command: str, describe: Callable[[dict], str],
               alive: Callable[[dict], bool]) -> Lease:
    """Create the lease object `url` for `command`, or raise a StoreError naming the writer that holds it."""
    here = socket.gethostname()
    record = {"pid": os.getpid(), "host": here, "command": command,
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):  # a lease that expired or whose process is gone is deleted, then created again
        record["expires"] = time.time() + lease_seconds()
        try:
            fs.pipe_file(url, json.dumps(record).encode(), mode="create")
        except FileExistsError:
            holder = read_lease(fs, url)
            if holder is None:
                continue  # released meanwhile
            gone = holder.get("host") == here and not alive(holder)
            if not gone and float(holder.get("expires", 0)) > time.time():
                until = datetime.fromtimestamp(float(holder["expires"]), timezone.utc).isoformat(timespec="seconds")
                raise StoreError(f"{store}: being written by {describe(holder)}, which holds the lease {url} until "
                                 f"{until} (renewed while it runs); wait for it to finish, or for the lease to expire")
            fs.rm_file(url)
            continue
        if read_lease(fs, url) != record:  # a store without conditional create let another writer overwrite it
            raise StoreError(f"{store}: another writer took the lease {url} at the same moment; try again")
        return Lease(fs, url, record)
    raise StoreError(f"{store}: could not take the lease {url} (it keeps changing hands); try again")


def read_lease(fs: Any, url: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(fs.cat_file(url))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"command": "an unknown writer"}
    return holder if isinstance(holder, dict) else {"command": repr(holder)}
