"""Words per packed sequence, as BabyLM counts words: whitespace-separated words of the cleaned text.

Every word of a line is credited to the token holding its first character (the first token whose character span
ends after it), so a word that packing splits across two sequences counts once, in the sequence holding its
first token, and the words of a split's sequences sum to its text's words less those whose first token fell in
the dropped final partial sequence. Tokenizer-agnostic: it reads the fast tokenizer's character offsets only.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kdcache.cache import schema
from kdcache.cache.schema import StoreError
from kdcache.cache.words import WordCounts, add_word_counts, has_word_counts

ENCODE_BATCH = 10_000  # lines per encode_batch call: parallel in Rust, bounded Python memory
WORD = re.compile(r"\S+")  # the words of str.split(): `\s` is str.isspace() in a str pattern


def _flat(values: list, dtype: type) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(values), dtype=dtype)


def encode_with_words(tokenizer: Tokenizer, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All lines as one int32 token stream without special tokens, and per token the number of words whose first
    character it holds (int32, same length)."""
    ids, starts = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for first in range(0, len(lines), ENCODE_BATCH):
        batch = lines[first : first + ENCODE_BATCH]
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        # Each line's token ends and word starts, shifted by the characters of the lines before it: one sorted
        # axis for the whole batch, so one searchsorted maps every word start to its token.
        line_base = np.cumsum([0] + [len(line) + 1 for line in batch[:-1]])
        lengths = np.array([len(e.ids) for e in encodings])
        ends = _flat([[end for _, end in e.offsets] for e in encodings], np.int64) + np.repeat(line_base, lengths)
        word_lines = [[m.start() for m in WORD.finditer(line)] for line in batch]
        word_chars = _flat(word_lines, np.int64) + np.repeat(line_base, [len(w) for w in word_lines])
        token_of_word = np.searchsorted(ends, word_chars, side="right")
        # a word whose characters no token covers (a tokenizer that drops them) goes to its line's last token
        token_of_word = np.minimum(token_of_word, np.repeat(np.cumsum(lengths) - 1, [len(w) for w in word_lines]))
        ids.append(_flat([e.ids for e in encodings], np.int32))
        starts.append(np.bincount(token_of_word, minlength=int(lengths.sum())).astype(np.int32))
    return np.concatenate(ids), np.concatenate(starts)


def pack_words(token_words: np.ndarray, num_sequences: int, seq_len: int) -> WordCounts:
    """The words of each of the first `num_sequences` sequences of `seq_len` tokens, and those of the dropped rest."""
    kept = num_sequences * seq_len
    per_sequence = token_words[:kept].reshape(num_sequences, seq_len).sum(1)
    return WordCounts(per_sequence, int(token_words.sum()), int(token_words[kept:].sum()))


def upgrade_word_counts(store: str | Path) -> str:
    """Add `words/<split>` to a local store that lacks them, from the run's cleaned text and tokenizer beside it
    (runs/<name>/corpus/<split>.txt, runs/<name>/tokenizer). Without that text the store is left as it is and the
    returned line says why; text that no longer gives the store's tokens is refused."""
    store = Path(store)
    root = schema.open_store(str(store))
    missing = [split for split in schema.splits(root) if not has_word_counts(root, split)]
    if not missing:
        return f"{store}: words per sequence already recorded"
    corpus, tokenizer_dir = store.parent / "corpus", store.parent / "tokenizer"
    absent = [p for p in [*(corpus / f"{s}.txt" for s in missing), tokenizer_dir / "tokenizer.json"] if not p.is_file()]
    if absent:
        return (f"{store}: words per sequence not added: {absent[0]} not found (the cleaned text and tokenizer "
                f"`kdcache data` wrote beside the store); training on this store counts no words, so "
                f"save_at_words and babylm.track refuse it until `kdcache data --overwrite` rebuilds it")
    if schema.tokenizer_sha256(tokenizer_dir) != root.attrs.get("tokenizer_sha256"):
        raise StoreError(f"{tokenizer_dir}: not the tokenizer the tokens of {store} were made with")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    counts = {}
    for split in missing:
        text = corpus / f"{split}.txt"
        lines = text.read_text(encoding="utf-8").split("\n")[:-1]  # as written: one "\n" after each line
        stream, token_words = encode_with_words(tokenizer, lines)
        tokens = schema.read_tokens(root, split)
        if not np.array_equal(stream[: tokens.size], tokens.reshape(-1)):
            raise StoreError(f"{text}: does not give the tokens of {store}/tokens/{split} (the text changed since "
                             f"`kdcache data`); rebuild the store with `kdcache data --overwrite`")
        counts[split] = pack_words(token_words, *tokens.shape)
    add_word_counts(store, counts)
    return f"{store}: words per sequence added for {', '.join(f'{s} ({c.total:,} words)' for s, c in counts.items())}"
