"""The store's optional words per sequence: `words/<split>`, [N] uint32 beside `tokens/<split>` (spec:
docs/cache-format.md). BabyLM budgets and checkpoints count words, not tokens; a store without them (an older
kdcache wrote it) reads as before, and `kdcache upgrade` adds them (precompute/words.py counts them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from kdcache.cache.layout import local_path
from kdcache.cache.lock import lock_store
from kdcache.cache.manifest import seal_store, unseal_store
from kdcache.cache.schema import TOKENS, WORDS, StoreError, open_store
CONVENTION = ("whitespace-separated words of the cleaned text; a word counts in the sequence holding its first "
              "token")


@dataclass(frozen=True)
class WordCounts:
    """One split's words: per stored sequence, in the split's text, and in the dropped final partial sequence."""

    per_sequence: np.ndarray
    total: int
    dropped: int


def write_word_counts(root: zarr.Group, split: str, counts: WordCounts) -> None:
    """Create (or replace) `words/<split>`: one chunk, crc32c-checked, its totals as attributes."""
    if int(counts.per_sequence.sum()) != counts.total - counts.dropped:
        raise StoreError(f"{root.store}: words of {split} do not add up ({counts.per_sequence.sum()} in sequences, "
                         f"{counts.total} - {counts.dropped} dropped in the text)")
    n = len(counts.per_sequence)
    array = root.require_group(WORDS).create_array(
        split, shape=(n,), dtype="uint32", chunks=(max(n, 1),), compressors=[Crc32cCodec()], fill_value=0,
        attributes={"words": counts.total, "dropped_words": counts.dropped, "convention": CONVENTION},
        overwrite=True)
    array[...] = counts.per_sequence.astype(np.uint32)


def has_word_counts(root: zarr.Group, split: str) -> bool:
    return f"{WORDS}/{split}" in root


def read_word_counts(root: zarr.Group, split: str) -> np.ndarray | None:
    """Words per sequence of `split` as int64, checked against the token split and their recorded total; None for a
    store that has none (written before kdcache counted words)."""
    try:
        if not has_word_counts(root, split):
            return None
        array = root[f"{WORDS}/{split}"]
        counts = array[...].astype(np.int64)
        expected = array.attrs.get("words", -1) - array.attrs.get("dropped_words", 0)
    except Exception as e:  # noqa: BLE001 - what zarr raises on a damaged chunk or document varies
        raise StoreError(f"{root.store}: {WORDS}/{split} cannot be read ({e.__class__.__name__}: {e})") from None
    n = root[f"{TOKENS}/{split}"].shape[0]
    if counts.shape != (n,) or int(counts.sum()) != expected:
        raise StoreError(f"{root.store}: {WORDS}/{split} holds {counts.shape[0]} counts summing to {counts.sum()}, "
                         f"expected {n} summing to {expected} (damaged: rerun `kdcache data --overwrite`)")
    return counts


def add_word_counts(store: str | os.PathLike, counts: dict[str, WordCounts]) -> None:
    """Write `words/<split>` into an existing local store under its write lock, and seal it again."""
    directory = local_path(store)
    if directory is None:
        raise StoreError(f"{store}: words are added to local stores only")
    with lock_store(store, "kdcache upgrade"):
        root = open_store(str(store), mode="r+")
        unseal_store(directory)  # until sealed again, the store reads as one being written
        for split, split_counts in counts.items():
            write_word_counts(root, split, split_counts)
        seal_store(directory)
