"""`kdcache data`: corpus -> tokenizer -> fixed-length token sequences in the run's Zarr store.

Each split becomes one token stream (lines in order, no `<s>`/`</s>` between them: the BabyLlama
convention; every line starts with the tokenizer's prefix space, so words stay words), cut into
sequences of `data.seq_len` at fixed boundaries: the teachers' targets are cached per position,
so sequence i must mean the same tokens forever. The final partial sequence is dropped.
"""

from __future__ import annotations

import itertools
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from kdcache.cache import schema
from kdcache.cache.lock import lock_store
from kdcache.cache.layout import local_path
from kdcache.cache.manifest import MANIFEST, seal_store
from kdcache.cache.storage import StoreFiles
from kdcache.config import Config, RunPaths, run_paths
from kdcache.cache.schema import StoreError
from kdcache.files import staged
from kdcache.precompute.corpus import CorpusError, CorpusSplit, build_corpus
from kdcache.precompute.tokenizer import TokenizerError, train_tokenizer

SPLITS = ("train", "dev")
ENCODE_BATCH = 10_000  # lines per encode_batch call: parallel in Rust, bounded Python memory


def encode_stream(tokenizer: Tokenizer, lines: list[str]) -> np.ndarray:
    """All lines as one int32 token stream, without special tokens."""
    parts = [np.zeros(0, np.int32)]
    for start in range(0, len(lines), ENCODE_BATCH):
        encodings = tokenizer.encode_batch(lines[start : start + ENCODE_BATCH], add_special_tokens=False)
        parts.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32))
    return np.concatenate(parts)


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
    with staged_store(paths.store) as tmp:
        root = schema.create_store(str(tmp), attrs)
        for split in SPLITS:
            stream = encode_stream(tokenizer.backend_tokenizer, corpus[split].lines)
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
        arr = root[f"{schema.TOKENS}/{split}"]
        lines.append(f"{split}: {arr.attrs['lines']:,} lines, {arr.attrs['tokens']:,} tokens -> "
                     f"{arr.shape[0]:,} sequences of {arr.shape[1]} ({arr.attrs['dropped_tokens']} dropped)")
    lines.append(f"vocab {root.attrs['vocab_size']:,}; wrote {paths.corpus}, {paths.tokenizer}, {paths.store}")
    return "\n".join(lines)
