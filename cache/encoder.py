"""Whole shards encoded and written directly: the write-side twin of `kdcache.cache.reader`.

`zarr_array[rows] = values` on one shard spends ~0.1-0.3 ms of GIL-holding Python per inner chunk (100-250 ms
for a shard of 32k positions), while the Zarr v3 sharding layout is simple to produce: every inner chunk (one
sequence) goes through the inner codec chain - the kdcache transform where the array has one
(kdcache.cache.codecs), `bytes` (the stored byte order), Blosc configured as zarr's BloscCodec configures
numcodecs, a little-endian crc32c appended - the chunks follow each other in order (the Morton order of a
[per_shard, 1, ...] chunk grid is plain order), and the index of (offset, nbytes) uint64 pairs plus its crc32c
ends (or starts) the shard. The bytes are zarr-python's own, as written with write_empty_chunks=True (the
schema's setting): every chunk of the shard's sequences is stored, and the index entries past the last
sequence of a short last shard hold the empty sentinel (tests/test_encoder.py).

Blosc releases the GIL, so with a thread pool runs of chunks encode in parallel.
"""

from __future__ import annotations

from concurrent.futures import Executor

import google_crc32c
import numcodecs
import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from kdcache.cache.layout import CRC_BYTES, EMPTY, ShardLayout, layout_from_json, local_path, parse_layout
from kdcache.cache.schema import StoreError, num_shards, open_store, shard_range
from kdcache.files import atomic_write

SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
TASK_CHUNKS = 16  # inner chunks per pool task: enough work per task to hide its scheduling cost


def blosc_codec(layout: ShardLayout) -> numcodecs.Blosc | None:
    """The numcodecs compressor zarr's BloscCodec builds from the array's blosc configuration (None: no blosc).
    A missing typesize or shuffle is what zarr fills in: the item size, and bitshuffle for 1-byte items."""
    if layout.blosc is None:
        return None
    config, itemsize = layout.blosc, layout.dtype.itemsize
    shuffle = config.get("shuffle", "bitshuffle" if itemsize == 1 else "shuffle")
    return numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=SHUFFLES[shuffle],
                           blocksize=config.get("blocksize", 0), typesize=config.get("typesize", itemsize))


def _encode_chunks(rows: np.ndarray, blosc: numcodecs.Blosc | None, checksummed: bool) -> list[bytes]:
    """Each row (one inner chunk) through the inner codecs."""
    chunks = []
    for row in rows:
        data = blosc.encode(row) if blosc is not None else row.tobytes()
        chunks.append(data + google_crc32c.value(data).to_bytes(CRC_BYTES, "little") if checksummed else data)
    return chunks


def encode_shard(layout: ShardLayout, values: np.ndarray, pool: Executor | None = None) -> bytes:
    """The shard file zarr-python writes for `values` [rows <= per_shard, ...], cast to the array's dtype as zarr
    does. `pool` (threads) encodes runs of TASK_CHUNKS chunks in parallel."""
    values = np.ascontiguousarray(values, dtype=layout.array_dtype)
    if not 1 <= len(values) <= layout.per_shard or values.shape[1:] != layout.shape[1:]:
        raise ValueError(f"shard values of shape {list(values.shape)}: expected [1..{layout.per_shard}, "
                         f"{', '.join(map(str, layout.shape[1:]))}]")
    if layout.transform:
        values = layout.transform.encode_array(values)
    values = values.astype(layout.dtype, copy=False)
    blosc = blosc_codec(layout)
    if pool is None or len(values) <= TASK_CHUNKS:
        chunks = _encode_chunks(values, blosc, layout.checksummed)
    else:
        runs = [values[lo:lo + TASK_CHUNKS] for lo in range(0, len(values), TASK_CHUNKS)]
        encoded = pool.map(_encode_chunks, runs, [blosc] * len(runs), [layout.checksummed] * len(runs))
        chunks = [chunk for run in encoded for chunk in run]
    nbytes = np.array([len(c) for c in chunks], dtype=np.uint64)
    index = np.full((layout.per_shard, 2), EMPTY, dtype="<u8")
    index[:len(chunks), 0] = np.cumsum(nbytes) - nbytes + (0 if layout.index_at_end else layout.index_nbytes)
    index[:len(chunks), 1] = nbytes
    index_bytes = index.tobytes() + google_crc32c.value(index).to_bytes(CRC_BYTES, "little")
    return b"".join([*chunks, index_bytes] if layout.index_at_end else [index_bytes, *chunks])


class ShardedArrayWriter:
    """Whole shards of one sharded [N, L, ...] array of a store: a local path or file:// URL is written as files,
    any other fsspec URL through zarr's store (same bytes). `pool`: threads that encode chunks in parallel."""

    def __init__(self, store: str, array_path: str, pool: Executor | None = None):
        self.pool = pool
        self.where = f"{store.rstrip('/')}/{array_path}"
        directory = local_path(store)
        self._dir = directory / array_path if directory is not None else None
        self._store_path = None if directory is not None else open_store(store, mode="r+").store_path / array_path
        if self._store_path is None:
            self.layout = parse_layout(self._dir)
            return
        meta = sync((self._store_path / "zarr.json").get(prototype=default_buffer_prototype()))
        if meta is None:
            raise StoreError(f"{self.where}/zarr.json: array metadata not found")
        self.layout = layout_from_json(meta.to_bytes(), f"{self.where}/zarr.json")

    def write(self, shard: int, values: np.ndarray) -> None:
        """Replace shard `shard` with `values`: all of its sequences (the last shard may be short)."""
        n, per_shard = self.layout.shape[0], self.layout.per_shard
        if not 0 <= shard < num_shards(n, per_shard):
            raise IndexError(f"{self.where}: shard {shard} out of range for {num_shards(n, per_shard)} shards")
        if len(values) != len(rows := shard_range(shard, n, per_shard)):
            raise ValueError(f"{self.where}: shard {shard} holds sequences {rows.start}..{rows.stop - 1}, "
                             f"got {len(values)} sequences")
        data = encode_shard(self.layout, values, self.pool)
        key = self.layout.shard_key(shard)
        if self._store_path is None:
            atomic_write(self._dir / key, data)  # a reader never sees half a shard
        else:
            sync((self._store_path / key).set(default_buffer_prototype().buffer.from_bytes(data)))
