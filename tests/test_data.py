"""Packing and the token store: every token kept once and in order, provenance attrs, safe replacement, CLI errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoTokenizer

from kdcache.cache import schema
from kdcache.cache.codecs import VocabRankCodec
from kdcache.config import Config, CorpusConfig, DataConfig, TokenizerConfig, load_config
from kdcache.cli.pipeline import data
from kdcache.precompute.data import pack, prepare_data
from kdcache.precompute.tokenizer import load_tokenizer
from kdcache.precompute.words import encode_with_words


def small_config(tmp_path: Path) -> Config:
    """A demo-like run small enough for a unit test, written as YAML and loaded like a user's config."""
    cfg = Config(
        name="small",
        corpus=CorpusConfig(kind="demo", demo_train_sentences=600, demo_dev_sentences=120, demo_pairs_per_phenomenon=3),
        tokenizer=TokenizerConfig(vocab_size=300, min_frequency=2),
        data=DataConfig(seq_len=16, sequences_per_shard=8),
    )
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return load_config(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = small_config(root)
    return cfg, prepare_data(cfg, runs_root=root)


def test_pack_keeps_every_token_once_in_order():
    stream = np.arange(103, dtype=np.int32)
    sequences, dropped = pack(stream, 10)
    assert sequences.shape == (10, 10) and dropped == 3
    assert np.array_equal(sequences.reshape(-1), stream[:100])
    exact, none_dropped = pack(stream[:100], 10)
    assert exact.shape == (10, 10) and none_dropped == 0


def test_stream_is_the_lines_in_order_without_specials(run):
    _, paths = run
    tokenizer = load_tokenizer(paths.tokenizer)
    lines = ["the cat saw a dog .", "a dog saw the cat .", "hello"]
    stream, _ = encode_with_words(tokenizer.backend_tokenizer, lines)
    expected = [i for line in lines for i in tokenizer.encode(line, add_special_tokens=False)]
    assert stream.tolist() == expected
    assert tokenizer.decode(stream) == "".join(" " + line for line in lines)


def test_store_attrs_and_tokens(run):
    cfg, paths = run
    root = schema.open_store(str(paths.store))
    attrs = root.attrs
    assert (attrs["seq_len"], attrs["vocab_size"]) == (16, 300)
    assert attrs["tokenizer_sha256"] == schema.tokenizer_sha256(paths.tokenizer)
    assert attrs["special_ids"] == {"pad": 0, "bos": 1, "eos": 2}
    assert attrs["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert set(attrs["corpus_files"]) == {"train", "dev"}
    schema.check_store(root, tokenizer_sha=attrs["tokenizer_sha256"], vocab_size=300, seq_len=16, split_names=["train", "dev"])
    tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    for split in ("train", "dev"):
        lines = (paths.corpus / f"{split}.txt").read_text().splitlines()
        stream, _ = encode_with_words(tokenizer.backend_tokenizer, lines)
        tokens = schema.read_tokens(root, split)
        meta = root[f"tokens/{split}"].attrs
        assert tokens.dtype == np.uint16 and tokens.shape[1] == 16
        assert (meta["lines"], meta["tokens"]) == (len(lines), len(stream))
        assert meta["dropped_tokens"] == len(stream) % 16 and tokens.size + meta["dropped_tokens"] == len(stream)
        assert np.array_equal(tokens.reshape(-1), stream[: tokens.size])
        # the order the teachers' topk_ids are ranked in: descending count in this split, ties by id
        order = VocabRankCodec.from_base64(meta["vocab_order"]).order
        counts = np.bincount(tokens.reshape(-1), minlength=300)
        keys = list(zip(-counts[np.frombuffer(order, "<u2")], np.frombuffer(order, "<u2")))
        assert len(keys) == 300 and keys == sorted(keys)
    assert (paths.tokenizer / "vocab.json").is_file() and (paths.tokenizer / "merges.txt").is_file()
    assert not [p for p in paths.root.iterdir() if ".tmp-" in p.name]


def add_teacher(store: Path) -> None:
    root = schema.open_store(str(store), mode="a")
    root.require_group(schema.TEACHERS).require_group("llama-tiny")


def test_store_with_teachers_is_not_replaced_without_overwrite(tmp_path):
    cfg = small_config(tmp_path)
    paths = prepare_data(cfg, runs_root=tmp_path)
    add_teacher(paths.store)
    tokenizer_before = schema.tokenizer_sha256(paths.tokenizer)
    with pytest.raises(schema.StoreError, match=r"cache.zarr: holds cached targets of teachers \['llama-tiny'\].*--overwrite"):
        prepare_data(cfg, runs_root=tmp_path)
    assert schema.teacher_names(schema.open_store(str(paths.store))) == ["llama-tiny"]
    assert schema.tokenizer_sha256(paths.tokenizer) == tokenizer_before
    prepare_data(cfg, runs_root=tmp_path, overwrite=True)
    assert schema.teacher_names(schema.open_store(str(paths.store))) == []


def test_a_store_of_another_format_version_is_replaced(tmp_path):
    """The way out that the reader's refusal names: `kdcache data` rewrites an old store (teachers need --overwrite)."""
    cfg = small_config(tmp_path)
    paths = prepare_data(cfg, runs_root=tmp_path)

    def age() -> None:
        schema.open_store(str(paths.store), mode="r+").attrs["format_version"] = schema.FORMAT_VERSION - 1
        with pytest.raises(schema.StoreError, match="store format version"):
            schema.open_store(str(paths.store))

    age()
    prepare_data(cfg, runs_root=tmp_path)  # tokens only: nothing is lost
    add_teacher(paths.store)
    age()
    with pytest.raises(schema.StoreError, match=r"holds cached targets of teachers \['llama-tiny'\]"):
        prepare_data(cfg, runs_root=tmp_path)
    prepare_data(cfg, runs_root=tmp_path, overwrite=True)
    assert schema.open_store(str(paths.store)).attrs["format_version"] == schema.FORMAT_VERSION


def test_cli_prints_a_summary(tmp_path):
    cfg = small_config(tmp_path)
    result = CliRunner().invoke(data, ["--config", cfg.source_path, "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("train: 600 lines, ")
    assert "dev: 120 lines, " in result.output and "vocab 300;" in result.output
    assert (tmp_path / "runs" / "small" / "cache.zarr" / "zarr.json").is_file()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\ndata: {seq_len: sixty}\n", "data.seq_len: expected int"),
        ("name: x\ncorpus: {kind: babylm, train: [/no/such/dir], dev: [/no/such/dir]}\n", "/no/such/dir: not found"),
        ("name: x\ntokenizer: {vocab_size: 100000}\ncorpus: {demo_train_sentences: 30, demo_dev_sentences: 10, "
         "demo_pairs_per_phenomenon: 1}\n", "tokenizer.vocab_size 100000 is larger than this corpus supports"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(data, ["--config", str(path), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
