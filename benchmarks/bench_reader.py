"""Item 3: random-batch read throughput per worker process (target >= 1.45M tokens/s: 5x the 290k tokens/s an
H200 trains the 58M student at).

One process, one thread, batches of 32 random sequences: tokens plus what the tail loss reads of two teachers
(topk_logits, topk_ids, lse). Read by `cache.reader.StoreReader`, by `student.kd.DistillDataset` (the
reader plus the conversion to tensors: what a DataLoader worker runs), by zarr-python (`oindex` on the same
arrays) and from .npy memory maps of the same arrays (the limit: no decoding at all). The store is also
re-encoded with other codecs (same arrays, written by `cache.encoder`) to show what the codec costs.

    python benchmarks/bench_reader.py [--profile cpu|seed|quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench_precompute import precompute_store
from benchlib import PROFILES, SPLIT, Section, Table, Target, run_section, subset_store
from kdcache.cache.schema import CodecSettings
from kdcache.cache.encoder import ShardedArrayWriter
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import (
    TEACHERS, TOKENS, create_teacher_split, mark_shard_complete, num_shards, open_store, shard_range,
    teacher_array_specs,
)
from kdcache.precompute.run import precompute_targets
from kdcache.student.kd import DistillDataset, KDPlan

TARGET = 1.45e6  # tokens/s per worker
BATCH = 32
ARRAYS = ["topk_logits", "topk_ids", "lse"]
DEFAULT = "lz4hc5, shuffle per array, sorted_key_delta, vocab_rank (default)"
# name -> (codec, store format whose layout the teacher arrays take: 1 = float16 logits, ids as they are, raw lse;
# 2 = ids as they are; 3 = as now)
RECODED = {"zstd1 bitshuffle, float16 logits, raw lse (format 1's default)": (CodecSettings("zstd", 1, "bitshuffle"), 1),
           "lz4hc5, shuffle per array, sorted_key_delta, ids as they are (format 2's default)": (CodecSettings(), 2),
           "zstd1 byte shuffle, sorted_key_delta, vocab_rank (smallest)": (CodecSettings("zstd", 1, "shuffle"), 3),
           "no Blosc": (CodecSettings(cname="none"), 3)}
SECONDS = 1.5  # per reader: enough batches to time, few enough to stay quick


def throughput(read: Callable[[np.ndarray], object], n: int, seq_len: int, seed: int = 0) -> float:
    """Tokens per second of `read(indices)` over random batches (3 untimed first), for about SECONDS."""
    rng = np.random.default_rng(seed)
    batches = [rng.choice(n, BATCH, replace=False) for _ in range(3)]
    for idx in batches:
        read(idx)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < SECONDS or count < 5:
        read(rng.choice(n, BATCH, replace=False))
        count += 1
    return count * BATCH * seq_len / elapsed


def npy_copies(store: str, keys: dict[str, str], workdir: Path) -> dict[str, np.ndarray]:
    """Every array as an .npy file, memory-mapped."""
    root = open_store(store)
    maps = {}
    for key, path in keys.items():
        file = workdir / f"{key.replace('/', '_')}.npy"
        np.save(file, root[path][...])
        maps[key] = np.load(file, mmap_mode="r")
    return maps


def recode(store: str, teachers: list[str], dst: Path, codec: CodecSettings, layout: int) -> str:
    """The same tokens and tail-loss arrays in a new store whose teacher arrays use `codec`, laid out as store
    format `layout` did."""
    src = open_store(store)
    n = src[f"{TOKENS}/{SPLIT}"].shape[0]
    per_shard = src[f"{TOKENS}/{SPLIT}"].attrs["per_shard"]
    root = open_store(subset_store(store, dst, n, per_shard), mode="r+")
    for teacher in teachers:
        attrs = src[f"{TEACHERS}/{teacher}"].attrs.asdict()
        specs = teacher_array_specs(attrs["k"], src.attrs["vocab_size"], len(attrs["temperatures"]), 0, {}, "float16")
        if layout <= 2:
            specs["topk_ids"] = dataclasses.replace(specs["topk_ids"], transform=None)
        if layout == 1:
            specs["topk_logits"] = dataclasses.replace(specs["topk_logits"], transform=None)
            specs["lse"] = dataclasses.replace(specs["lse"], compress=False)
        group = create_teacher_split(root, teacher, SPLIT, specs, attrs, per_shard, codec)
        for name in specs:
            values = src[f"{TEACHERS}/{teacher}/{SPLIT}/{name}"][...]
            writer = ShardedArrayWriter(str(dst), f"{group.path}/{name}")
            for shard in range(num_shards(n, per_shard)):
                rows = shard_range(shard, n, per_shard)
                writer.write(shard, values[rows.start:rows.stop])
        for shard in range(num_shards(n, per_shard)):
            mark_shard_complete(group, shard)
    return str(dst)


def readers(store: str, teachers: list[str]) -> dict[str, Callable[[np.ndarray], object]]:
    reader = StoreReader(store, teachers=teachers, arrays={t: ARRAYS for t in teachers}, split=SPLIT)
    plan = KDPlan({t: 0.25 for t in teachers}, "tail", 0.5, 2.0, {t: 1 for t in teachers})
    dataset = DistillDataset(store, SPLIT, plan, {})
    return {"cache.reader StoreReader.batch": reader.batch,
            "DistillDataset.__getitems__ (reader + tensors)": lambda idx: dataset.__getitems__(idx.tolist())}


def run(store: str, teachers: list[str], workdir: Path, data: str) -> Section:
    root = open_store(store)
    n, seq_len = root[f"{TOKENS}/{SPLIT}"].shape
    keys = {"input_ids": f"{TOKENS}/{SPLIT}",
            **{f"{t}/{a}": f"{TEACHERS}/{t}/{SPLIT}/{a}" for t in teachers for a in ARRAYS}}
    maps = npy_copies(store, keys, workdir)
    zarr_arrays = {key: root[path] for key, path in keys.items()}
    limit = throughput(lambda idx: {k: m[idx] for k, m in maps.items()}, n, seq_len)
    rows = [["npy memory maps (the limit)", "-", limit, 1.0]]
    default = readers(store, teachers)
    for name, read in default.items():
        rows.append([name, DEFAULT, throughput(read, n, seq_len), None])
    primary = rows[1][2]
    rows.append(["zarr-python oindex", DEFAULT,
                 throughput(lambda idx: {k: a.oindex[idx] for k, a in zarr_arrays.items()}, n, seq_len), None])
    for i, (codec_name, (codec, layout)) in enumerate(RECODED.items()):
        recoded = recode(store, teachers, workdir / f"recoded-{i}.zarr", codec, layout)
        for name, read in readers(recoded, teachers).items():
            rows.append([name, codec_name, throughput(read, n, seq_len), None])
    for row in rows:
        row[3] = row[2] / limit
    batch_mb = sum(m[:BATCH].nbytes for m in maps.values()) / 1e6
    table = Table(["reader", "teacher arrays' codec", "tokens/s per worker", "x npy limit"], rows,
                  f"{BATCH} x {seq_len} random batches, 2 teachers (topk_logits, topk_ids, lse), {batch_mb:.2f} MB "
                  f"per batch decoded, {n} sequences, warm page cache; one process, one thread")
    section = Section("3. Reader throughput per worker", [table], [
        Target("cache.reader tokens/s per worker (default codec)", primary, TARGET, at_least=True),
        Target("DistillDataset tokens/s per worker (default codec)", rows[2][2], TARGET, at_least=True),
    ])
    section.notes.append(f"Data: {data}.")
    return section


def standalone(bench: Callable[..., Section], *extra: object) -> None:
    """`bench(store, teachers, workdir, *extra)` on a store precomputed for --profile (random-init teachers on
    synthetic tokens), printed as markdown: a benchmark section run alone."""
    parser = argparse.ArgumentParser(description=bench.__module__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    profile = PROFILES[parser.parse_args().profile]
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        cfg, store = precompute_store(profile, Path(tmp))
        precompute_targets(cfg, device=profile.device, store=store)
        names = [t.name for t in cfg.teachers]
        print(run_section(bench, store, names, Path(tmp), *extra).markdown())


if __name__ == "__main__":
    standalone(run, "random-init teachers on synthetic tokens")
