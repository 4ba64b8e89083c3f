"""The direct shard reader against zarr-python on small stores written through `cache.schema`, and its refusals."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec

import kdcache.cache.schema as schema
from kdcache.cache.schema import CodecSettings
from kdcache.cache.manifest import read_manifest, seal_store
from kdcache.cache.reader import ShardedArrayReader, StoreReader
from kdcache.cache.storage import StoreFiles
from kdcache.cache.schema import (
    StoreError, create_store, create_teacher_split, mark_shard_complete, num_shards, shard_range, teacher_array_specs,
    write_tokens,
)

N, SEQ_LEN, PER_SHARD, K, TEMPERATURES, SAMPLES, HIDDEN = 10, 6, 4, 5, [1.0, 2.0], 3, {1: 7}
SHA = "f" * 64
DEFAULT, NONE = CodecSettings(), CodecSettings(cname="none")


def teacher_data(shape: tuple[int, int], vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays that satisfy every value check of `verify_store` (sorted top-k, ids in range, counts sum)."""
    ids = schema.ids_dtype(vocab)
    counts = np.zeros((*shape, SAMPLES), np.uint16)
    counts[..., 0] = SAMPLES
    return {
        "topk_logits": -np.sort(-rng.standard_normal((*shape, K), dtype=np.float32), axis=-1).astype(np.float16),
        "topk_ids": rng.integers(0, vocab, (*shape, K)).astype(ids),
        "lse": rng.standard_normal((*shape, len(TEMPERATURES))).astype(np.float32),
        "sample_ids": rng.integers(0, vocab, (*shape, SAMPLES)).astype(ids),
        "sample_counts": counts,
        "hidden_1": rng.integers(-127, 128, (*shape, HIDDEN[1])).astype(np.int8),
        "hidden_1_scale": rng.random(shape).astype(np.float16),
    }


def build_store(store: str | Path, *, codec: CodecSettings = DEFAULT, vocab: int = 300,
                teachers: tuple[str, ...] = ("alpha",), incomplete: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """A store with tokens/train and one int8-hidden, sampled teacher split per teacher, written shard by shard
    as the precompute writer does. `incomplete` = (teacher, shard) left unmarked. Returns the arrays written,
    keyed like `StoreReader` items (tokens as "input_ids")."""
    rng = np.random.default_rng(0)
    root = create_store(str(store), {"seq_len": SEQ_LEN, "vocab_size": vocab, "tokenizer_sha256": SHA})
    tokens = rng.integers(0, vocab, (N, SEQ_LEN))
    write_tokens(root, "train", tokens, PER_SHARD, codec, vocab)
    written = {"input_ids": tokens}
    specs = teacher_array_specs(K, vocab, len(TEMPERATURES), SAMPLES, HIDDEN, "int8")
    attrs = {"k": K, "temperatures": TEMPERATURES, "samples": SAMPLES, "hidden_layers": list(HIDDEN),
             "hidden_dtype": "int8", "tokenizer_sha256": SHA}
    for teacher in teachers:
        group = create_teacher_split(root, teacher, "train", specs, attrs, PER_SHARD, codec)
        data = teacher_data((N, SEQ_LEN), vocab, rng)
        for shard in range(num_shards(N, PER_SHARD)):
            rows = shard_range(shard, N, PER_SHARD)
            for name, values in data.items():
                group[name][rows.start:rows.stop] = values[rows.start:rows.stop]
            if (teacher, shard) != incomplete:
                mark_shard_complete(group, shard)
        written.update({f"{teacher}/{name}": values for name, values in data.items()})
    return written


def array_dir(store: Path, key: str) -> Path:
    return store / ("tokens/train" if key == "input_ids" else f"teachers/{key.replace('/', '/train/')}")


def random_indices(rng: np.random.Generator) -> np.ndarray:
    """Unsorted, with repeats, always including the last (partial) shard's last sequence."""
    return np.concatenate([rng.integers(0, N, 12), [N - 1, 0, N - 1]])


# ---------------------------------------------------------------------------------------------------------------
# ShardedArrayReader == zarr-python


LZ4 = CodecSettings(cname="lz4", shuffle="shuffle")


@pytest.mark.parametrize("codec,vocab", [(DEFAULT, 300), (NONE, 300), (LZ4, 70000)])
def test_every_array_matches_zarr(tmp_path, codec, vocab):
    store = tmp_path / "cache.zarr"
    written = build_store(store, codec=codec, vocab=vocab)
    root = zarr.open_group(str(store), mode="r")
    rng = np.random.default_rng(1)
    dtypes = set()
    for key, values in written.items():
        reader = ShardedArrayReader(array_dir(store, key))
        expected = root[str(array_dir(store, key).relative_to(store))]
        assert (reader.shape, reader.dtype, reader.per_shard) == (expected.shape, expected.dtype, PER_SHARD)
        idx = random_indices(rng)
        got = reader.read_sequences(idx)
        assert got.dtype == expected.dtype and np.array_equal(got, expected.oindex[idx]), key
        assert np.array_equal(got, values[idx].astype(expected.dtype)), key
        assert np.array_equal(reader.read_sequence(-1), expected[N - 1]), key
        dtypes.add(got.dtype.name)
    assert {"int8", "float16", "float32", "uint16", schema.ids_dtype(vocab)} <= dtypes


def test_crc32c_inner_codec_is_read(tmp_path):
    store = tmp_path / "cache.zarr"
    written = build_store(store)
    assert json.loads((array_dir(store, "alpha/lse") / "zarr.json").read_text())["codecs"][0]["configuration"][
        "codecs"][-1] == {"name": "crc32c"}
    idx = random_indices(np.random.default_rng(2))
    for key in ("input_ids", "alpha/topk_logits", "alpha/hidden_1"):
        assert np.array_equal(ShardedArrayReader(array_dir(store, key)).read_sequences(idx), written[key][idx])


@pytest.mark.parametrize("endian,location", [("big", "start"), ("little", "start"), ("big", "end")])
def test_byte_order_and_index_location(tmp_path, endian, location):
    values = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    array = group.create_array(
        "a", shape=values.shape, dtype=values.dtype, chunks=(2, 4, 3), compressors=None, fill_value=0,
        serializer=ShardingCodec(chunk_shape=(1, 4, 3), codecs=[BytesCodec(endian=endian), BloscCodec(cname="lz4")],
                                 index_location=location), config={"write_empty_chunks": True})
    array[...] = values
    reader = ShardedArrayReader(tmp_path / "x.zarr/a")
    assert reader.dtype == np.dtype("float32") and np.array_equal(reader.read_sequences([4, 0, 2]), values[[4, 0, 2]])


def test_unwritten_chunks_read_as_fill_value(tmp_path):
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    array = group.create_array("a", shape=(4, 3), dtype="int16", shards=(4, 3), chunks=(1, 3), fill_value=7,
                                compressors=None)
    array[1] = [1, 2, 3]  # write_empty_chunks is off by default: the other chunks stay empty in the index
    assert np.array_equal(ShardedArrayReader(tmp_path / "x.zarr/a").read_sequences([0, 1]), [[7, 7, 7], [1, 2, 3]])


def test_few_open_shards_still_read_right(tmp_path):
    store = tmp_path / "cache.zarr"
    written = build_store(store)
    reader = ShardedArrayReader(array_dir(store, "alpha/topk_ids"), max_open_shards=1)
    idx = random_indices(np.random.default_rng(3))
    assert np.array_equal(reader.read_sequences(idx), written["alpha/topk_ids"][idx])
    assert len(reader._shards) == 1


def test_pickled_reader_maps_its_own_files(tmp_path):
    store = tmp_path / "cache.zarr"
    written = build_store(store)
    reader = ShardedArrayReader(array_dir(store, "alpha/lse"))
    reader.read_sequences(range(N))
    copy = pickle.loads(pickle.dumps(reader))  # what a spawned DataLoader worker receives
    assert len(copy._shards) == 0 and np.array_equal(copy.read_sequences([7, 1]), written["alpha/lse"][[7, 1]])


def test_out_of_range_index(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store)
    reader = ShardedArrayReader(array_dir(store, "input_ids"))
    with pytest.raises(IndexError):
        reader.read_sequences([0, N])
    with pytest.raises(IndexError):
        reader.read_sequence(-N - 1)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["codecs"][0]["configuration"]["codecs"].append({"name": "gzip", "configuration": {"level": 1}}),
     "inner codecs ['bytes', 'crc32c', 'gzip'] not supported"),
    (lambda m: m["codecs"].append({"name": "zstd", "configuration": {"level": 0}}), "one sharding_indexed codec"),
    (lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[2, SEQ_LEN]), "expected one sequence"),
    (lambda m: m["codecs"][0]["configuration"]["index_codecs"].pop(), "index codecs"),
    (lambda m: m.update(data_type="complex64"), "data_type 'complex64' not supported"),
    (lambda m: m["chunk_key_encoding"].update(name="v2"), "chunk key encoding"),
])
def test_unsupported_layout_is_refused(tmp_path, edit, message):
    store = tmp_path / "cache.zarr"
    build_store(store)
    meta_path = array_dir(store, "input_ids") / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=re.escape(message)) as info:
        ShardedArrayReader(meta_path.parent)
    assert str(meta_path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Corruption


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_index_byte_is_refused(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store)
    shard_file = array_dir(store, "alpha/lse") / "c/1/0/0"
    flip(shard_file, -10)  # inside the index at the end of the file
    reader = ShardedArrayReader(shard_file.parents[3])
    assert reader.read_sequences([0]).shape == (1, SEQ_LEN, len(TEMPERATURES))  # other shards still read
    with pytest.raises(StoreError, match="index checksum mismatch") as info:
        reader.read_sequences([PER_SHARD])
    assert str(shard_file) in str(info.value)


def test_flipped_chunk_byte_fails_its_checksum(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store)
    shard_file = array_dir(store, "alpha/topk_logits") / "c/0/0/0"
    flip(shard_file, 40)  # inside chunk 0's compressed payload
    with pytest.raises(StoreError, match="chunk 0 checksum mismatch"):
        ShardedArrayReader(shard_file.parents[3]).read_sequence(0)


def test_missing_shard_file_is_named(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store)
    shard_file = array_dir(store, "alpha/topk_ids") / "c/2/0/0"
    shard_file.unlink()
    with pytest.raises(StoreError, match="shard file missing") as info:
        StoreReader(store, teachers=["alpha"]).batch([0, N - 1])
    assert str(shard_file) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# StoreReader


def test_store_reader_items_and_batches(tmp_path):
    store = tmp_path / "cache.zarr"
    written = build_store(store, teachers=("alpha", "beta"))
    reader = StoreReader(store, teachers=["alpha", "beta"], arrays={"beta": ["topk_logits", "lse"]},
                         expect={"tokenizer_sha": SHA, "vocab_size": 300, "seq_len": SEQ_LEN})
    assert len(reader) == N
    item = reader[3]
    alpha = [key for key in written if key.startswith("alpha/")]
    assert sorted(item) == sorted(["input_ids", *alpha, "beta/topk_logits", "beta/lse"])
    assert item["input_ids"].dtype == np.int64 and np.array_equal(item["input_ids"], written["input_ids"][3])
    idx = [9, 2, 2]
    batch = reader.batch(idx)
    for key, values in batch.items():
        assert np.array_equal(values, written[key][idx]) and values.shape[0] == len(idx), key
    with pytest.raises(IndexError):
        reader[N]


def test_store_reader_refuses_unknown_array_and_keys(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store)
    with pytest.raises(StoreError, match="has no array 'topk_probs'"):
        StoreReader(store, teachers=["alpha"], arrays={"alpha": ["topk_probs"]})
    with pytest.raises(StoreError, match="no teacher 'gamma'"):
        StoreReader(store, teachers=["gamma"])
    with pytest.raises(ValueError, match="unknown keys"):
        StoreReader(store, expect={"seqlen": SEQ_LEN})


@pytest.mark.parametrize("expect,message", [
    ({"seq_len": SEQ_LEN + 1}, f"seq_len is {SEQ_LEN}, expected {SEQ_LEN + 1}"),
    ({"tokenizer_sha": "0" * 64}, "tokenizer_sha256 is 'f"),
    ({"vocab_size": 301}, "vocab_size is 300, expected 301"),
])
def test_store_reader_refuses_unexpected_store(tmp_path, expect, message):
    store = tmp_path / "cache.zarr"
    build_store(store)
    with pytest.raises(StoreError, match=message) as info:
        StoreReader(store, teachers=["alpha"], expect=expect)
    assert str(store) in str(info.value)


def test_store_reader_refuses_incomplete_teacher(tmp_path):
    store = tmp_path / "cache.zarr"
    build_store(store, incomplete=("alpha", 1))
    with pytest.raises(StoreError, match="teacher 'alpha' split 'train' is incomplete: 2/3 shards"):
        StoreReader(store, teachers=["alpha"])


def test_store_reader_over_fsspec_reads_the_same_shards(tmp_path, monkeypatch):
    """An fsspec URL goes through the same direct reader: shards fetched whole, into the shard cache once the store
    is sealed (a copy served again only while it matches the manifest)."""
    monkeypatch.setenv("KDCACHE_SHARD_CACHE", str(tmp_path / "shards"))
    local, remote = tmp_path / "cache.zarr", "memory://test_reader/cache.zarr"
    build_store(local)
    written = build_store(remote)
    seal_store(remote)
    readers = [StoreReader(path, teachers=["alpha"], expect={"seq_len": SEQ_LEN}) for path in (local, remote)]
    idx = [N - 1, 0, 5, 5]
    for key, values in readers[1].batch(idx).items():
        assert values.dtype == readers[0].batch(idx)[key].dtype and np.array_equal(values, written[key][idx]), key
    assert np.array_equal(readers[1][2]["input_ids"], written["input_ids"][2])
    cached = sorted((tmp_path / "shards").rglob("*"))
    listed = read_manifest(StoreFiles(remote))
    shards = {digest for rel, digest in listed.items() if "/c/" in rel and "/complete/" not in rel}
    assert len(shards) > 20 and {p.name for p in cached if p.is_file()} == shards  # by digest: equal shards once
    for path in (p for p in cached if p.is_file()):  # damaged copies are fetched again, never served
        path.write_bytes(b"\0" * path.stat().st_size)
    fresh = StoreReader(remote, teachers=["alpha"])
    assert all(np.array_equal(values, written[key][idx]) for key, values in fresh.batch(idx).items())


class MapsOwner(torch.utils.data.Dataset):
    """Items plus whether the reader's maps belong to the process that used them."""

    def __init__(self, reader: StoreReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        item = self.reader[i]
        return {**item, "own_maps": all(r._pid == os.getpid() for r in self.reader.readers.values())}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_dataloader_with_fork_workers(tmp_path, where, request):
    """The parent's maps (and, on S3, its filesystem client, whose event loop cannot cross a fork) stay behind."""
    store = tmp_path / "cache.zarr"
    written = build_store(store)
    if where == "s3":
        seal_store(store)
        url = f"{request.getfixturevalue('s3')}/reader-fork/cache.zarr"
        fsspec.filesystem("s3").put(str(store), url, recursive=True)
        store = url
    reader = StoreReader(store, teachers=["alpha"], arrays={"alpha": ["topk_logits", "topk_ids", "hidden_1"]})
    reader.batch(list(range(N)))  # the parent maps every shard before forking
    loader = DataLoader(MapsOwner(reader), batch_size=3, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=False)
    batches = list(loader)
    assert all(batch["own_maps"].all() for batch in batches)
    for key in ("input_ids", "alpha/topk_logits", "alpha/topk_ids", "alpha/hidden_1"):
        got = torch.cat([batch[key] for batch in batches]).numpy()
        assert np.array_equal(got, written[key].astype(got.dtype)), key
    assert reader.readers["input_ids"]._pid == os.getpid() and len(reader.readers["input_ids"]._shards) == 3
