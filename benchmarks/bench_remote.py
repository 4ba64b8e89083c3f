"""Item 6: the reader on a store in S3 (a local moto server in its own process) against the same store on disk.

Tokens/s of `DistillDataset.__getitems__` (what one DataLoader worker runs: 32 random sequences, tokens plus the
tail loss's arrays of two teachers), from local disk and from S3 with a warm shard cache; then the cold phase
(empty shard cache: every shard object fetched once, whole) at several fetch concurrencies, with the server
as it is and with 20 ms added to every request (a WSGI middleware in the server process).

    python benchmarks/bench_remote.py [--profile cpu|seed|quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench_reader import ARRAYS, BATCH, standalone, throughput
from benchlib import SPLIT, Section, Table
from kdcache.cache.manifest import fingerprint_of, is_unsealed, read_manifest, seal_store, store_files
from kdcache.cache.schema import TOKENS, open_store
from kdcache.cache.storage import StoreFiles
from kdcache.student.kd import DistillDataset, KDPlan

LATENCY_S = 0.020
CONCURRENCY = [1, 4, 16, 64]
SERVER = """
import sys, time
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
app, delay = DomainDispatcherApplication(create_backend_app), float(sys.argv[1])
def slow(environ, start_response):
    time.sleep(delay)
    return app(environ, start_response)
server = make_server("127.0.0.1", 0, slow, threaded=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class S3Server:
    """moto's S3 in a process of its own, `delay` seconds added to each request; sets the client environment."""

    def __init__(self, delay: float):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(delay)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        port = int(self.proc.stdout.readline())
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True)
        self.fs.mkdir("bench")

    def upload(self, store: str) -> str:
        self.fs.put(store, "bench/cache.zarr", recursive=True)
        return "s3://bench/cache.zarr"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def dataset(store: str, teachers: list[str]) -> DistillDataset:
    plan = KDPlan({t: 0.25 for t in teachers}, "tail", 0.5, 2.0, {t: 1 for t in teachers})
    return DistillDataset(store, SPLIT, plan, {})


def cold_fetch(url: str, concurrency: int, cache: Path) -> tuple[float, int, int]:
    """(seconds, objects, bytes) to bring every shard of the store into an empty shard cache at `concurrency`."""
    os.environ["KDCACHE_SHARD_CACHE"] = str(cache)
    os.environ["KDCACHE_FETCH_CONCURRENCY"] = str(concurrency)
    files = StoreFiles(url)
    listed = read_manifest(files)
    wanted = {rel: (listed[rel], fingerprint_of(layout)) for rel, layout, _ in store_files(files) if layout is not None}
    start = time.perf_counter()
    files.prefetch(wanted)
    seconds = time.perf_counter() - start
    return seconds, len(wanted), sum(files.cache.path(digest).stat().st_size for digest, _ in wanted.values())


def run(store: str, teachers: list[str], workdir: Path) -> Section:
    if is_unsealed(store):
        seal_store(store)
    n, seq_len = open_store(store)[f"{TOKENS}/{SPLIT}"].shape
    read = lambda ds: (lambda idx: ds.__getitems__(idx.tolist()))  # noqa: E731
    local = throughput(read(dataset(store, teachers)), n, seq_len)
    rows, cold_rows, notes = [["local disk (page cache warm)", local, 1.0]], [], []
    for delay in (0.0, LATENCY_S):
        server = S3Server(delay)
        try:
            url = server.upload(store)
            os.environ["KDCACHE_SHARD_CACHE"] = str(workdir / f"warm-{delay}")
            ds = dataset(url, teachers)
            ds.__getitems__(list(range(n)))  # the first pass fills the shard cache
            rate = throughput(read(ds), n, seq_len)
            rows.append([f"S3, +{delay * 1000:.0f} ms per request, shard cache warm", rate, rate / local])
            for c in CONCURRENCY:
                seconds, objects, size = cold_fetch(url, c, workdir / f"cold-{delay}-{c}")
                cold_rows.append([f"+{delay * 1000:.0f} ms", c, objects, size / objects / 1e6, seconds,
                                  size / seconds / 1e6])
        finally:
            server.stop()
    warm = Table(["reader (DistillDataset.__getitems__, one process)", "tokens/s", "x local"], rows,
                 f"{BATCH} x {seq_len} random batches, 2 teachers ({', '.join(ARRAYS)}), {n} sequences")
    cold = Table(["added latency", "concurrency", "objects", "MB per object", "seconds", "MB/s"], cold_rows,
                 "the cold phase: every shard object of the store fetched once into an empty shard cache")
    section = Section("7. Reader from S3 (local moto server) vs local disk", [warm, cold])
    section.notes.append(
        "Design: whole shard objects fetched once into a local, size-bounded shard cache (by manifest digest), then "
        "read by the same memory-mapped reader as a local store; a batch's missing shards are fetched concurrently. "
        "After the cold phase the rate is the local one. The cold phase: with L the latency per request, b the "
        "bandwidth of one stream, B the node's bandwidth and s the shard object size, fetching with concurrency c "
        "moves min(c * s / (L + s / b), B) bytes/s, so c >= B * (L + s / b) / s keeps the link full; a store of S "
        "bytes is then cold for S / B seconds (once per node; again only if it exceeds KDCACHE_SHARD_CACHE_GB). "
        "Measured here with moto on the same loaded 2-core machine (other jobs running): ratios within this run only.")
    return section


if __name__ == "__main__":
    standalone(run)
