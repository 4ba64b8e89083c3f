"""`kdcache data`: corpus -> tokenizer -> fixed-length token sequences in the run's Zarr store.

Each split becomes one token stream (lines in order, no `<s>`/`</s>` between them: the BabyLlama
convention; every line starts with the tokenizer's prefix space, so words stay words), cut into
sequences of `data.seq_len` at fixed boundaries: the teachers' targets are cached per position,
so sequence i must mean the same tokens forever. The final partial sequence is dropped. Beside the tokens,
`words/<split>` records each sequence's words (precompute/words.py: the BabyLM count).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from kdcache.cache import schema
from kdcache.cache.lock import lock_store
from kdcache.cache.manifest import seal_store
from kdcache.config import Config, RunPaths, run_paths
from kdcache.cache.schema import StoreError
from kdcache.cache.words import write_word_counts
from kdcache.files import staged
from kdcache.precompute.corpus import CorpusError, CorpusSplit, build_corpus
from kdcache.precompute.tokenizer import TokenizerError, train_tokenizer
from kdcache.precompute.words import encode_with_words, pack_words

SPLITS = ("train", "dev")


def pack(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """[N, seq_len] sequences cut at fixed boundaries, and the number of tokens dropped from the end."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


def check_replaceable(store: Path, overwrite: bool) -> None:
    """Refuse to replace a store holding teacher targets: they are only valid for its tokens."""
    if overwrite or not store.exists():
        return
    teachers = schema.teacher_names(schema.open_store(str(store), any_version=True))  # an old format is replaceable
    if teachers:
        raise StoreError(
            f"{store}: holds cached targets of teachers {teachers}; re-tokenising would invalidate them "
            f"(pass --overwrite to replace the store)"
        )


def write_store(cfg: Config, paths: RunPaths, tokenizer: PreTrainedTokenizerFast, corpus: dict[str, CorpusSplit]) -> None:
    """Build the store beside its final path and move it into place once every split is written."""
    vocab_size = len(tokenizer)
    attrs = {
        "seq_len": cfg.data.seq_len,
        "vocab_size": vocab_size,
        "tokenizer_sha256": schema.tokenizer_sha256(paths.tokenizer),
        "special_ids": {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        "corpus_files": {split: corpus[split].sources for split in SPLITS},
        "config": cfg.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with staged(paths.store) as tmp:
        root = schema.create_store(str(tmp), attrs)
        for split in SPLITS:
            stream, token_words = encode_with_words(tokenizer.backend_tokenizer, corpus[split].lines)
            sequences, dropped = pack(stream, cfg.data.seq_len)
            if len(sequences) == 0:
                raise CorpusError(
                    f"{cfg.source_path}: the {split} split has {len(stream)} tokens, "
                    f"fewer than one sequence of data.seq_len {cfg.data.seq_len}"
                )
            schema.write_tokens(root, split, sequences, cfg.data.sequences_per_shard, cfg.cache.codec, vocab_size)
            root[f"{schema.TOKENS}/{split}"].attrs.update(
                {"lines": len(corpus[split].lines), "tokens": len(stream), "dropped_tokens": dropped}
            )
            write_word_counts(root, split, pack_words(token_words, *sequences.shape))
        seal_store(tmp)  # the store is whole: record what it holds (cache.manifest)


def prepare_data(cfg: Config, runs_root: str | Path = "runs", overwrite: bool = False) -> RunPaths:
    """Corpus -> tokenizer -> token store, all under runs_root/<name>/."""
    paths = run_paths(cfg, runs_root)
    paths.store.parent.mkdir(parents=True, exist_ok=True)
    with lock_store(paths.store, "kdcache data"):  # no precompute is writing the store or reading the tokenizer
        check_replaceable(paths.store, overwrite)  # before the tokenizer the teachers used is retrained
        corpus = build_corpus(cfg, paths)
        tokenizer = train_tokenizer(
            paths.corpus / "train.txt", cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, paths.tokenizer
        )
        write_store(cfg, paths, tokenizer, corpus)
    return paths


def data_summary(paths: RunPaths) -> str:
    """What `kdcache data` wrote: lines, tokens and sequences per split, the vocabulary, the outputs."""
    root = schema.open_store(str(paths.store))
    lines = []
    for split in SPLITS:
        arr, words = root[f"{schema.TOKENS}/{split}"], root[f"{schema.WORDS}/{split}"].attrs
        lines.append(f"{split}: {arr.attrs['lines']:,} lines, {words['words']:,} words, {arr.attrs['tokens']:,} tokens "
                     f"-> {arr.shape[0]:,} sequences of {arr.shape[1]} ({arr.attrs['dropped_tokens']} tokens, "
                     f"{words['dropped_words']} words dropped)")
    lines.append(f"vocab {root.attrs['vocab_size']:,}; wrote {paths.corpus}, {paths.tokenizer}, {paths.store}")
    return "\n".join(lines)
