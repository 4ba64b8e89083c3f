"""Shared builders of the trainer, evaluation and export tests: a tiny byte-level BPE tokenizer trained on BLiMP
sentences, a token store in the kdcache schema, and a run config with tiny teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kdcache.config import Config, DataConfig, EvalConfig, ModelConfig, TeacherConfig, TokenizerConfig, TrainConfig, load_config, run_paths
from kdcache.cache.manifest import seal_store
from kdcache.cache.schema import create_store, tokenizer_sha256, write_tokens
from shared_data import SHARED_DATA

BLIMP = SHARED_DATA / "blimp"
SEQ = 16
VOCAB = 320
SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2}
TINY_LLAMA = ModelConfig(arch="llama", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_position=SEQ)
TINY_GPT2 = ModelConfig(arch="gpt2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_position=SEQ,
                        tie_embeddings=True)


def blimp_lines(paradigms: int = 20, per_paradigm: int = 60) -> list[str]:
    """Good and bad sentences of the first lines of several BLiMP files: text with the benchmark's words."""
    files = sorted(BLIMP.glob("*.jsonl"))[:paradigms]
    if not files:  # else every test built on these lines fails on an empty tokenizer, far from the cause
        raise FileNotFoundError(f"{BLIMP}: no BLiMP paradigms (*.jsonl); the shared data is read from ../shared/data "
                                f"or $KDCACHE_SHARED_DATA")
    lines = []
    for path in files:
        for line in path.read_text().splitlines()[:per_paradigm]:
            item = json.loads(line)
            lines += [item["sentence_good"], item["sentence_bad"]]
    return lines


def make_tokenizer(out_dir: Path, lines: list[str], vocab_size: int = VOCAB) -> Path:
    """The project's tokenizer recipe (NFKC, ByteLevel with prefix space, <pad> <s> </s> = 0 1 2), tiny."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(out_dir)
    tok.model.save(str(out_dir))  # vocab.json, merges.txt
    return out_dir


def make_store(path: Path, tokenizer_dir: Path, lines: list[str], seq_len: int = SEQ, dev_fraction: float = 0.1) -> Path:
    """Lines -> one token stream per split -> fixed [N, seq_len] sequences, as `kdcache data` writes them."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    root = create_store(str(path), {"seq_len": seq_len, "vocab_size": vocab, "special_ids": SPECIAL_IDS,
                                    "tokenizer_sha256": tokenizer_sha256(tokenizer_dir)})
    n_dev = int(len(lines) * dev_fraction)
    for split, part in (("train", lines[n_dev:]), ("dev", lines[:n_dev])):
        stream = np.array([i for e in tokenizer.encode_batch(part, add_special_tokens=False) for i in e.ids])
        n = len(stream) // seq_len
        write_tokens(root, split, stream[: n * seq_len].reshape(n, seq_len), 64, Config(name="x").cache.codec, vocab)
    seal_store(path)
    return path


def make_run(root: Path, teachers: list[TeacherConfig], lines: list[str], **config) -> Config:
    """A config file under root (loaded like a user's) with its run's tokenizer and store already built."""
    cfg = Config(name="tiny", tokenizer=TokenizerConfig(vocab_size=VOCAB), data=DataConfig(seq_len=SEQ),
                 teachers=teachers, eval=EvalConfig(batch_size=16), **config)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    cfg = load_config(path)
    paths = run_paths(cfg, root / "runs")
    make_tokenizer(paths.tokenizer, lines)
    make_store(paths.store, paths.tokenizer, lines)
    return cfg


def tiny_train(**overrides) -> TrainConfig:
    settings = dict(lr=3e-3, batch_size=8, epochs=1.0, warmup_steps=3, checkpoint_every=1000, log_every=1)
    return TrainConfig(**{**settings, **overrides})
