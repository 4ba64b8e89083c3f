"""The rules a run config must meet beyond its types: every size and rate in range, sections that agree."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from kdcache.cache.schema import MAX_SAMPLES
from kdcache.typed_yaml import ConfigError

if TYPE_CHECKING:
    from kdcache.config import Config


# The range of every size, count, rate and weight, by field name (batch_size: the same in train, cache and eval).
AT_LEAST = {"seq_len": 2, "vocab_size": 259} | dict.fromkeys(  # vocab_size: 256 bytes + 3 specials
    ("demo_train_sentences", "demo_dev_sentences", "demo_pairs_per_phenomenon", "min_frequency", "sequences_per_shard",
     "k", "hidden_size", "intermediate_size", "num_layers", "num_heads", "batch_size", "grad_accum", "max_steps",
     "checkpoint_every", "log_every", "save_at_words"), 1) | dict.fromkeys(
    ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "num_workers", "hard_weight", "weight",
     "teacher_weights", "samples", "pairs_per_paradigm", "curve_pairs_per_paradigm"), 0)
POSITIVE = ("lr", "epochs", "temperatures", "sample_temperature")


def _range_problems(obj: Any, where: str = "") -> list[str]:
    """Every number of the dataclass `obj` (in its lists, mappings and dataclasses too) outside its range."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [("", value)]
        low, strict = (0, True) if f.name in POSITIVE else (AT_LEAST.get(f.name), False)
        for i, item in items:
            key = f"{where}{f.name}" + (f".{i}" if isinstance(value, dict) else f"[{i}]" if i != "" else "")
            if dataclasses.is_dataclass(item):
                problems += _range_problems(item, key + ".")
            elif type(item) in (int, float) and low is not None and not (item > low if strict else item >= low):
                problems.append(f"{key} must be {'>' if strict else '>='} {low}, got {item}")
    return problems


def _teacher_problems(cfg: Config) -> list[str]:
    """Keys that name a teacher name one; the hidden mapping is {student layer: [teacher, teacher layer]}."""
    names, n = {t.name for t in cfg.teachers}, cfg.student.num_layers
    problems = [f"{key!r} (in cache.hidden_layers or distill.teacher_weights) is not a teacher"
                for key in [*cfg.cache.hidden_layers, *cfg.distill.teacher_weights] if key not in names]
    for s, pair in cfg.distill.hidden.mapping.items():
        if not (s.isdigit() and int(s) <= n and isinstance(pair, list) and len(pair) == 2 and pair[0] in names
                and type(pair[1]) is int):
            problems.append(f"distill.hidden.mapping.{s}: {pair!r} is not [teacher, layer] under a student layer "
                            f"in 0..{n} (teachers: {sorted(names)})")
    return problems


def validate(cfg: Config) -> None:
    """Raise a ConfigError naming the file and the first rule `cfg` breaks."""
    checks = [
        (cfg.tokenizer.vocab_size is None or cfg.cache.k <= cfg.tokenizer.vocab_size,
         "cache.k must be <= tokenizer.vocab_size"),
        (1.0 in cfg.cache.temperatures, "cache.temperatures must include 1.0"),
        (cfg.distill.temperature in cfg.cache.temperatures,
         f"distill.temperature {cfg.distill.temperature} must be one of cache.temperatures"),
        (len({t.name for t in cfg.teachers}) == len(cfg.teachers), "teacher names must be unique"),
        (all(re.fullmatch(r"[A-Za-z0-9_.-]+", t.name) for t in cfg.teachers),
         "teacher names may use letters, digits, '_', '.', '-' only"),
        (cfg.corpus.kind == "demo" or bool(cfg.corpus.train), "corpus.train must list files or directories"),
        (cfg.distill.form != "sampled" or cfg.cache.samples > 0, "distill.form 'sampled' needs cache.samples > 0"),
        (cfg.cache.samples <= MAX_SAMPLES, f"cache.samples must be <= {MAX_SAMPLES} (counts are stored as uint16)"),
        (cfg.distill.form != "seed_exact" or cfg.cache.ensemble, "distill.form 'seed_exact' needs cache.ensemble: true"),
        (cfg.distill.form != "sampled" or cfg.distill.temperature == cfg.cache.sample_temperature,
         f"distill.temperature {cfg.distill.temperature} != cache.sample_temperature {cfg.cache.sample_temperature}: "
         "form 'sampled' trains on draws made at cache.sample_temperature, so the two must agree"),
        (len(set(cfg.study.seeds)) == len(cfg.study.seeds), "study.seeds must be distinct"),
        (not any(t.pretrained and t.tokenizer for t in cfg.teachers),
         "teachers[].tokenizer trains a teacher's own tokenizer; a pretrained teacher brings its own (drop one)"),
        (bool(cfg.study.seeds) or not cfg.study.variants, "study.seeds must list at least one seed"),
        (0 <= cfg.cache.codec.clevel <= 9, f"cache.codec.clevel must be in 0..9, got {cfg.cache.codec.clevel}"),
        ("@" not in cfg.cache.store.partition("://")[2].partition("/")[0],
         "cache.store holds credentials: set them in the environment (AWS_ACCESS_KEY_ID, ...), not in the config"),
    ]
    trains = [("student_train", cfg.student_train), *((f"teachers[{i}].train", t.train) for i, t in enumerate(cfg.teachers))]
    for key, train in trains:
        counts = train.save_at_words if isinstance(train.save_at_words, list) else []
        checks.append((all(a < b for a, b in zip(counts, counts[1:])),
                       f"{key}.save_at_words {counts} must be increasing (each count once)"))
    checks += [(t.model.max_position >= t.tokenizer.seq_len, f"teachers[{i}].model.max_position must be >= "
                f"teachers[{i}].tokenizer.seq_len") for i, t in enumerate(cfg.teachers) if t.tokenizer and t.tokenizer.seq_len]
    for key, m in [("student", cfg.student), *((f"teachers[{i}].model", t.model) for i, t in enumerate(cfg.teachers))]:
        checks += [(m.max_position >= cfg.data.seq_len, f"{key}.max_position must be >= data.seq_len"),
                   (m.num_heads < 1 or m.hidden_size % m.num_heads == 0,
                    f"{key}.hidden_size {m.hidden_size} must be a multiple of {key}.num_heads {m.num_heads}")]
    if problems := _range_problems(cfg) + _teacher_problems(cfg) + [message for ok, message in checks if not ok]:
        raise ConfigError(f"{cfg.source_path}: {problems[0]}")
