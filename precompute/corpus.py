"""The training text: BabyLM-format files (one utterance or paragraph per line), or the demo grammar.

`build_corpus` reads and cleans both splits, writes them to runs/<name>/corpus/{train,dev}.txt
and returns the lines with their provenance (source file -> sha256). For `corpus.kind: demo`
the lines come from `precompute.grammar`, which also writes the demo minimal pairs.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kdcache.config import CleaningConfig, Config, RunPaths
from kdcache.cache.schema import sha256_file
from kdcache.files import staged
from kdcache.precompute.grammar import generate_corpus, write_minimal_pairs
from kdcache.errors import KdcacheError

SPLIT_SUFFIXES = (".train", ".dev", ".test")
# CHAT speaker tiers (`*MOT:`, `*CHI:`) and switchboard turns (`A:`, `B:`), then a TAB or space.
SPEAKER_TAG = re.compile(r"^(?:\*[A-Z0-9]+|[AB]):[\t ]")
# Distinct seeds per generated artefact, so dev sentences are not a replay of train.
DEV_SEED_OFFSET = 1
PAIRS_SEED_OFFSET = 2


class CorpusError(KdcacheError):
    """Corpus input that cannot be used; the message names the file (and line)."""


@dataclass
class CorpusSplit:
    lines: list[str]
    sources: dict[str, str]  # source file (or generator) -> sha256


def clean_line(line: str, cleaning: CleaningConfig) -> str:
    if cleaning.nfkc:
        line = unicodedata.normalize("NFKC", line)
    if cleaning.strip_speaker_tags:
        line = SPEAKER_TAG.sub("", line, count=1)
    if cleaning.collapse_whitespace:
        line = " ".join(line.split())
    return line


def expand_entries(entries: list[str], where: str) -> list[Path]:
    """Config entries -> files; a directory stands for its `*.train` / `*.dev` / `*.test` files, sorted."""
    files = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SPLIT_SUFFIXES)
            if not found:
                raise CorpusError(f"{path}: directory (from {where}) has no *.train, *.dev or *.test files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"{path}: not found (from {where})")
    return files


def clean_lines(raw: list[str], cleaning: CleaningConfig) -> list[str]:
    lines = [clean_line(line, cleaning) for line in raw]
    return [line for line in lines if line.strip()] if cleaning.drop_empty_lines else lines


def read_lines(path: Path, cleaning: CleaningConfig) -> list[str]:
    """Strict UTF-8 text, no NUL byte (a leading byte-order mark is dropped); one line per utterance; `\\r\\n` endings
    tolerated."""
    data = path.read_bytes()
    if not data:
        raise CorpusError(f"{path}: file is empty")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{path}: line {line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if (nul := data.find(b"\0")) >= 0:  # valid UTF-8, but no text file holds one: a binary file
        line_no = data.count(b"\n", 0, nul) + 1
        raise CorpusError(f"{path}: line {line_no}: a NUL byte at byte {nul}: a binary file, not text")
    raw = text.split("\n")  # not splitlines(): U+2028 and friends are not line breaks in BabyLM files
    if raw[-1] == "":
        raw.pop()  # the final newline ends the last line; it does not start an empty one
    lines = clean_lines([line.removesuffix("\r") for line in raw], cleaning)
    if not lines:
        raise CorpusError(f"{path}: no text left after cleaning")
    return lines


def read_split(entries: list[str], cleaning: CleaningConfig, where: str) -> CorpusSplit:
    files = expand_entries(entries, where)
    lines = []
    for path in files:
        lines.extend(read_lines(path, cleaning))
    return CorpusSplit(lines, {str(path): sha256_file(path) for path in files})


def write_lines(path: Path, lines: list[str]) -> None:
    with staged(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def demo_corpus(cfg: Config, paths: RunPaths) -> dict[str, CorpusSplit]:
    """Sentences from the demo grammar (train and dev from different seeds) plus its minimal pairs."""
    corpus = {}
    for split, n, seed in (
        ("train", cfg.corpus.demo_train_sentences, cfg.seed),
        ("dev", cfg.corpus.demo_dev_sentences, cfg.seed + DEV_SEED_OFFSET),
    ):
        text_file = paths.corpus / f"{split}.txt"
        lines = clean_lines(generate_corpus(n, seed), cfg.corpus.cleaning)
        write_lines(text_file, lines)
        source = f"precompute.grammar.generate_corpus(num_sentences={n}, seed={seed})"
        corpus[split] = CorpusSplit(lines, {source: sha256_file(text_file)})
    with staged(paths.pairs) as tmp:
        write_minimal_pairs(tmp, cfg.corpus.demo_pairs_per_phenomenon, cfg.seed + PAIRS_SEED_OFFSET)
    return corpus


def build_corpus(cfg: Config, paths: RunPaths) -> dict[str, CorpusSplit]:
    """Read, clean and write the train and dev splits to runs/<name>/corpus/."""
    if cfg.corpus.kind == "demo":
        return demo_corpus(cfg, paths)
    corpus = {}
    for split, entries in (("train", cfg.corpus.train), ("dev", cfg.corpus.dev)):
        where = f"{cfg.source_path}: corpus.{split}"
        if not entries:
            raise CorpusError(f"{where} lists no files or directories")
        corpus[split] = read_split(entries, cfg.corpus.cleaning, where)
        write_lines(paths.corpus / f"{split}.txt", corpus[split].lines)
    return corpus
