"""The training hot path: sequences read straight out of memory-mapped shard files.

zarr-python spends about 0.3 ms per chunk whatever the codec (13-53 random batches/s on 2 cores), while the
Zarr v3 sharding layout is simple to read directly (`kdcache.cache.layout`): a shard file holds its inner
chunks (one sequence each) and an index of (offset, nbytes) little-endian uint64 pairs, one per inner chunk,
followed by the index's crc32c. A sequence is then one index lookup plus one Blosc decode (or copy) out of a
memory map, 10-100x faster (docs/cache-format.md; shared notes/storage-measurements.md).

Maps are opened lazily per process and dropped after a fork, so a reader can go to DataLoader workers.
A remote store (an fsspec URL: s3://, memory://, ...) is read the same way: each shard file is fetched whole
into the local shard cache, the shards a batch lacks concurrently (`kdcache.cache.storage`).
"""

from __future__ import annotations

import operator
import os
import struct
from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

import google_crc32c
import numpy as np
from numcodecs.blosc import decompress as blosc_decompress

from kdcache.cache.layout import CRC_BYTES, EMPTY, layout_from_json
from kdcache.cache.manifest import (
    META, checked_manifest, differs, fingerprint_of, shard_entries, shard_fingerprint, unlisted,
)
from kdcache.cache.storage import Fingerprint, StoreFiles
from kdcache.cache.schema import COMPLETE, TEACHERS, TOKENS, StoreError, check_store, open_store
from kdcache.cache.xtok import axis_lengths

BLOSC_HEADER = struct.Struct("<III")  # nbytes, blocksize, cbytes: bytes 4-16 of a blosc frame's header
EXPECT_KEYS = {"tokenizer_sha", "vocab_size", "seq_len"}


# ---------------------------------------------------------------------------------------------------------------
# One array.


class Shard(NamedTuple):
    path: str
    data: np.ndarray  # uint8 view of the file's memory map (or of the fetched bytes of a remote shard)
    index: list[list[int]]  # [offset, nbytes] per inner chunk


def _document(data: bytes | None, name: str) -> bytes:
    if data is None:
        raise StoreError(f"{name}: array metadata not found")
    return data


def check_indices(idx: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Sequence indices as int64, negatives counted from the end; IndexError when out of range."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"sequence index out of range for {n} sequences")
    return idx


class ShardedArrayReader:
    """One sharded [N, L, ...] array, decoded chunk by chunk from memory-mapped shard files: of a local store, or
    of a remote one through its local shard cache (`kdcache.cache.storage`).

    At most `max_open_shards` shard files stay mapped per process (each map holds a file descriptor); a shard's
    index checksum is checked every time the shard is mapped. `listed` (shard key -> fingerprint, from the
    store's manifest: `kdcache.cache.manifest`) has each shard checked against it the first time a process maps it.
    """

    def __init__(self, array_dir: str | os.PathLike | StoreFiles, max_open_shards: int = 128,
                 listed: dict[str, str] | None = None):
        self.files = array_dir if isinstance(array_dir, StoreFiles) else StoreFiles(array_dir)
        self.path = self.files.store
        meta = self.files.name(META)
        self.layout = layout_from_json(_document(self.files.read(META), meta), meta)
        self.shape = self.layout.shape
        self.dtype = self.layout.array_dtype
        self.per_shard = self.layout.per_shard
        self.max_open_shards = max_open_shards
        self.listed = listed
        self._matched: set[int] = set()  # shards found to match `listed`
        self._pid: int | None = None
        self._shards: OrderedDict[int, Shard] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Maps never travel to another process (pickling for spawn workers): the receiver maps its own.
        return {**self.__dict__, "_pid": None, "_shards": OrderedDict()}

    def read_sequence(self, i: int) -> np.ndarray:
        i, n = operator.index(i), self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        return self._read([i % n])[0]

    def read_sequences(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._read(check_indices(idx, self.shape[0]).tolist())

    def _own_shards(self) -> OrderedDict[int, Shard]:
        if self._pid != os.getpid():  # a forked child: the inherited maps belong to the parent
            self._pid, self._shards = os.getpid(), OrderedDict()
        return self._shards

    def _read(self, idx: list[int]) -> np.ndarray:
        self._own_shards()
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.layout.dtype)
        for row, i in enumerate(idx):
            shard, chunk = divmod(i, self.per_shard)
            self._decode(self._shard(shard), chunk, out[row])
        if self.layout.transform:  # one vectorised inverse for the whole batch
            return self.layout.transform.decode_array(out.astype(self.layout.transform.stored_dtype, copy=False))
        return out.astype(self.dtype, copy=False)

    def _shard(self, shard: int) -> Shard:
        mapped = self._shards.get(shard)
        if mapped is None:
            mapped = self._shards[shard] = self._map(shard)
            if len(self._shards) > self.max_open_shards:
                self._shards.popitem(last=False)  # the map closes once no array views it
        else:
            self._shards.move_to_end(shard)
        return mapped

    def missing_shards(self, idx: Sequence[int] | np.ndarray) -> dict[str, tuple[str, Fingerprint]]:
        """The listed shards holding sequences `idx` that this process has not mapped yet: shard key ->
        (manifest digest, fingerprint), what `StoreFiles.prefetch` takes."""
        if self.listed is None:
            return {}
        mapped = self._own_shards()
        keys = {self.layout.shard_key(s) for s in set((check_indices(idx, self.shape[0]) // self.per_shard).tolist())
                if s not in mapped}
        return {key: (self.listed[key], fingerprint_of(self.layout)) for key in keys if key in self.listed}

    def _map(self, shard: int) -> Shard:
        key = self.layout.shard_key(shard)
        path = self.files.name(key)
        try:
            data = self.files.shard(key, (self.listed or {}).get(key), fingerprint_of(self.layout))
        except FileNotFoundError:
            raise StoreError(f"{path}: shard file missing (shard {shard} of {self.path})") from None
        except ValueError:  # mmap refuses empty files
            raise StoreError(f"{path}: empty shard file") from None
        size = self.layout.index_nbytes
        if data.size < size:
            raise StoreError(f"{path}: {data.size} bytes, shorter than its {size}-byte shard index")
        raw = data[-size:] if self.layout.index_at_end else data[:size]
        if google_crc32c.value(raw[:-CRC_BYTES]) != int.from_bytes(raw[-CRC_BYTES:].tobytes(), "little"):
            raise StoreError(f"{path}: shard index checksum mismatch (corrupt shard file)")
        if self.listed is not None and shard not in self._matched:
            if key not in self.listed:
                raise StoreError(unlisted(path))
            if shard_fingerprint(data, self.layout) != self.listed[key]:
                raise StoreError(differs(path))
            self._matched.add(shard)
        return Shard(path, data, raw[:-CRC_BYTES].view("<u8").reshape(-1, 2).tolist())

    def _decode(self, shard: Shard, chunk: int, out: np.ndarray) -> None:
        offset, nbytes = shard.index[chunk]
        if offset == EMPTY and nbytes == EMPTY:
            out[...] = self.layout.fill_value
            return
        if offset + nbytes > shard.data.size:
            raise StoreError(f"{shard.path}: chunk {chunk} lies past the end of the file (corrupt shard index)")
        buf = shard.data[offset:offset + nbytes]
        if self.layout.checksummed:
            buf, crc = buf[:-CRC_BYTES], buf[-CRC_BYTES:]
            if google_crc32c.value(buf) != int.from_bytes(crc.tobytes(), "little"):
                raise StoreError(f"{shard.path}: chunk {chunk} checksum mismatch (corrupt chunk data)")
        if not self.layout.compressed:
            if buf.size != out.nbytes:
                raise StoreError(f"{shard.path}: chunk {chunk} holds {buf.size} bytes, expected {out.nbytes}")
            out[...] = buf.view(out.dtype).reshape(out.shape)
            return
        # Decoding into `out` accepts a frame that is too short: check the frame's own sizes first.
        if buf.size < 4 + BLOSC_HEADER.size or BLOSC_HEADER.unpack_from(buf, 4)[::2] != (out.nbytes, buf.size):
            raise StoreError(f"{shard.path}: chunk {chunk} is not a blosc frame of {out.nbytes} bytes (corrupt chunk)")
        try:
            blosc_decompress(buf, out)  # numcodecs' Blosc.decode minus ~1 us of argument checks per chunk
        except (RuntimeError, ValueError) as e:
            raise StoreError(f"{shard.path}: chunk {chunk} does not decode ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# A whole store, as the student's Dataset sees it.


class StoreReader:
    """Token sequences of one split plus chosen teacher arrays, checked against what the consumer expects.

    `teachers` lists the teacher groups to read; `arrays` may narrow a teacher to some of its arrays (default:
    every array of its split). `expect` ({"tokenizer_sha", "vocab_size", "seq_len"}) and the completeness of
    every requested teacher split (unless not `require_complete`) are checked before anything is read, and in a
    local store with a manifest, the metadata and `complete` records read (shards: when first mapped). Items
    are {"input_ids": [L] int64, "<teacher>/<array>": [L, ...]} in the stored dtypes.
    """

    def __init__(self, store_path: str | os.PathLike, *, teachers: Sequence[str] = (),
                 arrays: dict[str, Sequence[str]] | None = None, split: str = "train", expect: dict | None = None,
                 require_complete: bool = True):
        self.store = str(store_path)
        expect, arrays, teachers = dict(expect or {}), dict(arrays or {}), list(teachers)
        if unknown := sorted(set(expect) - EXPECT_KEYS):
            raise ValueError(f"expect: unknown keys {unknown} (known: {sorted(EXPECT_KEYS)})")
        if stray := sorted(set(arrays) - set(teachers)):
            raise ValueError(f"arrays: teachers {stray} are not in teachers {teachers}")
        manifest = checked_manifest(self.store, split, teachers)  # before zarr parses a damaged document
        root = open_store(self.store)
        check_store(root, tokenizer_sha=expect.get("tokenizer_sha"), vocab_size=expect.get("vocab_size"),
                    seq_len=expect.get("seq_len"), teachers=teachers, split_names=[split],
                    require_complete=require_complete)
        paths = {"input_ids": f"{TOKENS}/{split}"}
        lengths: dict[str, int] = {}  # arrays whose second axis is a cross-tokenizer group's teacher tokens
        for teacher in teachers:
            group = root[f"{TEACHERS}/{teacher}/{split}"]
            lengths.update({f"{teacher}/{name}": n
                            for name, n in axis_lengths(root[f"{TEACHERS}/{teacher}"].attrs.asdict()).items()})
            have = sorted(name for name in group.array_keys() if name != COMPLETE)
            for name in arrays.get(teacher) or have:
                if name not in have:
                    raise StoreError(f"{self.store}: teacher {teacher!r} split {split!r} has no array {name!r} "
                                     f"(have {have})")
                paths[f"{teacher}/{name}"] = f"{group.path}/{name}"
        self.files = StoreFiles(self.store)
        self.readers = {key: ShardedArrayReader(self.files.under(path), listed=None if manifest is None else
                                                shard_entries(manifest, path)) for key, path in paths.items()}
        self.paths = paths
        self.num_sequences, self.seq_len = self.readers["input_ids"].shape
        if bad := [key for key, r in self.readers.items()
                   if r.shape[:2] != (self.num_sequences, lengths.get(key, self.seq_len))]:
            raise StoreError(f"{self.store}: arrays {bad} do not match tokens/{split} "
                             f"[{self.num_sequences}, {self.seq_len}]")

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = {key: reader.read_sequence(i) for key, reader in self.readers.items()}
        item["input_ids"] = item["input_ids"].astype(np.int64)
        return item

    def batch(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        if not self.files.local:  # the shards this batch needs that the shard cache lacks, fetched concurrently
            self.files.prefetch({f"{self.paths[key]}/{shard}": check for key, reader in self.readers.items()
                                 for shard, check in reader.missing_shards(idx).items()})
        out = {key: reader.read_sequences(idx) for key, reader in self.readers.items()}
        out["input_ids"] = out["input_ids"].astype(np.int64)
        return out
