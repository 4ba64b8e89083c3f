"""`kdcache precompute`: run each teacher once over the token splits and cache its targets in the store.

Per teacher and split (`teachers/<name>/<split>/`, layout in cache.schema): the top-k logits and ids, the
full-vocabulary logsumexp at every cached temperature, optionally N sampled ids with counts, and optional
hidden layers. With `cache.ensemble` all teachers see each batch together and the top-k of their mean logits
is cached as the group "ensemble" as well.

Work is split into whole shards: a shard's targets are computed batch by batch, assembled in host memory,
written array by array as whole shard files (cache.encoder), and only then marked complete. A rerun skips
complete shards, so a killed run resumes to the same bytes; under torchrun rank r computes shards r, r+W, ... The
group attributes carry a digest of everything that determines the targets, and a group computed with other
settings or another teacher is never extended (--overwrite recomputes it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
import torch
import torch.distributed as dist
import zarr
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from kdcache import __version__
from kdcache.cache import FORMAT_VERSION
from kdcache.config import CacheConfig, Config, ConfigError, load_config, run_paths
from kdcache.cache.schema import (
    COMPLETE, NOT_DIGESTED, TEACHERS, TOKENS, ArraySpec, StoreError, canonical_json, completed_shards,
    create_teacher_split, num_shards, open_store, settings_digest, sha256_file, shard_range, splits as store_splits,
    teacher_array_specs,
)
from kdcache.precompute.writer import ShardWriter

ENSEMBLE = "ensemble"
# Config keys that name the checkout or the load, not the model.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
MAX_SAMPLES = np.iinfo(np.uint16).max  # sample_counts are uint16


@dataclass
class Teacher:
    name: str
    model: PreTrainedModel
    identity: dict[str, Any]  # source, arch, config, weights_sha256
    hidden_layers: list[int]  # HF hidden_states indices (0 = embeddings)


@dataclass
class GroupPlan:
    """One `teachers/<name>` group to fill: its arrays and its attributes (settings_digest included)."""

    name: str
    specs: dict[str, ArraySpec]
    attrs: dict[str, Any]


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


# ---------------------------------------------------------------------------------------------------------------
# Targets from logits (all on the teacher's device).


def logsumexps(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """logsumexp(logits / T) over the full vocabulary for each T, [..., n_T], computed in float32."""
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True)
    return torch.stack([(x - m).div(t).exp().sum(dim=-1).log() + m[..., 0] / t for t in temperatures], dim=-1)


@functools.cache
def _fused_logsumexps() -> Callable[[torch.Tensor, list[float]], torch.Tensor]:
    # On CUDA the compiled form fuses the upcast, scaling and exponentials into a few passes over the logits instead
    # of materialising float32 copies (at batch 128 x 128, vocab 16000, each copy is 1 GB: slower than the forward).
    return torch.compile(logsumexps, dynamic=True)


def logsumexps_by_rows(logits: torch.Tensor, temperatures: list[float], argmax: torch.Tensor,
                       rows: int = 16) -> torch.Tensor:
    """`logsumexps` for a CPU, `rows` positions at a time (their passes stay in cache), each temperature through
    torch.log_softmax, whose vectorised kernel is the fastest full pass torch has on a CPU: logsumexp(z) =
    max(z) - log_softmax(z)[argmax], `argmax` [...] being each position's top-1 id. At [16, 128, 16000] on 2
    cores: 9-10 us per position, against 47 for torch.logsumexp over 64 rows at a time; 3e-6 from float64."""
    flat, at = logits.reshape(-1, logits.shape[-1]), argmax.reshape(-1, 1)
    out = torch.empty(flat.shape[0], len(temperatures), device=logits.device)
    for start in range(0, flat.shape[0], rows):
        chunk, chunk_at = flat[start:start + rows].float(), at[start:start + rows]
        top = chunk.gather(-1, chunk_at)
        for j, t in enumerate(temperatures):
            scaled = torch.log_softmax(chunk if t == 1 else chunk / t, dim=-1)
            out[start:start + rows, j] = (top / t - scaled.gather(-1, chunk_at))[:, 0]
    return out.reshape(*logits.shape[:-1], len(temperatures))


def topk_targets(logits: torch.Tensor, k: int, temperatures: list[float]) -> dict[str, torch.Tensor]:
    """Top-k logits (float16, descending), their ids, and logsumexp(logits / T) per T in float32."""
    values, ids = logits.topk(k, dim=-1)
    if logits.is_cuda:
        lse = _fused_logsumexps()(logits, temperatures)
    else:
        lse = logsumexps_by_rows(logits, temperatures, ids[..., 0])
    return {"topk_logits": values.half(), "topk_ids": ids, "lse": lse}


def sample_counts(logits: torch.Tensor, n: int, temperature: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` draws with replacement from softmax(logits / temperature) per position, as unique ids and counts.

    Returns ([..., min(n, V)] ids, counts), sorted by count descending then id ascending (a total order, so the
    bytes do not depend on sort stability), padded with id 0 / count 0.
    """
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.reshape(-1, vocab).float() / temperature, dim=-1)
    draws = torch.multinomial(probs, n, replacement=True, generator=generator).sort(dim=1).values
    # Run-length encode each sorted row: run index of every draw, then counts and ids per run.
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = starts.long().cumsum(dim=1) - 1
    counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, run, draws)  # every draw of a run has the same id
    key = torch.where(counts > 0, counts * vocab + (vocab - 1 - ids), 0)
    key = key.sort(dim=1, descending=True).values[:, : min(n, vocab)]
    counts = key // vocab
    ids = torch.where(counts > 0, vocab - 1 - key % vocab, 0)
    shape = (*logits.shape[:-1], key.shape[1])
    return ids.reshape(shape), counts.reshape(shape)


def quantize_int8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-position int8: value ~= q * scale, scale = absmax / 127 stored as float16."""
    scale = (hidden.abs().amax(dim=-1) / 127).half()
    s = scale.float().unsqueeze(-1)  # quantise against the stored (rounded) scale
    q = torch.where(s > 0, hidden / s.clamp_min(torch.finfo(torch.float32).tiny), 0)
    return q.round().clamp(-127, 127).to(torch.int8), scale


def hidden_targets(hidden: torch.Tensor, layer: int, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "float16":
        return {f"hidden_{layer}": hidden.half()}
    q, scale = quantize_int8(hidden.float())
    return {f"hidden_{layer}": q, f"hidden_{layer}_scale": scale}


def shard_generator(seed: int, teacher: str, split: str, shard: int, device: torch.device) -> torch.Generator:
    """Sampling RNG of one shard, a function of (seed, teacher, split, shard) only: resumed and multi-rank runs
    draw the same samples."""
    digest = hashlib.sha256(canonical_json([seed, teacher, split, shard]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # float32 on CPU


def forward(model: PreTrainedModel, ids: torch.Tensor, hidden: bool = False) -> Any:
    with _autocast(ids.device):
        return model(input_ids=ids, output_hidden_states=hidden, use_cache=False)


def batch_targets(teachers: list[Teacher], ids: torch.Tensor, cache: CacheConfig,
                  generators: dict[str, torch.Generator], ensemble: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Every group's arrays for one batch of token ids [B, L]."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    total = None
    for teacher in teachers:
        result = forward(teacher.model, ids, hidden=bool(teacher.hidden_layers))
        logits = result.logits  # bfloat16 under autocast: top-k is exact on it, the float32 math upcasts
        arrays = topk_targets(logits, cache.k, cache.temperatures)
        if cache.samples:
            arrays["sample_ids"], arrays["sample_counts"] = sample_counts(
                logits, cache.samples, cache.sample_temperature, generators[teacher.name])
        for layer in teacher.hidden_layers:
            arrays.update(hidden_targets(result.hidden_states[layer], layer, cache.hidden_dtype))
        out[teacher.name] = arrays
        if ensemble:
            total = logits.float() if total is None else total + logits.float()
    if ensemble:
        out[ENSEMBLE] = topk_targets(total / len(teachers), cache.k, cache.temperatures)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Teachers: location, identity, compatibility with the store.


def teacher_source(cfg: Config, name: str, runs_root: str | os.PathLike = "runs") -> str:
    """A pretrained teacher's directory or hub id, else the model `kdcache teachers` trained (which must exist)."""
    source = run_paths(cfg, runs_root).teacher_model(cfg.teacher(name))
    if not cfg.teacher(name).pretrained and not Path(source).is_dir():
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


def check_tokenizer(name: str, source: str, store: str, store_sha: str) -> None:
    """Refuse a teacher whose tokenizer.json differs from the one the store's tokens were made with."""
    path = cached_file(source, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    if path is not None and (sha := sha256_file(path)) != store_sha:
        raise StoreError(f"teacher {name!r} ({source}) uses another tokenizer than the store {store}: "
                         f"tokenizer.json sha256 {sha} != store tokenizer_sha256 {store_sha}")


def load_teacher(cfg: Config, name: str, source: str, store: str, store_attrs: dict[str, Any],
                 device: torch.device) -> Teacher:
    check_tokenizer(name, source, store, store_attrs["tokenizer_sha256"])
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    if config.vocab_size != store_attrs["vocab_size"]:
        raise StoreError(f"teacher {name!r} ({source}) has vocab_size {config.vocab_size}, "
                         f"the store {store} has vocab_size {store_attrs['vocab_size']}")
    layers = sorted(cfg.cache.hidden_layers.get(name, []))
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
    return Teacher(name, model.to(device).eval(), identity, layers)


# ---------------------------------------------------------------------------------------------------------------
# Groups: attributes, digest, refusal of changed settings, creation.


def _common_attrs(cfg: Config, specs: dict[str, ArraySpec], modes: list[str], store_attrs: dict[str, Any],
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


def _with_digest(attrs: dict[str, Any]) -> dict[str, Any]:
    return {**attrs, "settings_digest": settings_digest(attrs)}


def teacher_plan(cfg: Config, teacher: Teacher, store_attrs: dict[str, Any], precision: str) -> GroupPlan:
    cache = cfg.cache
    hidden_size = teacher.model.config.hidden_size
    specs = teacher_array_specs(cache.k, store_attrs["vocab_size"], len(cache.temperatures), cache.samples,
                                {layer: hidden_size for layer in teacher.hidden_layers}, cache.hidden_dtype)
    sampled = cache.samples > 0
    modes = ["topk"] + ["sampled"] * sampled + ["hidden"] * bool(teacher.hidden_layers)
    attrs = {
        **teacher.identity,
        **_common_attrs(cfg, specs, modes, store_attrs, precision),
        "hidden_layers": teacher.hidden_layers,
        "hidden_dtype": cache.hidden_dtype if teacher.hidden_layers else None,
        "samples": cache.samples,
        "sample_temperature": cache.sample_temperature if sampled else None,
        "sample_seed": cfg.seed if sampled else None,
    }
    return GroupPlan(teacher.name, specs, _with_digest(attrs))


def ensemble_plan(cfg: Config, teachers: list[Teacher], store_attrs: dict[str, Any], precision: str) -> GroupPlan:
    cache = cfg.cache
    specs = teacher_array_specs(cache.k, store_attrs["vocab_size"], len(cache.temperatures), 0, {}, cache.hidden_dtype)
    members = {t.name: settings_digest({k: t.identity[k] for k in ("arch", "config", "weights_sha256")})
               for t in teachers}
    attrs = {
        "source": ENSEMBLE,
        "arch": ENSEMBLE,
        "ensemble_of": [t.name for t in teachers],
        "members": members,
        **_common_attrs(cfg, specs, ["topk", "ensemble"], store_attrs, precision),
        "hidden_layers": [],
        "hidden_dtype": None,
        "samples": 0,
        "sample_temperature": None,
    }
    return GroupPlan(ENSEMBLE, specs, _with_digest(attrs))


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
                                     cfg.data.sequences_per_shard, cfg.cache.codec)


def prepare_groups(root: zarr.Group, store: str, plans: list[GroupPlan], cfg: Config, overwrite: bool,
                   rank: int, world: int) -> None:
    """Refuse groups made with other settings (unless overwrite), then rank 0 creates what is missing."""
    problems = [f"teacher group {plan.name!r} {why}" for plan in plans
                if (why := _mismatch(root, plan, cfg.cache.splits))]
    if problems and not overwrite:
        raise StoreError(f"{store}: " + "; ".join(problems) + ". Rerun with --overwrite to recompute it.")
    _barrier(world)  # every rank has read the old state before rank 0 changes it
    if rank == 0:
        _create_groups(root, plans, cfg, overwrite)
    _barrier(world)


# ---------------------------------------------------------------------------------------------------------------
# The run.


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise ConfigError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) under torchrun; (0, 1, False) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


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
              device: torch.device, rank: int, world: int, writers: int) -> PrecomputeStats:
    """Compute and write this rank's incomplete shards of every split for one set of teachers."""
    cache, per_shard = cfg.cache, cfg.data.sequences_per_shard
    ensemble = any(plan.name == ENSEMBLE for plan in plans)
    stats = PrecomputeStats(rank=rank)
    layout = {plan.name: plan.specs for plan in plans}
    writer = ShardWriter(store, layout, per_shard, root.attrs["seq_len"], device, writers)
    start = time.perf_counter()
    ok = False
    try:
        for split in cache.splits:
            tokens = root[f"{TOKENS}/{split}"]
            n, seq_len = tokens.shape
            groups = {plan.name: root[f"{TEACHERS}/{plan.name}/{split}"] for plan in plans}
            done = {name: completed_shards(group) for name, group in groups.items()}
            mine = range(rank, num_shards(n, per_shard), world)
            work = [(shard, todo) for shard in mine
                    if (todo := {name: group.path for name, group in groups.items() if not done[name][shard]})]
            stats.shards_skipped += len(mine) - len(work)
            shard_ids = _read_ahead(tokens, [shard for shard, _ in work], per_shard)
            desc = f"{'+'.join(t.name for t in teachers)} {split}"
            for (shard, todo), ids in tqdm(zip(work, shard_ids), total=len(work), desc=desc, unit="shard",
                                           disable=rank != 0):
                rows = shard_range(shard, n, per_shard)
                generators = {t.name: shard_generator(cfg.seed, t.name, split, shard, device)
                              for t in teachers} if cache.samples else {}
                buffers = writer.buffers()
                for lo in range(0, len(rows), cache.batch_size):
                    batch = ids[lo:lo + cache.batch_size].to(device, non_blocking=True)
                    targets = batch_targets(teachers, batch, cache, generators, ensemble)
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
    torch_device = resolve_device(device)
    writers = default_writers(torch_device) if writers is None else writers
    if writers < 1:
        raise ConfigError(f"writers {writers}: need at least one thread compressing shards")
    rank, world, owns_group = _init_distributed(torch_device)
    try:
        store = str(store or run_paths(cfg, runs_root).store)
        root = open_store(store, mode="r+")
        store_attrs = _store_attrs(root, store, cfg.cache.splits)
        names = _selected_teachers(cfg, teachers)
        if cfg.cache.samples > MAX_SAMPLES:
            raise ConfigError(f"{cfg.source_path}: cache.samples {cfg.cache.samples} > {MAX_SAMPLES} "
                              "(sample counts are uint16)")
        if cfg.cache.ensemble and ENSEMBLE in names:
            raise ConfigError(f"{cfg.source_path}: a teacher may not be named {ENSEMBLE!r} when cache.ensemble is on")
        precision = "bfloat16-autocast" if torch_device.type == "cuda" else "float32"
        stats = PrecomputeStats(rank=rank)
        for pass_names in [names] if cfg.cache.ensemble else [[name] for name in names]:
            loaded = [load_teacher(cfg, name, teacher_source(cfg, name, runs_root), store, store_attrs, torch_device)
                      for name in pass_names]
            plans = [teacher_plan(cfg, t, store_attrs, precision) for t in loaded]
            if cfg.cache.ensemble:
                plans.append(ensemble_plan(cfg, loaded, store_attrs, precision))
            prepare_groups(root, store, plans, cfg, overwrite, rank, world)
            with torch.inference_mode():
                stats.add(_run_pass(root, store, loaded, plans, cfg, torch_device, rank, world, writers))
            del loaded
        _barrier(world)
        return stats
    finally:
        if owns_group:
            dist.destroy_process_group()


@torch.inference_mode()
def forward_only_throughput(model: PreTrainedModel, tokens: np.ndarray | torch.Tensor, batch_size: int,
                            device: str | torch.device) -> float:
    """Positions per second of the bare teacher forward over tokens [N, L] in batches, as precompute runs it
    (same autocast, no targets, no copies): the ceiling `PrecomputeStats.tokens_per_s` is measured against."""
    device = torch.device(device)
    model.to(device)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    forward(model, ids[:batch_size].to(device))  # warm-up: allocator, kernels
    synchronize(device)
    start = time.perf_counter()
    for lo in range(0, len(ids), batch_size):
        forward(model, ids[lo:lo + batch_size].to(device))
    synchronize(device)
    return ids.numel() / (time.perf_counter() - start)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): what a wall-clock timing needs around it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
