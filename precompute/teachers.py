"""Which teacher precompute runs: where its weights come from, its identity, and its fit with the store.

A teacher's identity (source, architecture, config, weights' sha256) goes into its group's attributes, so a
group computed by another teacher is never extended. A teacher whose own tokenizer (the tokenizer.json in its
directory) differs from the store's is cached across tokenizers (precompute.cross_tokenizer); one with the
store's tokenizer but another vocabulary size is refused before its weights load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from kdcache.cache.schema import StoreError, sha256_file
from kdcache.config import Config, ConfigError, run_paths

# Config keys that name the checkout or the load, not the model.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Teacher:
    """A loaded teacher: its model and what identifies it in the store."""

    name: str
    model: PreTrainedModel
    identity: dict[str, Any]  # source, arch, config, weights_sha256
    hidden_layers: list[int]  # HF hidden_states indices (0 = embeddings)
    tokenizer: str | None = None  # its own tokenizer.json when it differs from the store's (cross-tokenizer)


def teacher_source(cfg: Config, name: str, runs_root: str | os.PathLike = "runs") -> str:
    """A pretrained teacher's directory or hub id, else the model `kdcache teachers` trained (which must exist)."""
    teacher = cfg.teacher(name)
    source = run_paths(cfg, runs_root).teacher_model(teacher)
    if not teacher.pretrained and not Path(source).is_dir():
        raise ConfigError(f"{cfg.source_path}: teacher {name!r} has no model at {source} "
                          "(train it with `kdcache teachers`, or set its `pretrained`)")
    return source


def weights_sha256(source: str, config: PretrainedConfig) -> str:
    """sha256 over the weight files' sha256s in name order; for a hub id, the resolved hub revision."""
    path = Path(source)
    if not path.is_dir():
        revision = getattr(config, "_commit_hash", None)
        if not revision:
            raise StoreError(f"{source}: no local directory and no hub revision to identify the teacher's weights")
        return revision
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    if not files:
        raise StoreError(f"{path}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()


def own_tokenizer(source: str, store_sha: str) -> str | None:
    """The teacher's tokenizer.json when it differs from the one the store's tokens were made with, else None."""
    path = cached_file(source, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    return path if path is not None and sha256_file(path) != store_sha else None


def check_teacher_vocab(name: str, source: str, store: str, store_attrs: dict[str, Any]) -> None:
    """Refuse a teacher whose vocabulary is not the store's, from its config.json alone (before any weight loads)."""
    config = AutoConfig.from_pretrained(source)
    if config.vocab_size != store_attrs["vocab_size"]:
        raise StoreError(f"teacher {name!r} ({source}) has vocab_size {config.vocab_size}, the store {store} has "
                         f"vocab_size {store_attrs['vocab_size']} (the run's tokenizer's ids and any padding)")


def load_teacher(cfg: Config, name: str, source: str, store: str, store_attrs: dict[str, Any],
                 device: torch.device) -> Teacher:
    """The teacher's model on `device` in eval mode, once its tokenizer, vocabulary and hidden layers fit."""
    tokenizer = own_tokenizer(source, store_attrs["tokenizer_sha256"])
    if tokenizer is None:  # the run's tokenizer: its vocabulary must be the store's, checked before weights load
        check_teacher_vocab(name, source, store, store_attrs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    layers = sorted(cfg.cache.hidden_layers.get(name, []))
    if tokenizer is not None and layers:
        raise ConfigError(f"{cfg.source_path}: cache.hidden_layers.{name}: teacher {name!r} ({source}) has its own "
                          "tokenizer: its hidden states are not cached (their positions are not the run's)")
    bad = [layer for layer in layers if not 0 <= layer <= config.num_hidden_layers]
    if bad:
        raise ConfigError(f"{cfg.source_path}: cache.hidden_layers.{name}: {bad} out of range "
                          f"(0..{config.num_hidden_layers}, 0 = embeddings)")
    identity = {
        "source": source,
        "arch": config.model_type,
        "config": {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items()
                   if k not in VOLATILE_CONFIG_KEYS},
        "weights_sha256": weights_sha256(source, config),
    }
    return Teacher(name, model.to(device).eval(), identity, layers, tokenizer)
