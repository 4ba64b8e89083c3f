"""Pipelined shard writing: device -> host buffers -> compression and store writes, off the forward's path.

The teacher forward runs on the caller's thread. Each batch's targets are copied into host buffers that hold
one whole shard (pinned, on a side CUDA stream, so the copy overlaps the next forward); a finished shard goes
to a background thread that writes every array's shard slice in one assignment, then marks the shard
complete. Whole shards are what make this safe: zarr rewrites the whole shard on a partial write, so two
writers of one shard lose chunks (zarr-python #3682), while whole-shard writes from separate processes never
touch the same object, and a shard is only marked complete once all of its arrays are in the store.

zarr-python spends ~0.1-0.3 ms of GIL-holding Python per inner chunk, so one writer thread writes 150-400k
positions/s (measured; k=64, L=128): far below a small teacher on a GPU. Given a pool of `processes` spawned
writer processes, that many background threads each hand their shard to a process, and shards are written
in parallel.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch
import zarr

from cache.schema import ArraySpec, mark_shard_complete, open_store

Layout = dict[str, dict[str, ArraySpec]]  # teacher group -> array name -> spec
Buffers = dict[str, dict[str, torch.Tensor]]  # teacher group -> array name -> [per_shard, L, ...] host tensor
ShardArrays = dict[str, dict[str, np.ndarray]]  # split group path -> array name -> [n, L, ...]


def start_writer_processes(count: int) -> ProcessPoolExecutor | None:
    """`count` spawned writer processes (spawn: the parent may hold CUDA), started now so that their imports
    overlap the teacher loading. Like any spawn pool, a calling script needs an `if __name__ == "__main__":` guard."""
    if count == 0:
        return None
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
    for _ in range(count):  # workers start on demand: one no-op task each
        pool.submit(int)
    return pool


def write_shard(store: str, shard: int, rows: range, arrays: ShardArrays) -> None:
    """Write one whole shard of every array of each split group, then mark the shard complete there."""
    root = open_store(store, mode="r+")
    # One codec batch for the whole shard: per-chunk batches double zarr's Python overhead.
    with zarr.config.set({"codec_pipeline.batch_size": len(rows)}):
        for path, named in arrays.items():
            group = root[path]
            for name, data in named.items():
                group[name][rows.start:rows.stop] = data
            mark_shard_complete(group, shard)


class ShardWriter:
    """Stages per-batch targets into whole-shard host buffers and writes finished shards in the background.

    At most `depth` shards wait for (or are in) the writers; `depth + 1` buffer sets rotate, so the set handed
    out by `buffers()` is never one a writer is still reading.
    """

    def __init__(self, store: str, layout: Layout, per_shard: int, seq_len: int, device: torch.device,
                 processes: int = 0, pool: Executor | None = None):
        """`pool`: the caller's `start_writer_processes(processes)`, or None to write on one thread here."""
        self._store = store
        self._depth = processes + 1 if processes else 2  # every writer busy, one shard queued
        pin = device.type == "cuda"  # pinned memory makes the device-to-host copies truly asynchronous
        self._sets: list[Buffers] = [
            {
                group: {
                    name: torch.empty((per_shard, seq_len, *spec.trailing), dtype=getattr(torch, spec.dtype),
                                      pin_memory=pin)
                    for name, spec in arrays.items()
                }
                for group, arrays in layout.items()
            }
            for _ in range(self._depth + 1)
        ]
        self._next = 0
        self._stream = torch.cuda.Stream(device) if pin else None
        self._threads = ThreadPoolExecutor(max(processes, 1), thread_name_prefix="kdcache-writer")
        self._processes = pool
        self._pending: deque[Future] = deque()
        self._failed = False
        self.waited_s = 0.0  # time the caller spent blocked on the writers

    def buffers(self) -> Buffers:
        """Host buffers for the next shard."""
        buffers = self._sets[self._next]
        self._next = (self._next + 1) % len(self._sets)
        return buffers

    def stage(self, buffers: Buffers, targets: dict[str, dict[str, torch.Tensor]], rows: slice) -> None:
        """Copy one batch's targets (any device, converted to the stored dtypes) into `rows` of the shard buffers."""
        if self._stream is None:
            for group, arrays in targets.items():
                for name, tensor in arrays.items():
                    buffers[group][name][rows].copy_(tensor)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            for group, arrays in targets.items():
                for name, tensor in arrays.items():
                    dst = buffers[group][name][rows]
                    # Convert on the device, so the transfer itself is a plain async copy.
                    dst.copy_(tensor.to(dst.dtype), non_blocking=True)
                    tensor.record_stream(self._stream)  # keep the allocator off it until the copy is done

    def submit(self, buffers: Buffers, groups: dict[str, str], shard: int, rows: range) -> None:
        """Queue the shard for writing into split groups (teacher group -> group path); blocks while `depth`
        shards are queued. A failed earlier write is raised here, so the caller stops computing shards."""
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(self._stream)
        arrays = {path: {name: buffer[:len(rows)].numpy() for name, buffer in buffers[group].items()}
                  for group, path in groups.items()}
        while len(self._pending) >= self._depth:
            self._wait_oldest()
        self._pending.append(self._threads.submit(self._write, event, shard, rows, arrays))

    def close(self, cancel: bool = False) -> None:
        """Wait for every queued shard and raise the first write error; `cancel` drops shards not yet started."""
        try:
            while not cancel and self._pending:
                self._wait_oldest()
        finally:
            self._threads.shutdown(wait=True, cancel_futures=cancel)

    def _wait_oldest(self) -> None:
        start = time.perf_counter()
        self._pending.popleft().result()
        self.waited_s += time.perf_counter() - start

    def _write(self, event: torch.cuda.Event | None, shard: int, rows: range, arrays: ShardArrays) -> None:
        if self._failed:  # the run is over: later shards are left to the rerun, like after a kill
            return
        try:
            if event is not None:
                event.synchronize()
            if self._processes is None:
                write_shard(self._store, shard, rows, arrays)
            else:  # the arrays are pickled to the process before the future completes and the buffers rotate
                self._processes.submit(write_shard, self._store, shard, rows, arrays).result()
        except BaseException:
            self._failed = True
            raise
