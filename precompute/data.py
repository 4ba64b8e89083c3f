"""`kdcache data`: corpus -> tokenizer -> fixed-length token sequences in the run's Zarr store.

Each split becomes one token stream (lines in order, no `<s>`/`</s>` between them: the BabyLlama
convention; every line starts with the trained tokenizer's prefix space, so words stay words), cut into
sequences of `data.seq_len` at fixed boundaries: the teachers' targets are cached per position,
so sequence i must mean the same tokens forever. The final partial sequence is dropped.
A pretrained tokenizer has no prefix space to rely on: each line is encoded followed by a newline, as the corpus
files hold it, with the tokenizer's own normaliser and added tokens but no BOS/EOS between lines (the split is
one running text); a corpus of which more than MAX_UNKNOWN_SHARE of the tokens are its unknown token is refused.
Beside the tokens, `words/<split>` records each sequence's words (precompute/words.py: the BabyLM count).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from transformers import PreTrainedTokenizerFast

from kdcache.cache import schema
from kdcache.cache.lock import lock_store
from kdcache.cache.layout import local_path
from kdcache.cache.manifest import MANIFEST, seal_store
from kdcache.cache.storage import StoreFiles
from kdcache.config import Config, RunPaths, run_paths
from kdcache.cache.schema import StoreError
from kdcache.cache.words import write_word_counts
from kdcache.files import staged
from kdcache.precompute.corpus import CorpusError, CorpusSplit, build_corpus
from kdcache.precompute.tokenizer import (
    TokenizerError, copy_pretrained, load_pretrained, model_vocab_size, token_id_count, train_tokenizer,
)
from kdcache.precompute.words import encode_with_words, pack_words

SPLITS = ("train", "dev")
MAX_UNKNOWN_SHARE = 0.01  # a pretrained tokenizer mapping more of the corpus to its unknown token does not fit it


def pack(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """[N, seq_len] sequences cut at fixed boundaries, and the number of tokens dropped from the end."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


def check_replaceable(store: Path | str, overwrite: bool) -> None:
    """Refuse to replace a store holding teacher targets: they are only valid for its tokens."""
    if overwrite or not StoreFiles(store).exists("zarr.json"):
        return
    teachers = schema.teacher_names(schema.open_store(str(store), any_version=True))  # an old format is replaceable
    if teachers:
        raise StoreError(
            f"{store}: holds cached targets of teachers {teachers}; re-tokenising would invalidate them "
            f"(pass --overwrite to replace the store)"
        )


def write_store(cfg: Config, paths: RunPaths, tokenizer: PreTrainedTokenizerFast, streams: dict[str, tuple[np.ndarray, np.ndarray]],
                corpus: dict[str, CorpusSplit], vocab_size: int) -> None:
    """Build the store beside its final path and move it into place once every split is written."""
    attrs = {
        "seq_len": cfg.data.seq_len,
        "vocab_size": vocab_size,
        "tokenizer_sha256": schema.tokenizer_sha256(paths.tokenizer),
        "special_ids": {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        "corpus_files": {split: corpus[split].sources for split in SPLITS},
        "config": cfg.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg.tokenizer.pretrained:
        attrs["tokenizer_source"] = cfg.tokenizer.pretrained
    with staged_store(paths.store) as tmp:
        root = schema.create_store(str(tmp), attrs)
        for split in SPLITS:
            stream, token_words = streams[split]
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


@contextmanager
def staged_store(store: Path | str) -> Iterator[Path]:
    """A local directory to build the store in, moved into place (`files.staged`) or, for a remote store, published
    object by object with the manifest last (`StoreFiles.publish`), only if the block succeeds."""
    if local_path(store) is not None:
        with staged(local_path(store)) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="kdcache-data-") as tmp:
        yield Path(tmp) / "cache.zarr"
        StoreFiles(store).publish(Path(tmp) / "cache.zarr", MANIFEST)


def prepare_data(cfg: Config, runs_root: str | Path = "runs", overwrite: bool = False) -> RunPaths:
    """Corpus -> tokenizer -> token store, all under runs_root/<name>/."""
    paths = run_paths(cfg, runs_root)
    paths.root.mkdir(parents=True, exist_ok=True)
    if local_path(paths.store) is not None:
        local_path(paths.store).parent.mkdir(parents=True, exist_ok=True)
    with lock_store(paths.store, "kdcache data"):  # no precompute is writing the store or reading the tokenizer
        check_replaceable(paths.store, overwrite)  # before the tokenizer the teachers used is retrained
        corpus = build_corpus(cfg, paths)
        if cfg.tokenizer.pretrained:
            tokenizer = load_pretrained(cfg.tokenizer.pretrained)
            vocab_size = pretrained_vocab_size(cfg, tokenizer)
        else:
            tokenizer = train_tokenizer(
                paths.corpus / "train.txt", cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, paths.tokenizer
            )
            vocab_size = len(tokenizer)
        streams = {split: split_stream(cfg, tokenizer, corpus[split]) for split in SPLITS}
        if cfg.tokenizer.pretrained:  # every check passed: the run's tokenizer is replaced only now
            copy_pretrained(cfg.tokenizer.pretrained, paths.tokenizer)
        write_store(cfg, paths, tokenizer, streams, corpus, vocab_size)
    return paths


def pretrained_vocab_size(cfg: Config, tokenizer: PreTrainedTokenizerFast) -> int:
    """The student's vocabulary for a pretrained tokenizer: `tokenizer.vocab_size`, else its model's, else its ids;
    refused when it leaves out some of the tokenizer's ids or disagrees with the model's config.json."""
    source, ids, given = cfg.tokenizer.pretrained, token_id_count(tokenizer), cfg.tokenizer.vocab_size
    model = model_vocab_size(source)
    vocab_size = given or model or ids
    if vocab_size < ids:
        key = "tokenizer.vocab_size" if given else f"{source}/config.json vocab_size"
        raise TokenizerError(f"{cfg.source_path}: {key} {vocab_size} is smaller than the ids of the tokenizer "
                             f"{source} (0..{ids - 1})")
    if given and model and given != model:
        raise TokenizerError(f"{cfg.source_path}: tokenizer.vocab_size {given} disagrees with {source}/config.json "
                             f"vocab_size {model} (leave it out to take the model's)")
    return vocab_size


def split_stream(cfg: Config, tokenizer: PreTrainedTokenizerFast, split: CorpusSplit) -> tuple[np.ndarray, np.ndarray]:
    """One split's token stream and its words per token; a pretrained tokenizer's lines end with a newline and its
    unknown tokens count."""
    if not cfg.tokenizer.pretrained:
        return encode_with_words(tokenizer.backend_tokenizer, split.lines)
    stream, token_words = encode_with_words(tokenizer.backend_tokenizer, [line + "\n" for line in split.lines])
    unk = tokenizer.unk_token_id
    share = float(np.mean(stream == unk)) if unk is not None and len(stream) else 0.0
    if share > MAX_UNKNOWN_SHARE:
        raise TokenizerError(f"{cfg.tokenizer.pretrained}: maps {share:.1%} of the corpus tokens "
                             f"({', '.join(split.sources)}) to its unknown token {tokenizer.unk_token!r} "
                             f"(at most {MAX_UNKNOWN_SHARE:.0%}): it does not fit this text")
    return stream, token_words


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
