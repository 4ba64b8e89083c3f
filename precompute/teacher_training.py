"""The teacher-training recipe: a teacher trained from scratch on the store's tokens by the student's trainer.

The one precompute module that imports `kdcache.student`: a teacher is trained exactly as a baseline student is
(plain next-token cross-entropy, same loop, checkpoints and export), only with its own shape and settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kdcache.cache import schema
from kdcache.cache.schema import StoreError
from kdcache.cache.words import read_word_counts
from kdcache.config import Config, TeacherConfig, run_paths
from kdcache.student.data import TokenDataset
from kdcache.student.lm import lm_loss
from kdcache.student.loop import train
from kdcache.student.model import build_model


def train_teacher(cfg: Config, teacher: TeacherConfig, runs_root: str | Path = "runs", resume: bool = False) -> Path:
    """Train one teacher from scratch on tokens/train of the run's store; returns its exported model directory."""
    paths = run_paths(cfg, runs_root)
    dataset = TokenDataset(paths.store, "train")
    if schema.tokenizer_sha256(paths.tokenizer) != dataset.attrs["tokenizer_sha256"]:
        raise StoreError(f"{paths.tokenizer}: not the tokenizer the tokens of {paths.store} were made with")
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
    dev = TokenDataset(paths.store, "dev") if teacher.train.eval_every else None
    train(model, dataset, teacher.train, out_dir, lm_loss, seed=cfg.seed, resume=resume,
          fingerprint=fingerprint, tokenizer_dir=paths.tokenizer, dev=dev,
          words=read_word_counts(schema.open_store(str(paths.store)), "train"))
    return out_dir / "model"
