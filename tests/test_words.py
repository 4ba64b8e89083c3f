"""Words per sequence: the BabyLM count (whitespace words of the cleaned text), credited to the sequence holding a
word's first token, summing to the text's words less the dropped tail; `kdcache upgrade` adds them to an old store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.cache import schema
from kdcache.cache.manifest import seal_store
from kdcache.cache.verify import verify_store
from kdcache.cache.words import WORDS, read_word_counts
from kdcache.cli import main
from kdcache.precompute.data import prepare_data
from kdcache.precompute.tokenizer import load_tokenizer
from kdcache.precompute.words import encode_with_words, pack_words
from test_data import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return prepare_data(small_config(root), runs_root=root)


def credited_words(tokenizer, line: str) -> list[int]:
    """Per token of `line`, the words whose first character lies in its span: the rule, line by line, in plain
    Python (the module does it for a whole batch at once)."""
    encoding = tokenizer.encode(line, add_special_tokens=False)
    credited = [0] * len(encoding.ids)
    for start in (i for i, ch in enumerate(line) if not ch.isspace() and (i == 0 or line[i - 1].isspace())):
        credited[next(t for t, (_, end) in enumerate(encoding.offsets) if end > start)] += 1
    return credited


def test_every_word_is_credited_to_the_token_holding_its_first_character(run):
    tokenizer = load_tokenizer(run.tokenizer).backend_tokenizer
    lines = ["the cat saw a dog .", "Ünïcödé  words\u00a0—\t“quoted” ok", "x", "   spaced   out  "]
    stream, token_words = encode_with_words(tokenizer, lines)
    assert len(stream) == len(token_words)
    assert token_words.sum() == sum(len(line.split()) for line in lines)
    assert token_words.tolist() == [n for line in lines for n in credited_words(tokenizer, line)]


def test_a_word_split_across_a_sequence_boundary_counts_in_the_first():
    token_words = np.array([1, 0, 0, 1, 1, 0, 1])  # word 1 spans tokens 0-2: sequences of 2 cut it after token 1
    counts = pack_words(token_words, num_sequences=3, seq_len=2)
    assert counts.per_sequence.tolist() == [1, 1, 1] and (counts.total, counts.dropped) == (4, 1)


def test_the_store_records_each_sequences_words(run):
    root = schema.open_store(str(run.store))
    tokenizer = load_tokenizer(run.tokenizer).backend_tokenizer
    for split in ("train", "dev"):
        text = (run.corpus / f"{split}.txt").read_text().splitlines()
        counts = read_word_counts(root, split)
        attrs = root[f"{WORDS}/{split}"].attrs
        assert attrs["words"] == sum(len(line.split()) for line in text)
        assert counts.sum() == attrs["words"] - attrs["dropped_words"] and counts.dtype == np.int64
        credited = np.array([n for line in text for n in credited_words(tokenizer, line)])
        n, seq_len = root[f"tokens/{split}"].shape
        assert counts.tolist() == credited[: n * seq_len].reshape(n, seq_len).sum(1).tolist()
        assert attrs["dropped_words"] == credited[n * seq_len :].sum()
    assert verify_store(run.store) == []


def test_inspect_lists_the_words_each_split_holds(run, tmp_path):
    root = schema.open_store(str(run.store))
    result = CliRunner().invoke(main, ["inspect", str(run.store), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["splits"]
    assert {split: listed[split]["words"] for split in ("train", "dev")} == {
        split: int(read_word_counts(root, split).sum()) for split in ("train", "dev")}
    lines = CliRunner().invoke(main, ["inspect", str(run.store)]).output.splitlines()
    header = next(line for line in lines if line.startswith("split "))
    dev = next(line for line in lines if line.startswith("dev "))
    assert header.split()[3] == "words" and dev.split()[3] == str(listed["dev"]["words"])
    older = tmp_path / "older.zarr"  # a store written before kdcache counted words
    shutil.copytree(run.store, older)
    shutil.rmtree(older / WORDS)
    seal_store(older)
    assert json.loads(CliRunner().invoke(main, ["inspect", str(older), "--json"]).output)["splits"]["dev"]["words"] is None


def test_upgrade_adds_the_words_to_a_store_written_without_them(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run.root, old)
    shutil.rmtree(old / "cache.zarr" / WORDS)
    seal_store(old / "cache.zarr")  # as an older kdcache left it: sealed, no words
    assert read_word_counts(schema.open_store(str(old / "cache.zarr")), "train") is None

    result = CliRunner().invoke(main, ["upgrade", str(old / "cache.zarr")])
    assert result.exit_code == 0, result.output
    assert "words per sequence added for dev (" in result.output and "), train (" in result.output
    for split in ("train", "dev"):
        got = read_word_counts(schema.open_store(str(old / "cache.zarr")), split)
        assert got.tolist() == read_word_counts(schema.open_store(str(run.store)), split).tolist()
    assert verify_store(old / "cache.zarr") == []
    again = CliRunner().invoke(main, ["upgrade", str(old / "cache.zarr")])
    assert "words per sequence already recorded" in again.output


def test_upgrade_without_the_text_leaves_the_store_and_says_so(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run.root, old)
    shutil.rmtree(old / "cache.zarr" / WORDS)
    shutil.rmtree(old / "corpus")
    seal_store(old / "cache.zarr")
    result = CliRunner().invoke(main, ["upgrade", str(old / "cache.zarr")])
    assert result.exit_code == 0, result.output
    assert f"words per sequence not added: {old / 'corpus' / 'dev.txt'} not found" in result.output
    assert not (old / "cache.zarr" / WORDS).exists() and verify_store(old / "cache.zarr") == []


def test_text_that_no_longer_gives_the_tokens_is_refused(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run.root, old)
    shutil.rmtree(old / "cache.zarr" / WORDS)
    seal_store(old / "cache.zarr")
    (old / "corpus" / "train.txt").write_text("something else entirely\n")
    result = CliRunner().invoke(main, ["upgrade", str(old / "cache.zarr")])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("Error: ") and "train.txt: does not give the tokens of" in result.output
    assert read_word_counts(schema.open_store(str(old / "cache.zarr")), "dev") is None  # nothing half-added


def test_damaged_counts_are_refused(run, tmp_path):
    store = tmp_path / "cache.zarr"
    shutil.copytree(run.store, store)
    root = schema.open_store(str(store), mode="r+")
    root[f"{WORDS}/train"].attrs["words"] = root[f"{WORDS}/train"].attrs["words"] + 1
    with pytest.raises(schema.StoreError, match="words/train holds .* summing to"):
        read_word_counts(schema.open_store(str(store)), "train")


def test_the_babylm_schedule_is_cut_at_the_runs_total_and_named_as_its_branches():
    from kdcache.student.words import BABYLM_SCHEDULE, checkpoint_name, word_schedule

    millions = [c // 10**6 for c in BABYLM_SCHEDULE]
    assert millions == [*range(1, 11), *range(20, 101, 10), *range(200, 1001, 100)]
    assert [checkpoint_name(c) for c in word_schedule("babylm", 60_400_000)] == \
        [f"chck_{m}M" for m in [*range(1, 11), 20, 30, 40, 50, 60]]
    assert word_schedule([5, 9], 3) == [5, 9] and word_schedule(None, 10**9) == []
    assert [checkpoint_name(c) for c in (500_000, 1_500_000, 1234)] == ["chck_500K", "chck_1500K", "chck_1234"]
