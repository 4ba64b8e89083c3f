"""The teacher groups a precompute pass fills: their arrays, attributes and settings digest, checked and created.

The group attributes carry a digest of everything that determines the targets, and a group computed with other
settings or another teacher is never extended (--overwrite recomputes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zarr

from kdcache import __version__
from kdcache.cache import FORMAT_VERSION
from kdcache.cache.schema import (
    COMPLETE, ENSEMBLE, NOT_DIGESTED, TEACHERS, TOKENS, ArraySpec, StoreError, create_teacher_split, settings_digest,
    teacher_array_specs,
)
from kdcache.config import Config
from kdcache.precompute.teachers import Teacher
from kdcache.runtime import Dist, barrier


@dataclass
class GroupPlan:
    """One `teachers/<name>` group to fill: its arrays and its attributes (settings_digest included)."""

    name: str
    specs: dict[str, ArraySpec]
    attrs: dict[str, Any]
    axis_lengths: dict[str, int] = field(default_factory=dict)  # arrays whose second axis is not seq_len


def common_attrs(cfg: Config, specs: dict[str, ArraySpec], modes: list[str], store_attrs: dict[str, Any],
                  precision: str) -> dict[str, Any]:
    return {
        "k": cfg.cache.k,
        "temperatures": list(cfg.cache.temperatures),
        "batch_size": cfg.cache.batch_size,  # batch shapes change low-order bits and the sampling streams
        "precision": precision,
        "modes": modes,
        "dtypes": {name: spec.dtype for name, spec in specs.items()},
        "tokenizer_sha256": store_attrs["tokenizer_sha256"],
        "format_version": FORMAT_VERSION,
        "kdcache_version": __version__,
    }


def with_digest(attrs: dict[str, Any]) -> dict[str, Any]:
    return {**attrs, "settings_digest": settings_digest(attrs)}


def teacher_plan(cfg: Config, teacher: Teacher, store_attrs: dict[str, Any], precision: str) -> GroupPlan:
    """One teacher's group: top-k and logsumexps, plus its samples and hidden layers when configured."""
    cache = cfg.cache
    hidden_size = teacher.model.config.hidden_size
    specs = teacher_array_specs(cache.k, store_attrs["vocab_size"], len(cache.temperatures), cache.samples,
                                {layer: hidden_size for layer in teacher.hidden_layers}, cache.hidden_dtype)
    sampled = cache.samples > 0
    modes = ["topk"] + ["sampled"] * sampled + ["hidden"] * bool(teacher.hidden_layers)
    attrs = {
        **teacher.identity,
        **common_attrs(cfg, specs, modes, store_attrs, precision),
        "hidden_layers": teacher.hidden_layers,
        "hidden_dtype": cache.hidden_dtype if teacher.hidden_layers else None,
        "samples": cache.samples,
        "sample_temperature": cache.sample_temperature if sampled else None,
        "sample_seed": cfg.seed if sampled else None,
    }
    return GroupPlan(teacher.name, specs, with_digest(attrs))


def ensemble_plan(cfg: Config, teachers: list[Teacher], store_attrs: dict[str, Any], precision: str) -> GroupPlan:
    """The ensemble group: top-k and logsumexps of the teachers' mean logits, identified by its members."""
    cache = cfg.cache
    specs = teacher_array_specs(cache.k, store_attrs["vocab_size"], len(cache.temperatures), 0, {}, cache.hidden_dtype)
    members = {t.name: settings_digest({k: t.identity[k] for k in ("arch", "config", "weights_sha256")})
               for t in teachers}
    attrs = {
        "source": ENSEMBLE,
        "arch": ENSEMBLE,
        "ensemble_of": [t.name for t in teachers],
        "members": members,
        **common_attrs(cfg, specs, ["topk", "ensemble"], store_attrs, precision),
        "hidden_layers": [],
        "hidden_dtype": None,
        "samples": 0,
        "sample_temperature": None,
    }
    return GroupPlan(ENSEMBLE, specs, with_digest(attrs))


def _mismatch(root: zarr.Group, plan: GroupPlan, split_names: list[str]) -> str | None:
    """Why the existing group cannot be extended with this plan's targets, or None."""
    path = f"{TEACHERS}/{plan.name}"
    if path not in root:
        return None
    old = root[path].attrs.asdict()
    if old.get("settings_digest") != plan.attrs["settings_digest"]:
        changed = [key for key in sorted(set(old) | set(plan.attrs))
                   if key not in NOT_DIGESTED and old.get(key) != plan.attrs.get(key)]
        shown = [f"{key}: {old.get(key)!r} -> {plan.attrs.get(key)!r}" if key not in ("config", "members")
                 else f"{key} changed" for key in changed]
        return "computed with other settings (" + "; ".join(shown or ["settings_digest"]) + ")"
    for split in split_names:
        group_path = f"{path}/{split}"
        tokens_digest = root[f"{TOKENS}/{split}"].attrs["digest"]
        if group_path in root and root[group_path].attrs.get("token_digest") != tokens_digest:
            return f"split {split!r} was computed on other tokens"
    return None


def _create_groups(root: zarr.Group, plans: list[GroupPlan], cfg: Config, overwrite: bool) -> None:
    for plan in plans:
        if overwrite and f"{TEACHERS}/{plan.name}" in root:
            del root[TEACHERS][plan.name]
        for split in cfg.cache.splits:
            # `complete` is created last: a split group without it was interrupted while being created.
            if f"{TEACHERS}/{plan.name}/{split}/{COMPLETE}" not in root:
                create_teacher_split(root, plan.name, split, plan.specs, plan.attrs,
                                     cfg.data.sequences_per_shard, cfg.cache.codec, plan.axis_lengths)


def prepare_groups(root: zarr.Group, store: str, plans: list[GroupPlan], cfg: Config, overwrite: bool,
                   d: Dist) -> None:
    """Refuse groups made with other settings (unless overwrite), then rank 0 creates what is missing."""
    problems = [f"teacher group {plan.name!r} {why}" for plan in plans
                if (why := _mismatch(root, plan, cfg.cache.splits))]
    if problems and not overwrite:
        raise StoreError(f"{store}: " + "; ".join(problems) + ". Rerun with --overwrite to recompute it.")
    barrier(d)  # every rank has read the old state before rank 0 changes it
    if d.main:
        _create_groups(root, plans, cfg, overwrite)
    barrier(d)
