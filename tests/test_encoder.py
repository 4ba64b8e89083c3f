"""The direct shard encoder against zarr-python: the same shard file bytes for every codec and dtype the schema
produces (short last shard included), other layouts zarr allows, fsspec stores, and its refusals."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec

from kdcache.cache.schema import CodecSettings
from kdcache.cache.encoder import TASK_CHUNKS, ShardedArrayWriter, encode_shard
from kdcache.cache.layout import EMPTY, parse_layout
from kdcache.cache.reader import ShardedArrayReader
from kdcache.cache.codecs import SORTED_KEY_DELTA, VOCAB_RANK, VocabRankCodec
from kdcache.cache.schema import ArraySpec, create_sharded_array, create_store, num_shards, shard_range

N, SEQ_LEN, PER_SHARD = 10, 6, 4  # 3 shards, the last one holding 2 sequences
CODECS = {"default": CodecSettings(), "zstd-bitshuffle": CodecSettings(cname="zstd", clevel=1, shuffle="bitshuffle"),
          "lz4-shuffle": CodecSettings(cname="lz4", clevel=5, shuffle="shuffle"),
          "none": CodecSettings(cname="none")}
DTYPES = ["float16", "uint16", "int32", "float32", "int8", "uint8"]
# Compressed float16 and uint16 rows go through the transform topk_logits and topk_ids have.
TRANSFORMS = {"float16": SORTED_KEY_DELTA, "uint16": VOCAB_RANK}
ORDER = VocabRankCodec.from_order(np.random.default_rng(9).permutation(300)).order_base64  # ids 0..299 reordered


def sample(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Compressible values with an all-zero sequence (zarr skips such chunks unless write_empty_chunks)."""
    values = (rng.standard_normal(shape) * 20).round().astype(dtype)
    values[1] = 0
    return values


def files(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted(array_dir.rglob("*")) if p.is_file()}


def write_shards(store: str, path: str, values: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
    writer = ShardedArrayWriter(store, path, pool)
    for shard in range(num_shards(len(values), writer.layout.per_shard)):
        rows = shard_range(shard, len(values), writer.layout.per_shard)
        writer.write(shard, values[rows.start:rows.stop])


def twin_arrays(tmp_path: Path, spec: ArraySpec, codec: CodecSettings, n: int = N, per_shard: int = PER_SHARD
                ) -> tuple[zarr.Array, Path]:
    """The same empty array in two stores: one for zarr-python to write (returned as created: write_empty_chunks
    is a setting of the open array, not of zarr.json), one for the encoder (its store path)."""
    arrays = [create_sharded_array(create_store(str(tmp_path / name), {}), "a", n, SEQ_LEN, spec, per_shard, codec,
                                   order_base64=ORDER) for name in ("zarr.zarr", "encoder.zarr")]
    return arrays[0], tmp_path / "encoder.zarr"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", list(CODECS))
def test_shard_files_are_zarrs_bytes(tmp_path, codec, dtype):
    rng = np.random.default_rng(0)
    for trailing, compress in [((64,), True), ((), False)]:  # like topk_*, and like tokens / lse (crc32c only)
        spec = ArraySpec(trailing, dtype, compress, transform=TRANSFORMS.get(dtype) if compress else None)
        values = sample((N, SEQ_LEN, *trailing), dtype, rng)
        expected, store = twin_arrays(tmp_path / f"{compress}", spec, CODECS[codec])
        expected[...] = values
        write_shards(str(store), "a", values)
        got, want = files(store / "a"), files(tmp_path / f"{compress}/zarr.zarr/a")
        assert len(got) == 1 + num_shards(N, PER_SHARD) and got == want, (codec, dtype, trailing)
        assert np.array_equal(zarr.open_array(str(store / "a"), mode="r")[...], values)
        assert np.array_equal(ShardedArrayReader(store / "a").read_sequences(range(N)), values)


def test_short_last_shard_index_holds_empty_sentinels(tmp_path):
    _, store = twin_arrays(tmp_path, ArraySpec((3,), "float16"), CodecSettings())
    values = sample((N, SEQ_LEN, 3), "float16", np.random.default_rng(1))
    write_shards(str(store), "a", values)
    layout = parse_layout(store / "a")
    raw = (store / "a" / layout.shard_key(2)).read_bytes()
    index = np.frombuffer(raw[-layout.index_nbytes:-4], "<u8").reshape(PER_SHARD, 2)
    assert (index[2:] == EMPTY).all() and index[:2, 0].tolist() == [0, index[0, 1]]
    assert index[:2, 1].sum() + layout.index_nbytes == len(raw)  # the last shard is not padded


def test_thread_pool_gives_the_same_bytes(tmp_path):
    n = 3 * TASK_CHUNKS + 5  # several pool tasks, the last one short, in one shard
    expected, store = twin_arrays(tmp_path, ArraySpec((4,), "float16"), CodecSettings(), n=n, per_shard=n)
    values = sample((n, SEQ_LEN, 4), "float16", np.random.default_rng(2))
    expected[...] = values
    with ThreadPoolExecutor(3) as pool:
        write_shards(str(store), "a", values, pool)
    assert files(store / "a") == files(tmp_path / "zarr.zarr/a")


@pytest.mark.parametrize("endian,location,checksum", [("big", "start", True), ("little", "start", False),
                                                      ("big", "end", False)])
def test_other_layouts_zarr_allows(tmp_path, endian, location, checksum):
    """Byte order, index at the start, no inner crc32c: the encoder follows the array's zarr.json."""
    values = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    codecs = [BytesCodec(endian=endian), BloscCodec(cname="lz4")] + [zarr.codecs.Crc32cCodec()] * checksum
    for name in ("encoder.zarr", "zarr.zarr"):
        array = zarr.open_group(str(tmp_path / name), mode="w").create_array(
            "a", shape=values.shape, dtype=values.dtype, chunks=(2, 4, 3), compressors=None, fill_value=0,
            serializer=ShardingCodec(chunk_shape=(1, 4, 3), codecs=codecs, index_location=location),
            config={"write_empty_chunks": True})
    array[...] = values
    write_shards(str(tmp_path / "encoder.zarr"), "a", values)
    assert files(tmp_path / "encoder.zarr/a") == files(tmp_path / "zarr.zarr/a")


def test_fsspec_store_gets_the_same_bytes(tmp_path):
    spec, codec = ArraySpec((5,), "uint16"), CodecSettings()
    values = sample((N, SEQ_LEN, 5), "uint16", np.random.default_rng(3))
    local, memory = tmp_path / "local.zarr", "memory://encoder-test.zarr"
    for store in (str(local), memory):
        create_sharded_array(create_store(store, {}), "g/a", N, SEQ_LEN, spec, PER_SHARD, codec)
        write_shards(store, "g/a", values)
    fs = fsspec.filesystem("memory")
    for key, data in files(local / "g/a").items():
        if key != "zarr.json":
            assert fs.cat_file(f"/encoder-test.zarr/g/a/{key}") == data, key
    assert np.array_equal(zarr.open_array(f"{memory}/g/a", mode="r")[...], values)


def test_file_url_writes_files(tmp_path):
    store = f"file://{tmp_path / 'x.zarr'}"
    values = sample((N, SEQ_LEN), "int32", np.random.default_rng(4))
    create_sharded_array(create_store(store, {}), "a", N, SEQ_LEN, ArraySpec((), "int32"), PER_SHARD, CodecSettings())
    write_shards(store, "a", values)
    assert np.array_equal(ShardedArrayReader(tmp_path / "x.zarr/a").read_sequences(range(N)), values)


def test_failed_write_keeps_the_old_shard_and_no_partial_file(tmp_path, monkeypatch):
    _, store = twin_arrays(tmp_path, ArraySpec((), "float32"), CodecSettings())
    values = sample((N, SEQ_LEN), "float32", np.random.default_rng(5))
    write_shards(str(store), "a", values)
    before = files(store / "a")

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        ShardedArrayWriter(str(store), "a").write(0, values[:PER_SHARD] + 1)
    assert files(store / "a") == before


def test_wrong_shapes_are_refused(tmp_path):
    _, store = twin_arrays(tmp_path, ArraySpec((5,), "float16"), CodecSettings())
    writer = ShardedArrayWriter(str(store), "a")
    values = np.zeros((PER_SHARD, SEQ_LEN, 5), np.float16)
    with pytest.raises(ValueError, match=r"shard 2 holds sequences 8\.\.9, got 4 sequences"):
        writer.write(2, values)
    with pytest.raises(IndexError, match="shard 3 out of range for 3 shards"):
        writer.write(3, values[:2])
    with pytest.raises(ValueError, match=r"expected \[1\.\.4, 6, 5\]"):
        encode_shard(writer.layout, np.zeros((PER_SHARD, SEQ_LEN, 4), np.float16))
    assert not (store / "a" / "c").exists()
