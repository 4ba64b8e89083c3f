"""The teacher-training recipe: a teacher trained from scratch on the store's tokens by the student's trainer.

A teacher with its own tokenizer (`teachers[].tokenizer`) is trained on its own token store instead, made under
its directory from the run's cleaned text (tokenizer/, cache.zarr), and exported with that tokenizer, so that
`kdcache precompute` caches it across tokenizers.

The one precompute module that imports `kdcache.student`: a teacher is trained exactly as a baseline student is
(plain next-token cross-entropy, same loop, checkpoints and export), only with its own shape and settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from kdcache.cache import schema
from kdcache.cache.schema import StoreError, sha256_file
from kdcache.cache.words import read_word_counts
from kdcache.config import Config, RunPaths, TeacherConfig, run_paths
from kdcache.files import atomic_write
from kdcache.precompute.corpus import CorpusSplit
from kdcache.precompute.data import SPLITS, split_stream, write_store
from kdcache.precompute.tokenizer import train_tokenizer
from kdcache.student.data import TokenDataset
from kdcache.student.lm import lm_loss
from kdcache.student.loop import train
from kdcache.student.model import build_model


def own_token_store(cfg: Config, teacher: TeacherConfig, runs_root: str | Path) -> RunPaths:
    """A teacher's own tokenizer and token store (under its directory), made from the run's cleaned text by
    `kdcache data`'s steps; rebuilt when its tokenizer settings or that text changed."""
    paths, own = run_paths(cfg, runs_root), run_paths(cfg, runs_root).teacher_run(teacher.name)
    texts = {split: paths.corpus / f"{split}.txt" for split in SPLITS}
    if missing := [str(p) for p in texts.values() if not p.is_file()]:
        raise StoreError(f"{missing[0]}: the run's cleaned text is missing (run `kdcache data` first)")
    data = dataclasses.replace(cfg.data, seq_len=teacher.tokenizer.seq_len or cfg.data.seq_len)
    settings = {"tokenizer": dataclasses.asdict(teacher.tokenizer), "seq_len": data.seq_len,
                "text": {split: sha256_file(p) for split, p in texts.items()}}
    marker = own.root / "token_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings and own.store.is_dir():
        return own
    tok = teacher.tokenizer
    own.root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts["train"], tok.vocab_size, tok.min_frequency, own.tokenizer, tok.model)
    corpus = {split: CorpusSplit(p.read_text(encoding="utf-8").splitlines(), {str(p): settings["text"][split]})
              for split, p in texts.items()}
    if own.store.exists():
        shutil.rmtree(own.store)
    own_cfg = dataclasses.replace(cfg, data=data, tokenizer=dataclasses.replace(cfg.tokenizer, pretrained=None))
    streams = {split: split_stream(own_cfg, tokenizer, corpus[split]) for split in SPLITS}
    write_store(own_cfg, own, tokenizer, streams, corpus, len(tokenizer))
    atomic_write(marker, json.dumps(settings).encode())
    return own


def train_teacher(cfg: Config, teacher: TeacherConfig, runs_root: str | Path = "runs", resume: bool = False) -> Path:
    """Train one teacher from scratch on tokens/train of the run's store, or of its own token store when it has its
    own tokenizer; returns its exported model directory."""
    paths = run_paths(cfg, runs_root)
    tokens = own_token_store(cfg, teacher, runs_root) if teacher.tokenizer is not None else paths
    dataset = TokenDataset(tokens.store, "train")
    if schema.tokenizer_sha256(tokens.tokenizer) != dataset.attrs["tokenizer_sha256"]:
        raise StoreError(f"{tokens.tokenizer}: not the tokenizer the tokens of {tokens.store} were made with")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    model = build_model(teacher.model, dataset.attrs["vocab_size"], dataset.attrs["special_ids"])
    dataset.check_model(model.config)
    fingerprint = {
        "teacher": teacher.name,
        "model": dataclasses.asdict(teacher.model),
        "tokens": dataset.digest,
        "tokenizer_sha256": dataset.attrs["tokenizer_sha256"],
    }
    out_dir = paths.teacher(teacher.name)
    dev = TokenDataset(tokens.store, "dev") if teacher.train.eval_every else None
    train(model, dataset, teacher.train, out_dir, lm_loss, seed=cfg.seed, resume=resume,
          fingerprint=fingerprint, tokenizer_dir=tokens.tokenizer, dev=dev,
          words=read_word_counts(schema.open_store(str(tokens.store)), "train"))
    return out_dir / "model"
