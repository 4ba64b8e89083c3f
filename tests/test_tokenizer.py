"""The BPE tokenizer: specials, round trip, the leading-space convention, the saved directory, bad input."""

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kdcache.cache.schema import sha256_file
from kdcache.precompute.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

WORDS = "the a dog cat bird saw chased liked small big red quickly today and but because house garden".split()
LINES = [
    "the dog saw a cat .",
    "Well, I don't know; maybe it's 42 or 43?",
    "a small red bird chased the big dog today",
    "spaces inside   are kept ",
]


def write_corpus(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    path.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + " .\n" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = root / "tokenizer"
    tokenizer = train_tokenizer(write_corpus(root / "train.txt"), 300, 2, out)
    return tokenizer, out


def test_specials_and_vocab(trained):
    tokenizer, _ = trained
    assert len(tokenizer) == 300
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token is None


@pytest.mark.parametrize("text", LINES)
def test_round_trip_with_prefix_space(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not set(ids) & {0, 1, 2}  # no specials are added
    # add_prefix_space: a line is encoded as if preceded by a space, so decoding gives that space back
    assert tokenizer.decode(ids) == " " + text
    assert tokenizer.encode(" " + text, add_special_tokens=False) == ids
    assert tokenizer.convert_ids_to_tokens(ids[0]).startswith("Ġ")


def test_words_are_the_same_tokens_at_line_start_and_inside(trained):
    tokenizer, _ = trained
    alone = tokenizer.encode("garden", add_special_tokens=False)
    inside = tokenizer.encode("the garden", add_special_tokens=False)
    assert inside[-len(alone):] == alone


def test_directory_loads_with_auto_tokenizer(trained):
    tokenizer, out = trained
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"} <= names
    assert not any(".tmp-" in p.name for p in out.parent.iterdir())
    assert len(json.loads((out / "vocab.json").read_text())) == 300
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.encode(LINES[0], add_special_tokens=False) == tokenizer.encode(LINES[0], add_special_tokens=False)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<s>", "</s>", "<pad>")
    assert load_tokenizer(out).get_vocab() == tokenizer.get_vocab()


def test_vocab_larger_than_corpus_supports(tmp_path, trained):
    corpus = write_corpus(tmp_path / "small.txt", n=20)
    out = tmp_path / "tokenizer"
    with pytest.raises(TokenizerError) as err:
        train_tokenizer(corpus, 5000, 2, out)
    message = str(err.value)
    assert str(corpus) in message and "5000" in message
    got = int(message.rsplit("<= ", 1)[1])
    assert 259 <= got < 5000 and f"stops at {got} tokens" in message
    assert not out.exists()


def test_failed_retrain_keeps_the_existing_tokenizer(tmp_path):
    corpus = write_corpus(tmp_path / "train.txt")
    out = tmp_path / "tokenizer"
    train_tokenizer(corpus, 280, 2, out)
    before = sha256_file(out / "tokenizer.json")
    with pytest.raises(TokenizerError):
        train_tokenizer(corpus, 50000, 2, out)
    assert sha256_file(out / "tokenizer.json") == before


def test_load_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match=rf"{tmp_path}: no tokenizer.json"):
        load_tokenizer(tmp_path)
