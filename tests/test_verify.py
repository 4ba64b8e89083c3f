"""`verify_store` on sound stores and on stores with one planted problem each."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from kdcache.cache import FORMAT_VERSION
from kdcache.cache.schema import (
    TOKENS, ArraySpec, CodecSettings, StoreError, create_sharded_array, create_store, token_digest, write_tokens,
)
from kdcache.cache.manifest import seal_store, unsealed
from kdcache.cache.verify import verify_store
from test_reader import LZ4, NONE, PER_SHARD, SEQ_LEN, DEFAULT, array_dir, build_store, flip


def checks(store: str | Path) -> list[str]:
    """verify_store's lines on a store written without a manifest (as these tests write them), less the one line
    that says so: the checks below are the ones that hold without a manifest."""
    problems = verify_store(store)
    assert unsealed(str(store)) in problems, problems
    return [line for line in problems if line != unsealed(str(store))]


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "cache.zarr"
    build_store(path, teachers=("alpha", "beta"))
    return path


def chunk_span(shard_file: Path, chunk: int) -> tuple[int, int]:
    """(offset, nbytes) of an inner chunk, read from the shard index at the end of the file."""
    index = np.frombuffer(shard_file.read_bytes()[-(PER_SHARD * 16 + 4):-4], "<u8").reshape(-1, 2)
    return int(index[chunk, 0]), int(index[chunk, 1])


def only(problems: list[str], *words: str) -> str:
    """The single problem line, checked to name each of `words`."""
    assert len(problems) == 1, problems
    assert all(word in problems[0] for word in words), problems[0]
    return problems[0]


@pytest.mark.parametrize("codec", [DEFAULT, NONE, LZ4])
def test_sound_store_has_no_problems(tmp_path, codec):
    build_store(tmp_path / "cache.zarr", codec=codec, teachers=("alpha", "beta"))
    assert checks(tmp_path / "cache.zarr") == []


def test_sound_store_with_chunk_checksums(tmp_path):
    build_store(tmp_path / "cache.zarr")
    assert checks(str(tmp_path / "cache.zarr")) == []


def test_flipped_index_byte(store):
    shard_file = array_dir(store, "beta/lse") / "c/1/0/0"
    flip(shard_file, -10)
    only(checks(store), str(shard_file), "index checksum mismatch")


def test_flipped_blosc_header_byte(store):
    shard_file = array_dir(store, "alpha/topk_logits") / "c/0/0/0"
    offset, _ = chunk_span(shard_file, 2)
    flip(shard_file, offset + 12)  # the frame's compressed size: the chunk's crc32c catches it before Blosc
    only(checks(store), str(shard_file), "chunk 2 checksum mismatch")


@pytest.mark.parametrize("codec", [DEFAULT, NONE])
def test_flipped_chunk_byte_with_chunk_checksums(tmp_path, codec):
    path = tmp_path / "cache.zarr"
    build_store(path, codec=codec)
    shard_file = array_dir(path, "alpha/hidden_1") / "c/1/0/0"
    offset, nbytes = chunk_span(shard_file, 3)
    flip(shard_file, offset + nbytes // 2)  # the middle of the payload: without a checksum this decodes silently
    only(checks(path), str(shard_file), "chunk 3 checksum mismatch")


def test_uncompressed_chunk_of_wrong_size(tmp_path):
    path = tmp_path / "cache.zarr"
    build_store(path, codec=NONE)
    shard_file = array_dir(path, "input_ids") / "c/0/0"
    data = bytearray(shard_file.read_bytes())
    index_start = len(data) - (PER_SHARD * 16 + 4)
    index = np.frombuffer(bytes(data[index_start:-4]), "<u8").reshape(-1, 2).copy()
    index[1, 1] -= 2  # a consistent index (valid crc32c) that points at a short chunk
    data[index_start:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard_file.write_bytes(bytes(data))
    only(checks(path), str(shard_file), "chunk 1 checksum mismatch")


def test_missing_shard_file(store):
    shard_file = array_dir(store, "alpha/sample_ids") / "c/2/0/0"
    shard_file.unlink()
    only(checks(store), str(shard_file), "shard file missing")


def test_incomplete_teacher_skips_its_unwritten_shard(tmp_path):
    path = tmp_path / "cache.zarr"
    build_store(path, teachers=("alpha", "beta"), incomplete=("beta", 0))
    for name in ("topk_logits", "lse"):
        (array_dir(path, f"beta/{name}") / "c/0/0/0").unlink()  # never written: not a problem of its own
    only(checks(path), "teachers/beta/train", "incomplete: 2/3 shards complete (not: [0])")


@pytest.mark.parametrize("name,bad,message", [
    ("topk_logits", np.nan, "NaN or inf values (shards [1])"),
    ("lse", np.inf, "NaN or inf values (shards [1])"),
    ("topk_ids", 300, "token ids outside [0, 300) (shards [1])"),
    ("sample_counts", 9, "sample counts do not sum to samples=3 (shards [1])"),
])
def test_bad_values(store, name, bad, message):
    array = zarr.open_group(str(store), mode="r+")[f"teachers/alpha/train/{name}"]
    shard = array[PER_SHARD:2 * PER_SHARD]
    shard[1, 2, 0] = bad
    array[PER_SHARD:2 * PER_SHARD] = shard  # a whole-shard write, as the writer does
    only(checks(store), f"teachers/alpha/train/{name}", message)


def test_unsorted_topk(store):
    array = zarr.open_group(str(store), mode="r+")["teachers/beta/train/topk_logits"]
    shard = array[:PER_SHARD]
    shard[0, 0] = shard[0, 0, ::-1]
    array[:PER_SHARD] = shard
    only(checks(store), "teachers/beta/train/topk_logits", "not sorted descending (shards [0])")


@pytest.mark.parametrize("key,value,message", [
    ("k", 4, "teachers/alpha/train/topk_logits: float16[10, 6, 5], expected float16[10, 6, 4]"),
    ("temperatures", [1.0], "teachers/alpha/train/lse: float32[10, 6, 2], expected float32[10, 6, 1]"),
    ("temperatures", [2.0, 4.0], "teachers/alpha: attribute temperatures [2.0, 4.0] lack 1.0"),
    ("format_version", 1, f"teachers/alpha: attribute format_version is 1, expected {FORMAT_VERSION}"),
    ("tokenizer_sha256", "0" * 64, "teachers/alpha: attribute tokenizer_sha256 differs from the store's"),
])
def test_teacher_attributes(store, key, value, message):
    zarr.open_group(str(store), mode="r+")["teachers/alpha"].attrs[key] = value
    problems = checks(store)
    assert message in problems and all("alpha" in line for line in problems), problems


def test_missing_arrays_named(store):
    root = zarr.open_group(str(store), mode="r+")
    del root["teachers/alpha/train/hidden_1_scale"]
    root["teachers/beta"].attrs["hidden_layers"] = [1, 3]
    assert sorted(checks(store)) == [
        "teachers/alpha/train: array 'hidden_1_scale' missing",
        "teachers/beta/train: array 'hidden_3' missing",
    ]


def test_tokens_changed_under_the_teachers(store):
    root = zarr.open_group(str(store), mode="r+")
    other = np.random.default_rng(5).integers(0, 300, (13, SEQ_LEN))
    write_tokens(root, "train", other, PER_SHARD, DEFAULT, 300)  # 13 sequences now, teachers still hold 10
    problems = checks(store)
    for teacher in ("alpha", "beta"):
        assert f"teachers/{teacher}/train: token_digest differs from tokens/train's digest (computed on other tokens)" \
            in problems
        assert f"teachers/{teacher}/train: num_sequences is 10, tokens have 13" in problems
        assert f"teachers/{teacher}/train/complete: 3 entries, expected 4 shards" in problems


def test_tokens_not_matching_their_digest(store):
    tokens = zarr.open_group(str(store), mode="r+")["tokens/train"]
    tokens[:PER_SHARD] = tokens[:PER_SHARD][::-1]
    only(checks(store), "tokens/train: stored tokens do not match the digest attribute")


def test_refuses_what_it_cannot_verify(tmp_path):
    with pytest.raises(StoreError, match="not a kdcache store"):
        verify_store(tmp_path)



def test_a_store_at_an_fsspec_url_is_verified_like_a_local_one():
    url = "memory://test_verify/cache.zarr"
    build_store(url)
    assert checks(url) == []
    seal_store(url)
    assert verify_store(url) == []
    root = zarr.open_group(url, mode="r+")
    root["teachers/alpha/train/lse"][:PER_SHARD] = 1.5  # a whole-shard rewrite the manifest does not list
    assert verify_store(url) == [f"{url}/teachers/alpha/train/lse/c/0/0/0: differs from the store's manifest "
                                 "(damaged, or replaced after the store was written)"]


def test_a_large_vocabulary_store_written_with_int32_ids_still_verifies(tmp_path):
    """Before uint32, ids past 65,536 were stored as int32 without kdcache.vocab_rank: read as their metadata says."""
    store = tmp_path / "s.zarr"
    root = create_store(str(store), {"seq_len": 4, "vocab_size": 70_000, "tokenizer_sha256": "x",
                                     "special_ids": {"pad": 0, "bos": 1, "eos": 2}})
    tokens = np.random.default_rng(0).integers(0, 70_000, (3, 4)).astype(np.int32)
    array = create_sharded_array(root.require_group(TOKENS), "train", 3, 4, ArraySpec((), "int32", compress=False),
                                 2, CodecSettings(), attrs={"digest": token_digest(tokens), "per_shard": 2})
    array[...] = tokens
    assert checks(store) == []
    tokens[0, 0] = 80_000
    array[...] = tokens
    array.attrs["digest"] = token_digest(tokens)
    assert checks(store) == ["tokens/train: token ids outside [0, 70000) (shards [0])"]
