"""The store's array -> array codecs: kdcache.sorted_key_delta exact for every float16 and small differences for
sorted rows, kdcache.vocab_rank exact for every uint16 and small ranks for frequent ids; both readable by plain
zarr-python (registered through the package's entry points) and by the direct reader, written or not."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from kdcache.cache.codecs import (
    SORTED_KEY_DELTA, VOCAB_RANK, SortedKeyDeltaCodec, VocabRankCodec, decode_sorted_key_delta,
    encode_sorted_key_delta,
)
from kdcache.cache.schema import CodecSettings
from kdcache.cache.encoder import ShardedArrayWriter
from kdcache.cache.layout import parse_layout
from kdcache.cache.reader import ShardedArrayReader
from kdcache.cache.schema import (
    ArraySpec, StoreError, create_sharded_array, create_store, create_teacher_split, teacher_array_specs, write_tokens,
)
from test_encoder import files

ORDER = np.random.default_rng(7).permutation(300)  # a vocabulary of 300 ids, ranked
RANKED = VocabRankCodec.from_order(ORDER)
SPECS = {SORTED_KEY_DELTA: ArraySpec((8,), "float16", shuffle="bitshuffle", transform=SORTED_KEY_DELTA),
         VOCAB_RANK: ArraySpec((8,), "uint16", shuffle="bitshuffle", transform=VOCAB_RANK)}
CODECS = {SORTED_KEY_DELTA: SortedKeyDeltaCodec(), VOCAB_RANK: RANKED}


def rows_for(transform: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """What the codec is for: sorted float16 logits, or token ids of the vocabulary."""
    rng = np.random.default_rng(seed)
    if transform == SORTED_KEY_DELTA:
        return -np.sort(-rng.standard_normal(shape).astype(np.float16), axis=-1)
    return rng.integers(0, len(ORDER), shape).astype(np.uint16)


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


def test_vocab_rank_round_trip_is_exact_for_every_uint16():
    values = np.arange(2**16, dtype=np.uint16)
    ranks = RANKED.encode_array(values)
    assert np.array_equal(ranks[ORDER], np.arange(len(ORDER)))  # ids in the order get their ranks
    assert np.array_equal(ranks[len(ORDER):], values[len(ORDER):])  # values past it stay as they are
    assert np.array_equal(RANKED.decode_array(ranks.copy()), values)


def test_a_vocab_order_must_list_every_id_once():
    for order in ([], [0, 2], [0, 1, 1], [1, 2]):
        with pytest.raises(ValueError, match="exactly once"):
            VocabRankCodec.from_order(np.array(order))
    with pytest.raises(ValueError, match="exactly once"):
        VocabRankCodec(b"\x00\x00\x01")  # odd number of bytes
    with pytest.raises(ValueError, match="not base64"):
        VocabRankCodec.from_dict({"name": VOCAB_RANK, "configuration": {"order": "AAB?"}})
    assert VocabRankCodec.from_dict(RANKED.to_dict()) == RANKED


def test_a_store_with_a_bad_vocab_order_is_refused_naming_the_file(tmp_path):
    store = tmp_path / "s.zarr"
    create_sharded_array(create_store(str(store), {}), "ids", 4, 3, SPECS[VOCAB_RANK], 2, CodecSettings(),
                         order_base64=RANKED.order_base64)
    meta_path = store / "ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    no_id_1 = np.array([0, 2], dtype="<u2").tobytes()
    meta["codecs"][0]["configuration"]["codecs"][0]["configuration"]["order"] = base64.b64encode(no_id_1).decode()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"{meta_path}: {VOCAB_RANK}: order must list each id"):
        parse_layout(store / "ids")


@pytest.mark.parametrize("transform", list(SPECS))
def test_zarr_python_alone_reads_what_the_reader_reads(tmp_path, transform):
    store = tmp_path / "s.zarr"
    array = create_sharded_array(create_store(str(store), {}), "a", 5, 3, SPECS[transform], 2, CodecSettings(),
                                 order_base64=RANKED.order_base64)
    values = rows_for(transform, (5, 3, 8), seed=2)
    array[:3] = values[:3]
    array[4] = values[4]  # sequence 3 stays unwritten: the fill value
    codecs = json.loads((store / "a" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert codecs[0] == CODECS[transform].to_dict()
    expected = values.copy()
    expected[3] = 0
    assert np.array_equal(ShardedArrayReader(store / "a").read_sequences(range(5)), expected)
    # A fresh interpreter that never imports kdcache: zarr finds the codec through the package's entry point.
    script = "import sys, zarr; sys.stdout.buffer.write(zarr.open_array(sys.argv[1], mode='r')[...].tobytes())"
    out = subprocess.run([sys.executable, "-c", script, str(store / "a")], capture_output=True, check=True)
    assert out.stdout == expected.tobytes()
    assert np.array_equal(zarr.open_array(str(store / "a"), mode="r")[...], expected)


@pytest.mark.parametrize("transform", list(SPECS))
@pytest.mark.parametrize("endian", ["little", "big"])
def test_encoder_and_reader_follow_the_stored_byte_order(tmp_path, endian, transform):
    """Either transform hands uint16 to the `bytes` codec: either byte order round-trips, byte for byte."""
    values = rows_for(transform, (5, 4, 6), seed=3)
    codecs = [CODECS[transform], BytesCodec(endian=endian), BloscCodec(cname="lz4", shuffle="bitshuffle"),
              Crc32cCodec()]

    def create(name: str) -> zarr.Array:
        return zarr.open_group(str(tmp_path / name), mode="w").create_array(
            "a", shape=values.shape, dtype=values.dtype, chunks=(2, 4, 6), compressors=None, fill_value=0,
            serializer=ShardingCodec(chunk_shape=(1, 4, 6), codecs=codecs), config={"write_empty_chunks": True})

    create("zarr.zarr")[...] = values
    create("encoder.zarr")
    writer = ShardedArrayWriter(str(tmp_path / "encoder.zarr"), "a")
    for shard in range(3):
        writer.write(shard, values[2 * shard:2 * shard + 2])
    assert files(tmp_path / "encoder.zarr/a") == files(tmp_path / "zarr.zarr/a")
    reader = ShardedArrayReader(tmp_path / "encoder.zarr/a")
    assert reader.dtype == values.dtype and np.array_equal(reader.read_sequences([4, 0, 2]), values[[4, 0, 2]])


def test_teacher_ids_are_not_ranked_without_the_splits_vocab_order(tmp_path):
    root = create_store(str(tmp_path / "s.zarr"), {})
    tokens = np.array([[4, 4, 4, 1], [4, 1, 3, 0], [2, 2, 2, 2]])  # counts: 2 and 4 four times, 1 twice, 0 and 3 once
    write_tokens(root, "train", tokens, per_shard=2, codec=CodecSettings(), vocab_size=5)
    specs = teacher_array_specs(k=2, vocab_size=5, n_temperatures=1, samples=0, hidden_sizes={}, hidden_dtype="float16")
    assert specs["topk_ids"].transform == VOCAB_RANK
    create_teacher_split(root, "t", "train", specs, {}, per_shard=2, codec=CodecSettings())
    ranked = root["teachers/t/train/topk_ids"].metadata.codecs[0].codecs[0]  # the sharding codec's first inner codec
    assert ranked == VocabRankCodec.from_order(np.array([2, 4, 1, 0, 3]))  # by descending count, ties by id
    del root["tokens/train"].attrs["vocab_order"]
    with pytest.raises(StoreError, match="tokens/train has no vocab_order attribute"):
        create_teacher_split(root, "u", "train", specs, {}, per_shard=2, codec=CodecSettings())
    assert "u" not in root["teachers"]  # refused before anything was created


def test_vocab_rank_of_a_vocabulary_beyond_uint16_is_uint32():
    order = np.random.default_rng(8).permutation(150_000)
    codec = VocabRankCodec.from_order(order, "uint32")
    assert codec.to_dict()["configuration"]["dtype"] == "uint32"
    assert "dtype" not in RANKED.to_dict()["configuration"]  # uint16 metadata as it always was
    assert VocabRankCodec.from_dict(codec.to_dict()) == codec
    values = np.array([order[0], order[149_999], 70_000, 150_000, 2**32 - 1], dtype=np.uint32)
    ranks = codec.encode_array(values)
    assert ranks.dtype == np.uint32 and ranks[:2].tolist() == [0, 149_999]
    assert ranks[3:].tolist() == [150_000, 2**32 - 1]  # values past the order stay as they are
    assert np.array_equal(codec.decode_array(ranks.copy()), values)
    with pytest.raises(ValueError, match="dtype must be one of"):
        VocabRankCodec.from_order(order[:10], "int32")
