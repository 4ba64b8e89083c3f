"""The BabyLM track's word budget, checked before step 1: the words each model of a run will see, from the store's
words per sequence and the exact data order, refused when over the track's limits (config `babylm.track`).

Limits (BabyLM 2025 rules, kept for 2026): strict-small trains on a 10M-word corpus and sees at most 100M words
(10 epochs); strict and interaction on 100M and 1B. The check is per model: the student, and each teacher kdcache
trains (BabyLM counts the training data of every model in the pipeline; the reports list each one's words seen so
that a user can apply the year's accounting). A pretrained teacher's own training is not known here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from kdcache.cache import schema
from kdcache.cache.manifest import checked_manifest
from kdcache.cache.schema import StoreError
from kdcache.cache.words import read_word_counts
from kdcache.config import Config, TrainConfig, run_paths
from kdcache.student.checkpoint import TrainError
from kdcache.student.loop import total_steps
from kdcache.student.words import MILLION, plan_words

TRACK_LIMITS = {"strict-small": (10 * MILLION, 100 * MILLION), "strict": (100 * MILLION, 1000 * MILLION),
                "interaction": (100 * MILLION, 1000 * MILLION)}  # track -> (corpus words, words seen)


@dataclass(frozen=True)
class PlannedModel:
    """One model a command is about to train: its name in messages, its training section's key, settings and seed."""

    name: str
    key: str
    train: TrainConfig
    seed: int
    store: Path | None = None  # the token store it trains on (a teacher with its own tokenizer); None: the run's


def student_models(cfg: Config, key: str = "student_train") -> list[PlannedModel]:
    return [PlannedModel("the student", key, cfg.student_train, cfg.seed)]


def teacher_models(cfg: Config, names: tuple[str, ...] = (), stores: dict[str, Path] | None = None) -> list[PlannedModel]:
    """The teachers kdcache trains (every one, or those named), pretrained ones left out; `stores`: the own token
    store of each teacher with its own tokenizer (its words and sequences are its own text's cut)."""
    stores = stores or {}
    return [PlannedModel(f"teacher {t.name}", f"teachers[{i}].train", t.train, cfg.seed, stores.get(t.name))
            for i, t in enumerate(cfg.teachers) if not t.pretrained and (not names or t.name in names)]


def study_models(cfg: Config) -> list[PlannedModel]:
    """Every student of the study (variant x seed), keyed by the section that sets its length."""
    models = []
    for name, variant in cfg.study.variants.items():
        own = {"epochs", "max_steps"} & set(variant.student_train)
        key = f"study.variants.{name}.student_train" if own else "student_train"
        models += [PlannedModel(f"study student {name} (seed {seed})", key, cfg.variant(name, seed).student_train,
                                seed) for seed in cfg.study.seeds]
    return models


def _length_key(model: PlannedModel) -> str:
    field = "max_steps" if model.train.max_steps else "epochs"
    value = getattr(model.train, field)
    return f"{model.key}.{field} {value:,}" if field == "max_steps" else f"{model.key}.{field} {value:g}"


def _store_words(store: Path, track: str) -> tuple[zarr.Group, np.ndarray | None]:
    """A token store's root and its words per train sequence (None: not recorded, refused when a track is set)."""
    checked_manifest(store, "train", [])  # a damaged token or words document is named before zarr reads it
    root = schema.open_store(str(store))
    words = read_word_counts(root, "train")
    if words is None and track != "none":
        raise StoreError(f"{store}: records no words per sequence (written by an older kdcache), so babylm.track "
                         f"{track} cannot be checked: run `kdcache upgrade {store}`")
    return root, words


def check_word_budget(cfg: Config, runs_root: str | Path, models: list[PlannedModel]) -> dict[str, int | None]:
    """The words each model will see (None when the store records no words); a run over the track's limits, or a
    word schedule it cannot follow, is refused before anything is trained or written."""
    track = cfg.babylm.track
    stores = {None: _store_words(run_paths(cfg, runs_root).store, track)}
    seen = {}
    for model in models:
        if model.store not in stores:
            stores[model.store] = _store_words(model.store, track)
        root, words = stores[model.store]
        total = total_steps(model.train, root[f"{schema.TOKENS}/train"].shape[0])
        plan = plan_words(model.train, words, model.seed, total, f"{cfg.source_path}: {model.key}")
        seen[model.name] = plan.total if plan is not None else None
    if track == "none":
        return seen
    corpus_limit, seen_limit = TRACK_LIMITS[track]
    corpus = stores[None][0][f"{schema.WORDS}/train"].attrs["words"]
    if corpus > corpus_limit:
        raise TrainError(f"{cfg.source_path}: the train split holds {corpus:,} words, over the {track} track's "
                         f"{corpus_limit:,}-word corpus (babylm.track); use the track's corpus, or another track")
    for model in models:
        if seen[model.name] > seen_limit:
            setting = _length_key(model)
            raise TrainError(f"{cfg.source_path}: {setting} makes {model.name} see {seen[model.name]:,} words, over "
                             f"the {track} track's {seen_limit:,} (babylm.track); lower {setting.split()[0]}")
    return seen
