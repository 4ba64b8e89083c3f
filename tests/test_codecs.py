"""kdcache.sorted_key_delta: exact for every float16, small differences for sorted rows, and readable by plain
zarr-python (the codec registered through its entry point) and by the direct reader, written or not."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from cache.codecs import SORTED_KEY_DELTA, SortedKeyDeltaCodec, decode_sorted_key_delta, encode_sorted_key_delta
from cache.config import CodecConfig
from cache.encoder import ShardedArrayWriter
from cache.reader import ShardedArrayReader
from cache.schema import ArraySpec, create_sharded_array, create_store
from test_encoder import files

LOGITS = ArraySpec((8,), "float16", shuffle="bitshuffle", sorted_rows=True)


def every_float16_in_rows() -> np.ndarray:
    """All 65,536 float16 bit patterns (NaNs, infinities, -0, subnormals), shuffled into rows of 64."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    np.random.default_rng(0).permuted(values, axis=-1, out=values)
    return values


def test_round_trip_is_bit_exact_for_every_float16():
    values = every_float16_in_rows()
    encoded = encode_sorted_key_delta(values)
    assert encoded.dtype == np.uint16 and encoded.shape == values.shape
    assert np.array_equal(decode_sorted_key_delta(encoded).view(np.uint16), values.view(np.uint16))


def test_sorted_rows_become_a_key_then_small_differences():
    rng = np.random.default_rng(1)
    rows = -np.sort(-(rng.standard_normal((100, 64)) * 2 + 3).astype(np.float16), axis=-1)  # some cross zero
    encoded = encode_sorted_key_delta(rows)
    assert np.array_equal(encoded[:, 0] & 0x8000 > 0, rows[:, 0] >= 0)  # the first key keeps the max's order
    steps = encoded[:, 1:]
    assert steps.max() < 2**15 and np.median(steps) < 2**9  # descending keys: no wrap, mostly small steps
    assert np.array_equal(decode_sorted_key_delta(encoded.copy()), rows)


def test_zarr_python_alone_reads_what_the_reader_reads(tmp_path):
    store = tmp_path / "s.zarr"
    array = create_sharded_array(create_store(str(store), {}), "logits", 5, 3, LOGITS, 2, CodecConfig())
    values = -np.sort(-np.random.default_rng(2).standard_normal((5, 3, 8)).astype(np.float16), axis=-1)
    array[:3] = values[:3]
    array[4] = values[4]  # sequence 3 stays unwritten: the fill value
    codecs = json.loads((store / "logits" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert codecs[0] == {"name": SORTED_KEY_DELTA}
    expected = values.copy()
    expected[3] = 0
    assert np.array_equal(ShardedArrayReader(store / "logits").read_sequences(range(5)), expected)
    # A fresh interpreter that never imports kdcache: zarr finds the codec through the package's entry point.
    script = "import sys, zarr; sys.stdout.buffer.write(zarr.open_array(sys.argv[1], mode='r')[...].tobytes())"
    out = subprocess.run([sys.executable, "-c", script, str(store / "logits")], capture_output=True, check=True)
    assert out.stdout == expected.tobytes()
    assert np.array_equal(zarr.open_array(str(store / "logits"), mode="r")[...], expected)


@pytest.mark.parametrize("endian", ["little", "big"])
def test_encoder_and_reader_follow_the_stored_byte_order(tmp_path, endian):
    """The key differences are uint16 to the `bytes` codec: either byte order round-trips, byte for byte."""
    values = -np.sort(-np.random.default_rng(3).standard_normal((5, 4, 6)).astype(np.float16), axis=-1)
    codecs = [SortedKeyDeltaCodec(), BytesCodec(endian=endian), BloscCodec(cname="lz4", shuffle="bitshuffle"),
              Crc32cCodec()]

    def create(name: str) -> zarr.Array:
        return zarr.open_group(str(tmp_path / name), mode="w").create_array(
            "a", shape=values.shape, dtype="float16", chunks=(2, 4, 6), compressors=None, fill_value=0,
            serializer=ShardingCodec(chunk_shape=(1, 4, 6), codecs=codecs), config={"write_empty_chunks": True})

    create("zarr.zarr")[...] = values
    create("encoder.zarr")
    writer = ShardedArrayWriter(str(tmp_path / "encoder.zarr"), "a")
    for shard in range(3):
        writer.write(shard, values[2 * shard:2 * shard + 2])
    assert files(tmp_path / "encoder.zarr/a") == files(tmp_path / "zarr.zarr/a")
    reader = ShardedArrayReader(tmp_path / "encoder.zarr/a")
    assert reader.dtype == np.float16 and np.array_equal(reader.read_sequences([4, 0, 2]), values[[4, 0, 2]])
