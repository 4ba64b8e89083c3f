"""Bad input: config keys, types and ranges, corpus files, `show` positions and teachers, a teacher whose logits
are NaN or beyond float16, a pretrained tokenizer or teacher that does not fit. Each is one clear line (exit 2)
naming the file, key or sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import kdcache.precompute.targets as targets
from kdcache.cache.schema import completed_shards, open_store, read_tokens
from faultlib import Run, invoke
from helpers_pretrained import SEED, SENTENCES, demo_words, hub_config, save_random_llama, save_word_tokenizer
from test_mismatch import edit_config, user_error
from test_precompute import tree


@pytest.fixture
def config(cached_run: Run, tmp_path: Path) -> Run:
    """A copy of the shared run's config whose runs root is empty: a config it accepts would start a new run."""
    path = tmp_path / "tiny.yaml"
    path.write_text(cached_run.config.read_text())
    return Run(path, tmp_path / "runs")


@pytest.mark.parametrize("changes, needles", [
    ({"distil": {}}, ["unknown key 'distil' (did you mean 'distill'?"]),
    ({"student_train.batch_sise": 8}, ["student_train: unknown key 'batch_sise' (did you mean 'batch_size'?"]),
    ({"data.seq_len": "32"}, ["data.seq_len: expected int, got str '32'"]),
    ({"cache.temperatures": 2.0}, ["cache.temperatures: expected a list, got float"]),
    ({"distill.form": 3}, ["distill.form: expected str, got int 3"]),
], ids=["misspelt_section", "misspelt_key", "string_for_int", "scalar_for_list", "int_for_str"])
def test_unknown_keys_and_wrong_types_name_the_key(config, changes, needles):
    user_error(invoke("data", *edit_config(config, changes).args()), str(config.config), *needles)
    assert not config.runs.exists()


SIZES = [  # at least one of every section's sizes, counts, rates and weights
    ("corpus.demo_train_sentences", 0, "corpus.demo_train_sentences must be >= 1, got 0"),
    ("tokenizer.min_frequency", -1, "tokenizer.min_frequency must be >= 1, got -1"),
    ("tokenizer.vocab_size", 0, "tokenizer.vocab_size must be >= 259, got 0"),
    ("data.seq_len", 1, "data.seq_len must be >= 2, got 1"),
    ("data.sequences_per_shard", 0, "data.sequences_per_shard must be >= 1, got 0"),
    ("teachers.0.model.num_heads", 0, "teachers[0].model.num_heads must be >= 1, got 0"),
    ("teachers.1.model.hidden_size", 33,
     "teachers[1].model.hidden_size 33 must be a multiple of teachers[1].model.num_heads 2"),
    ("teachers.0.model.max_position", 16, "teachers[0].model.max_position must be >= data.seq_len"),
    ("teachers.1.train.lr", 0.0, "teachers[1].train.lr must be > 0, got 0.0"),
    ("teachers.0.train.warmup_steps", -1, "teachers[0].train.warmup_steps must be >= 0, got -1"),
    ("cache.k", 0, "cache.k must be >= 1, got 0"),
    ("cache.k", 401, "cache.k must be <= tokenizer.vocab_size"),
    ("cache.temperatures", [1.0, -2.0], "cache.temperatures[1] must be > 0, got -2.0"),
    ("cache.samples", -1, "cache.samples must be >= 0, got -1"),
    ("cache.samples", 70000, "cache.samples must be <= 65535"),
    ("cache.sample_temperature", 0.0, "cache.sample_temperature must be > 0, got 0.0"),
    ("cache.batch_size", 0, "cache.batch_size must be >= 1, got 0"),
    ("cache.codec.clevel", 10, "cache.codec.clevel must be in 0..9, got 10"),
    ("student.num_layers", 0, "student.num_layers must be >= 1, got 0"),
    ("student.intermediate_size", -64, "student.intermediate_size must be >= 1, got -64"),
    ("student_train.batch_size", -4, "student_train.batch_size must be >= 1, got -4"),
    ("student_train.grad_accum", 0, "student_train.grad_accum must be >= 1, got 0"),
    ("student_train.epochs", 0.0, "student_train.epochs must be > 0, got 0.0"),
    ("student_train.max_steps", 0, "student_train.max_steps must be >= 1, got 0"),
    ("student_train.log_every", 0, "student_train.log_every must be >= 1, got 0"),
    ("student_train.checkpoint_every", 0, "student_train.checkpoint_every must be >= 1, got 0"),
    ("student_train.eval_every", -1, "student_train.eval_every must be >= 0, got -1"),
    ("student_train.num_workers", -1, "student_train.num_workers must be >= 0, got -1"),
    ("student_train.grad_clip", -1.0, "student_train.grad_clip must be >= 0, got -1.0"),
    ("distill.hard_weight", -0.5, "distill.hard_weight must be >= 0, got -0.5"),
    ("distill.teacher_weights", {"tl": -1.0}, "distill.teacher_weights.tl must be >= 0, got -1.0"),
    ("distill.hidden.weight", -0.1, "distill.hidden.weight must be >= 0, got -0.1"),
    ("distill.hidden.mapping", {"9": ["tl", 1]}, "distill.hidden.mapping.9: ['tl', 1] is not [teacher, layer] under a "
                                                 "student layer in 0..2"),
    ("eval.batch_size", 0, "eval.batch_size must be >= 1, got 0"),
    ("study", {"seeds": [], "variants": {"kd": {}}}, "study.seeds must list at least one seed"),
    ("study", {"seeds": [1], "variants": {"short": {"student_train": {"max_steps": -1}}}},
     "study.variants.short: student_train.max_steps must be >= 1, got -1"),
]


@pytest.mark.parametrize("key, value, message", SIZES, ids=[f"{key}={value}" for key, value, _ in SIZES])
def test_a_size_out_of_range_is_refused_naming_the_key(config, key, value, message):
    user_error(invoke("data", *edit_config(config, {key: value}).args()), f"{config.config}: {message}")
    assert not config.runs.exists()


# ---------------------------------------------------------------------------------------------------------------
# The corpus


@pytest.fixture
def babylm(cached_run: Run, config: Run, tmp_path: Path) -> Run:
    """The config on a BabyLM-format corpus: text/train/a.train and text/dev/a.dev (the shared run's demo text)."""
    for split in ("train", "dev"):
        (tmp_path / "text" / split).mkdir(parents=True)
        text = (cached_run.runs / "tiny" / "corpus" / f"{split}.txt").read_text()
        (tmp_path / "text" / split / f"a.{split}").write_text(text)
    return edit_config(config, {"corpus": {"kind": "babylm", "train": [str(tmp_path / "text" / "train")],
                                           "dev": [str(tmp_path / "text" / "dev")]}})


CORPUS = {  # the train directory's state -> what the error says about it
    "missing": (None, "not found (from"),
    "empty_directory": ({}, "has no *.train, *.dev or *.test files"),
    "empty_file": ({"a.train": b""}, "a.train: file is empty"),
    "blank_lines": ({"a.train": b"\n  \n\t\n"}, "a.train: no text left after cleaning"),
    "binary_file": ({"b.train": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"}, "b.train: line 1: not valid UTF-8"),
    "nul_bytes": ({"b.train": b"a line\nanother\0line\n"}, "b.train: line 2: a NUL byte at byte 14: a binary file"),
    "latin1": ({"b.train": "one\ntwo\ncaf\u00e9\n".encode("latin-1")}, "b.train: line 3: not valid UTF-8"),
}


@pytest.mark.parametrize("case", CORPUS)
def test_a_bad_corpus_is_refused_naming_the_file(babylm, tmp_path, case):
    files, message = CORPUS[case]
    train = tmp_path / "text" / "train"
    (train / "a.train").unlink()
    if files is None:
        train.rmdir()
    for name, data in (files or {}).items():
        (train / name).write_bytes(data)
    user_error(invoke("data", *babylm.args()), str(train), message)
    assert not (babylm.runs / "tiny" / "cache.zarr").exists()


def test_a_line_longer_than_a_sequence_runs_on_across_sequence_boundaries(babylm, tmp_path):
    """Lines are packed into one stream: a line of many sequences' tokens is cut at the fixed boundaries like any
    other stretch of the stream; nothing of it is truncated or dropped (but the stream's final partial sequence)."""
    train = tmp_path / "text" / "train" / "a.train"
    lines = train.read_text().splitlines()
    lines = lines[:10] + [" ".join(lines[10:1010])] + lines[1010:]
    train.write_text("\n".join(lines) + "\n")
    result = invoke("data", *babylm.args())
    assert result.exit_code == 0, result.output
    root = open_store(str(babylm.store))
    tokens = read_tokens(root, "train")
    tokenizer = Tokenizer.from_file(str(babylm.runs / "tiny" / "tokenizer" / "tokenizer.json"))
    stream = [i for line in lines for i in tokenizer.encode(line, add_special_tokens=False).ids]
    assert root["tokens/train"].attrs["lines"] == len(lines)
    assert len(tokenizer.encode(lines[10], add_special_tokens=False).ids) > 100 * tokens.shape[1]
    assert tokens.ravel().tolist() == stream[:tokens.size] and len(stream) - tokens.size < tokens.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# `kdcache show` and `stats` on positions and teachers the store does not have


@pytest.mark.parametrize("args, message", [
    (["show", "--seq", 1347], "--seq 1347 is out of range: split 'train' has sequences 0..1346"),
    (["show", "--seq", -1], "--seq -1 is out of range"),
    (["show", "--seq", 0, "--pos", 32], "--pos 32 is out of range: sequences have positions 0..31"),
    (["show", "--seq", 0, "--pos", -1], "--pos -1 is out of range"),
    (["show", "--seq", 0, "--split", "test"], "no split 'test'"),
    (["show", "--seq", 0, "--teacher", "tx"], "unknown teacher 'tx'"),
    (["show", "--seq", 0, "-T", 0], "must both be positive"),
    (["stats", "--sample", 0], "--sample 0 must be positive"),
    (["stats", "--teacher", "TL"], "unknown teacher 'TL'"),
], ids=["seq_past_end", "seq_negative", "pos_past_end", "pos_negative", "split", "teacher", "temperature",
        "sample", "teacher_case"])
def test_show_and_stats_refuse_what_the_store_does_not_have(cached_run, args, message):
    command, *options = args
    user_error(invoke(command, cached_run.store, *options), message)


# ---------------------------------------------------------------------------------------------------------------
# Numerics: a teacher whose logits are NaN or overflow float16


def poison(monkeypatch, store: Path, split: str, sequence: int, value: float) -> None:
    """Every teacher's forward returns `value` at position 5 of one sequence (found by its tokens)."""
    target = torch.from_numpy(read_tokens(open_store(str(store)), split)[sequence].astype(np.int64))
    forward = targets.forward

    def poisoned(model, ids, hidden=False):
        out = forward(model, ids, hidden)
        if len(hit := (ids == target).all(1).nonzero()):
            out.logits[hit[0, 0], 5, 7] = value
        return out

    monkeypatch.setattr(targets, "forward", poisoned)


def test_nan_or_float16_overflow_in_a_teacher_is_refused_and_never_stored(fresh_run, monkeypatch):
    store = fresh_run.store
    with monkeypatch.context() as patch:
        poison(patch, store, "train", 70, float("nan"))  # shard 1 of 64-sequence shards
        user_error(invoke("precompute", "--overwrite", *fresh_run.args()),
                   "teacher 'tl': NaN or inf targets at train sequence 70, position 5", "that shard is not written")
    groups = {name: open_store(str(store))[f"teachers/{name}/train"] for name in ("tl", "tg", "ensemble")}
    assert all(completed_shards(g)[:2].tolist() == [True, False] for g in groups.values())
    with monkeypatch.context() as patch:  # a logit beyond float16's range would be stored as inf
        poison(patch, store, "dev", 1, 1e5)
        user_error(invoke("precompute", *fresh_run.args()),
                   "teacher 'tl': NaN or inf targets at dev sequence 1, position 5")
    problems = json.loads(invoke("verify", store, "--json").output)["problems"]
    assert problems and not [p for p in problems if "NaN" in p], problems  # incomplete, but nothing non-finite stored
    assert invoke("precompute", *fresh_run.args()).exit_code == 0  # the teacher mended, a rerun completes the store
    assert invoke("verify", store).output.strip().endswith(": ok")


# ---------------------------------------------------------------------------------------------------------------
# A pretrained tokenizer or teacher that does not fit (helpers_pretrained): one line each (exit 2) before any model
# runs; the run's store and tokenizer left as they were.

SMALL_IDS = 2_000


@pytest.fixture
def small_hub(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A 2,000-id tokenizer + model directory (HUB_TEACHER) and the hub config of a fresh runs root."""
    tokenizer = save_word_tokenizer(tmp_path / "tok", demo_words(SEED, SENTENCES), SMALL_IDS, first_word=1_000)
    model_dir = save_random_llama(tmp_path / "model", tokenizer, vocab_size=SMALL_IDS)
    monkeypatch.setenv("HUB_TEACHER", str(model_dir))
    return model_dir, hub_config(tmp_path)


def refused(config: Path, step: str, *needles: str) -> str:
    """`kdcache <step>` on the config exits 2 with one line holding the needles."""
    runs = config.parent / "runs"
    return user_error(invoke(step, "--config", str(config), "--runs-root", str(runs), *(
        ("--device", "cpu") if step == "precompute" else ())), *needles)


def test_a_tokenizer_without_tokenizer_json_is_refused(small_hub, tmp_path):
    model_dir, config = small_hub
    slow_only = tmp_path / "slow"
    slow_only.mkdir()
    (slow_only / "tokenizer_config.json").write_bytes((model_dir / "tokenizer_config.json").read_bytes())
    (slow_only / "vocab.json").write_text('{"a": 0}')  # a slow-only tokenizer: its files, no tokenizer.json
    edit_config(Run(config, tmp_path / "runs"), {"tokenizer.pretrained": str(slow_only)})
    refused(config, "data", f"{slow_only}: no tokenizer.json", "fast tokenizer")
    edit_config(Run(config, tmp_path / "runs"), {"tokenizer.pretrained": str(tmp_path / "missing")})
    refused(config, "data", f"{tmp_path / 'missing'}: cannot load tokenizer.pretrained")
    assert not (tmp_path / "runs" / "hub_teacher" / "cache.zarr").exists()


def test_a_vocab_size_that_disagrees_with_the_tokenizer_leaves_the_store_unchanged(small_hub, tmp_path):
    _, config = small_hub
    run = Run(config, tmp_path / "runs")
    assert invoke("data", *run.args()).exit_code == 0
    before = tree(run.store), tree(run.store.parent / "tokenizer")
    edit_config(run, {"tokenizer.vocab_size": SMALL_IDS - 1})
    refused(config, "data", "tokenizer.vocab_size 1999 is smaller than the ids of the tokenizer", "(0..1999)")
    edit_config(run, {"tokenizer.vocab_size": SMALL_IDS + 64})
    refused(config, "data", f"tokenizer.vocab_size {SMALL_IDS + 64} disagrees with",
            f"config.json vocab_size {SMALL_IDS}")
    assert (tree(run.store), tree(run.store.parent / "tokenizer")) == before


def test_a_corpus_the_tokenizer_does_not_know_is_refused(small_hub, tmp_path, monkeypatch):
    tokenizer = save_word_tokenizer(tmp_path / "few", demo_words(SEED, SENTENCES)[:20], SMALL_IDS, first_word=1_000)
    monkeypatch.setenv("HUB_TEACHER", str(save_random_llama(tmp_path / "few_model", tokenizer, SMALL_IDS)))
    refused(small_hub[1], "data", "of the corpus tokens", "to its unknown token '<unk>' (at most 1%)")
    assert not (tmp_path / "runs" / "hub_teacher" / "tokenizer").exists()


def test_a_teacher_of_smaller_vocabulary_or_a_lossy_tokenizer_is_refused(small_hub, tmp_path):
    """A smaller vocabulary is refused before its weights load; a teacher with its own tokenizer is cached across
    tokenizers, unless that tokenizer loses the text's bytes (this one knows two words)."""
    model_dir, config = small_hub
    run = Run(config, tmp_path / "runs")
    assert invoke("data", *run.args()).exit_code == 0
    narrow = tmp_path / "narrow"  # a config and tokenizer without weights: refused before any would be read
    narrow.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (narrow / name).write_bytes((model_dir / name).read_bytes())
    config_json = json.loads((model_dir / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config_json, "vocab_size": SMALL_IDS - 500}))
    edit_config(run, {"teachers.0.pretrained": str(narrow)})
    refused(config, "precompute", f"({narrow}) has vocab_size 1500", f"has vocab_size {SMALL_IDS}")
    other = save_word_tokenizer(tmp_path / "other", ["a", "b"], SMALL_IDS, first_word=1_000)
    other_model = save_random_llama(tmp_path / "other_model", other, SMALL_IDS)
    edit_config(run, {"teachers.0.pretrained": str(other_model)})
    refused(config, "precompute", f"({other_model}): its tokenizer", "does not reproduce the bytes of 100.0% of")
    assert "teachers" not in open_store(str(run.store))
