"""`kdcache precompute`: run each teacher once over the token splits and cache its targets in the store.

Per teacher and split (`teachers/<name>/<split>/`, layout in cache.schema): the top-k logits and ids, the
full-vocabulary logsumexp at every cached temperature, optionally N sampled ids with counts, and optional
hidden layers (precompute.targets). With `cache.ensemble` all teachers see each batch together and the top-k of
their mean logits is cached as the group "ensemble" as well.

Work is split into whole shards: a shard's targets are computed batch by batch, assembled in host memory,
written array by array as whole shard files (precompute.writer), and only then marked complete. A rerun skips
complete shards, so a killed run resumes to the same bytes; under torchrun rank r computes shards r, r+W, ...
One writer at a time: rank 0 holds the store's write lock (cache.lock) for the whole run; a full disk stops the
run with a StoreError, leaving only complete shards.
Groups computed with other settings are refused (precompute.plan).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import zarr

from kdcache.cache.schema import (
    COMPLETE, ENSEMBLE, TEACHERS, TOKENS, StoreError, completed_shards, num_shards, open_store,
    shard_range, splits as store_splits,
)
from kdcache.cache.lock import lock_store
from kdcache.cache.layout import local_path
from kdcache.cache.manifest import seal_store, unseal_store
from kdcache.config import Config, ConfigError, run_paths
from kdcache.precompute.cross_tokenizer import CrossTeacher, cross_pass, prepare_cross_teacher
from kdcache.precompute.plan import GroupPlan, ensemble_plan, prepare_groups, teacher_plan
from kdcache.precompute.targets import batch_targets, shard_generator
from kdcache.precompute.teachers import Teacher, load_teacher, teacher_source
from kdcache.precompute.writer import ShardWriter, refuse_full_disk
from kdcache.progress import with_progress
from kdcache.runtime import Dist, barrier, init_distributed


@dataclass
class PrecomputeStats:
    """What this rank computed. Positions are counted once per pass (all teachers of an ensemble pass together)."""

    rank: int = 0
    positions: int = 0
    seconds: float = 0.0
    writer_wait_s: float = 0.0  # of `seconds`, the compute loop waited for the writer: the store set the pace
    shards_written: int = 0
    shards_skipped: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: PrecomputeStats) -> None:
        self.positions += other.positions
        self.seconds += other.seconds
        self.writer_wait_s += other.writer_wait_s
        self.shards_written += other.shards_written
        self.shards_skipped += other.shards_skipped


def _store_attrs(root: zarr.Group, store: str, split_names: list[str]) -> dict[str, Any]:
    attrs = root.attrs.asdict()
    missing = [key for key in ("seq_len", "vocab_size", "tokenizer_sha256") if key not in attrs]
    if missing:
        raise StoreError(f"{store}: root attributes {missing} missing (run `kdcache data` first)")
    have = store_splits(root)
    absent = [split for split in split_names if split not in have]
    if absent:
        raise StoreError(f"{store}: no token splits {absent} (have {have}; run `kdcache data` first)")
    return attrs


def _run_pass(root: zarr.Group, store: str, teachers: list[Teacher], plans: list[GroupPlan], cfg: Config,
              d: Dist, writers: int) -> PrecomputeStats:
    """Compute and write this rank's incomplete shards of every split for one set of teachers."""
    cache, per_shard = cfg.cache, cfg.data.sequences_per_shard
    ensemble = any(plan.name == ENSEMBLE for plan in plans)
    stats = PrecomputeStats(rank=d.rank)
    layout = {plan.name: plan.specs for plan in plans}
    writer = ShardWriter(store, layout, per_shard, root.attrs["seq_len"], d.device, writers)
    start = time.perf_counter()
    ok = False
    try:
        for split in cache.splits:
            tokens = root[f"{TOKENS}/{split}"]
            n, seq_len = tokens.shape
            groups = {plan.name: root[f"{TEACHERS}/{plan.name}/{split}"] for plan in plans}
            done = {name: completed_shards(group) for name, group in groups.items()}
            mine = range(d.rank, num_shards(n, per_shard), d.world)
            work = [(shard, todo) for shard in mine
                    if (todo := {name: group.path for name, group in groups.items() if not done[name][shard]})]
            stats.shards_skipped += len(mine) - len(work)
            shard_ids = _read_ahead(tokens, [shard for shard, _ in work], per_shard)
            desc = f"{'+'.join(t.name for t in teachers)} {split}"
            for (shard, todo), ids in with_progress(zip(work, shard_ids), len(work), desc, "shard", disable=not d.main):
                rows = shard_range(shard, n, per_shard)
                generators = {t.name: shard_generator(cfg.seed, t.name, split, shard, d.device)
                              for t in teachers} if cache.samples else {}
                buffers = writer.buffers()
                for lo in range(0, len(rows), cache.batch_size):
                    batch = ids[lo:lo + cache.batch_size].to(d.device, non_blocking=True)
                    targets = batch_targets(teachers, batch, cache, generators, ensemble, (split, rows[lo]))
                    writer.stage(buffers, targets, slice(lo, lo + len(batch)))
                writer.submit(buffers, todo, shard, rows)
                stats.positions += len(rows) * seq_len
                stats.shards_written += 1
        ok = True
    finally:
        writer.close(cancel=not ok)
    stats.seconds = time.perf_counter() - start
    stats.writer_wait_s = writer.waited_s
    return stats


def _complete(root: zarr.Group, plans: list[GroupPlan], split_names: list[str]) -> bool:
    """Whether every split of every planned group exists with all of its shards complete (nothing to write)."""
    paths = [f"{TEACHERS}/{plan.name}/{split}" for plan in plans for split in split_names]
    return all(f"{path}/{COMPLETE}" in root and completed_shards(root[path]).all() for path in paths)


def _read_ahead(tokens: zarr.Array, shards: list[int], per_shard: int) -> Iterator[torch.Tensor]:
    """Each shard's token ids in order; the next shard is read on a background thread meanwhile."""
    def read(shard: int) -> torch.Tensor:
        return torch.from_numpy(tokens[shard * per_shard:(shard + 1) * per_shard].astype(np.int64))

    if not shards:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="kdcache-reader") as pool:
        upcoming = pool.submit(read, shards[0])
        for following in shards[1:] + [None]:
            ids = upcoming.result()
            if following is not None:
                upcoming = pool.submit(read, following)
            yield ids


def _selected_teachers(cfg: Config, teachers: list[str] | tuple[str, ...] | None) -> list[str]:
    every = [t.name for t in cfg.teachers]
    if not every:
        raise ConfigError(f"{cfg.source_path}: no teachers configured")
    if not teachers:
        return every
    for name in teachers:
        cfg.teacher(name)  # names an unknown teacher
    if cfg.cache.ensemble and sorted(teachers) != sorted(every):
        raise ConfigError(f"{cfg.source_path}: cache.ensemble needs every teacher in one pass; "
                          f"--teacher cannot select {sorted(teachers)} of {every}")
    return [name for name in every if name in teachers]


def default_writers(device: torch.device) -> int:
    """Threads compressing shards per rank: one on CPU (the cores run the teacher), else a share of the node's cores."""
    if device.type != "cuda":
        return 1
    per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_rank - 2))


def precompute_targets(cfg: Config, runs_root: str | os.PathLike = "runs", overwrite: bool = False,
                       teachers: list[str] | tuple[str, ...] | None = None, device: str | None = None,
                       store: str | None = None, writers: int | None = None) -> PrecomputeStats:
    """Cache the teachers' targets into the store (default runs/<name>/cache.zarr; any zarr path or URL).

    Each teacher is loaded once; with cache.ensemble all of them are loaded together. `writers` is the number
    of threads compressing shards (default `default_writers`). Returns this rank's stats.
    """
    d = init_distributed(device)
    store = str(store or run_paths(cfg, runs_root).store)
    with _write_lock(store, d):
        return _precompute(cfg, runs_root, overwrite, teachers, d, store, writers)


@contextmanager
def _write_lock(store: str, d: Dist) -> Iterator[None]:
    """Rank 0 holds the store's write lock (cache.lock) for the whole run; no rank writes before it has it."""
    lock, refused = None, None
    if d.main:
        try:
            lock = lock_store(store, "kdcache precompute")
        except StoreError as e:
            refused = str(e)
    if d.world > 1:
        message = [refused]
        dist.broadcast_object_list(message, src=0)
        refused = message[0]
    if refused:
        raise StoreError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _cross_teacher(cfg: Config, loaded: list[Teacher], root: zarr.Group, store: str, store_attrs: dict[str, Any],
                   runs_root: str | os.PathLike, precision: str) -> CrossTeacher | None:
    """The re-tokenised splits and plan of a pass's teacher with its own tokenizer, else None."""
    own = [t.name for t in loaded if t.tokenizer]
    if own and cfg.cache.ensemble:
        raise ConfigError(f"{cfg.source_path}: cache.ensemble averages logits over one vocabulary; teachers {own} "
                          "have their own tokenizers")
    return prepare_cross_teacher(cfg, loaded[0], root, store, store_attrs, runs_root, precision) if own else None


def _precompute(cfg: Config, runs_root: str | os.PathLike, overwrite: bool,
                teachers: list[str] | tuple[str, ...] | None, d: Dist, store: str, writers: int | None) -> PrecomputeStats:
    writers = default_writers(d.device) if writers is None else writers
    if writers < 1:
        raise ConfigError(f"writers {writers}: need at least one thread compressing shards")
    root = open_store(store, mode="r+")
    store_attrs = _store_attrs(root, store, cfg.cache.splits)
    names = _selected_teachers(cfg, teachers)
    if cfg.cache.ensemble and ENSEMBLE in names:
        raise ConfigError(f"{cfg.source_path}: a teacher may not be named {ENSEMBLE!r} when cache.ensemble is on")
    precision = "bfloat16-autocast" if d.device.type == "cuda" else "float32"
    stats = PrecomputeStats(rank=d.rank)
    for pass_names in [names] if cfg.cache.ensemble else [[name] for name in names]:
        loaded = [load_teacher(cfg, name, teacher_source(cfg, name, runs_root), store, store_attrs, d.device)
                  for name in pass_names]
        cross = _cross_teacher(cfg, loaded, root, store, store_attrs, runs_root, precision)
        plans = [cross.plan] if cross else [teacher_plan(cfg, t, store_attrs, precision) for t in loaded]
        if cfg.cache.ensemble:
            plans.append(ensemble_plan(cfg, loaded, store_attrs, precision))
        if d.main and (overwrite or not _complete(root, plans, cfg.cache.splits)):
            unseal_store(store)  # the store is about to change: its manifest no longer describes it until sealed again
        with refuse_full_disk(store, "creating the teacher groups"):
            prepare_groups(root, store, plans, cfg, overwrite, d)
        with torch.inference_mode():
            if cross:
                cross_pass(root, store, loaded[0], cross, cfg, d, stats)
            else:
                stats.add(_run_pass(root, store, loaded, plans, cfg, d, writers))
        del loaded
    barrier(d)
    if d.main:  # every rank's shards are in: record what the store now holds (cache.manifest)
        with refuse_full_disk(store, "writing the store's manifest"):
            seal_store(store)
    return stats
