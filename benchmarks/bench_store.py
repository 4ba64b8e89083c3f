"""Item 2: bytes per position of every cached array, per teacher and per codec (target: top-64 <= 150 B/position).

Each array of a precomputed store is re-encoded shard by shard with `cache.encoder.encode_shard` under every
codec tried, so a figure is exactly the shard files the store would hold with that codec (index and chunk
checksums included; the default codec's figure is checked against the files on disk). Lossless transforms of
`topk_logits` and `topk_ids` are encoded the same way and inverted to prove they are lossless.

Real teacher data: a small Llama trained here for 200 steps on BabyLM text (switchboard and the 2023 test
files) with a 16000-token BPE vocabulary, the seed's; and, when `make` built them here, the trained teachers of
runs/mini_real (BabyLM text, vocabulary 8000) and runs/demo (640 tokens: says little about a 16000-token cache).

    python benchmarks/bench_store.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from benchlib import (
    PROFILES, REPO, SPLIT, Profile, Section, Table, Target, bench_config, run_section, save_random_teacher,
    subset_store,
)
from kdcache.cache.codecs import ArrayTransform, decode_sorted_key_delta, encode_sorted_key_delta
from kdcache.config import ModelConfig, TrainConfig, load_config
from kdcache.cache.encoder import encode_shard
from kdcache.cache.layout import parse_layout
from kdcache.cache.schema import TEACHERS, StoreError, num_shards, open_store, shard_range
from kdcache.precompute.data import prepare_data
from kdcache.precompute.run import precompute_targets
from kdcache.student.model import build_model, count_parameters
from kdcache.student.data import TokenDataset
from kdcache.student.lm import lm_loss
from kdcache.student.loop import train

TARGET = 150.0  # bytes per position, top-64 (logits + ids + lse)
DEFAULT = "default: lz4hc5, shuffle per array"  # as stored: CodecSettings() and cache.schema's per-array shuffle
FORMAT1 = "zstd1 bitshuffle (format 1's default)"
CODECS: dict[str, dict | None] = {
    DEFAULT: {},  # the array's own blosc configuration (filled in by `measure`)
    "lz4hc5 bitshuffle": {"cname": "lz4hc", "clevel": 5, "shuffle": "bitshuffle"},
    "lz4hc5 byte shuffle": {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle"},
    FORMAT1: {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
    "zstd1 byte shuffle": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"},
    "zstd3 byte shuffle": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
    "lz4 byte shuffle": {"cname": "lz4", "clevel": 1, "shuffle": "shuffle"},
    "none": None,
}
TOPK = ("topk_logits", "topk_ids", "lse")
SAMPLED = ("sample_ids", "sample_counts")
REAL_STEPS = 200
TRAINED_RUNS = ("mini_real", "demo")  # runs whose teachers are measured when `make` has built them here
REAL_SHAPE = ModelConfig(arch="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                         max_position=128)


# ---------------------------------------------------------------------------------------------------------------
# Lossless transforms of the sorted top-k logits (float16, descending along the last axis).


def keys_from_max(values: np.ndarray) -> np.ndarray:
    """Column 0: the row max's key; column i: key(max) - key(v_i), the running sum of the format's differences."""
    out = encode_sorted_key_delta(values)
    np.cumsum(out[..., 1:], axis=-1, dtype=np.uint16, out=out[..., 1:])
    return out


def undo_keys_from_max(out: np.ndarray) -> np.ndarray:
    deltas = out.copy()
    deltas[..., 2:] = np.diff(out[..., 1:], axis=-1)
    return decode_sorted_key_delta(deltas)


def float_from_max(values: np.ndarray) -> np.ndarray:
    """Column 0: the row max; column i: float16(max - v_i). Exact only where the difference fits float16."""
    out = (values[..., :1].astype(np.float32) - values.astype(np.float32)).astype(np.float16)
    out[..., 0] = values[..., 0]
    return out


def undo_float_from_max(out: np.ndarray) -> np.ndarray:
    values = (out[..., :1].astype(np.float32) - out.astype(np.float32)).astype(np.float16)
    values[..., 0] = out[..., 0]
    return values


Transforms = dict[str, tuple[Callable, Callable]]  # name -> (encode, decode)
AS_IS = (lambda v: v, lambda v: v)
LOGIT_TRANSFORMS: Transforms = {
    "float16 as is (format 1)": AS_IS,
    "kdcache.sorted_key_delta (formats 2-3): max key + key(v[i-1]) - key(v[i])":
        (encode_sorted_key_delta, lambda e: decode_sorted_key_delta(e.copy())),
    "max key + key(max) - key(v[i])": (keys_from_max, undo_keys_from_max),
    "row max + float16(max - v[i])": (float_from_max, undo_float_from_max),
}


def id_transforms(ranked: ArrayTransform) -> Transforms:
    """The ids as they are, and as the store's kdcache.vocab_rank codec ranks them."""
    return {"ids as they are (formats 1-2)": AS_IS,
            "kdcache.vocab_rank (format 3): rank by count in the split's tokens":
                (ranked.encode_array, lambda e: ranked.decode_array(e.copy()))}


# ---------------------------------------------------------------------------------------------------------------
# Measuring a store.


AS_STORED = "as stored"


def encoded_nbytes(array_dir: Path, values: np.ndarray, blosc: dict | None,
                   transform: ArrayTransform | None | str = AS_STORED) -> int:
    """Total bytes of the shard files of `values` under the array's layout with `blosc` (None: no Blosc, {}: the
    array's own) and `transform` (None: none, AS_STORED: the array's own kdcache codec, if any)."""
    stored = parse_layout(array_dir)
    transform = stored.transform if transform is AS_STORED else transform
    layout = dataclasses.replace(stored, blosc=stored.blosc if blosc == {} else blosc, transform=transform,
                                 dtype=np.dtype(np.uint16 if transform else values.dtype).newbyteorder("<"))
    n, per_shard = layout.shape[0], layout.per_shard
    shards = [shard_range(s, n, per_shard) for s in range(num_shards(n, per_shard))]
    return sum(len(encode_shard(layout, values[rows.start:rows.stop])) for rows in shards)


def disk_nbytes(array_dir: Path) -> int:
    return sum(p.stat().st_size for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")


def cell(nbytes: int, raw: int, positions: int) -> str:
    return f"{nbytes / positions:.1f} ({raw / nbytes:.2f}x)"


def measure(store: str, teachers: dict[str, str], judged: list[str]) -> Section:
    """Tables of bytes per position for the teachers {name: description} of `store`; targets for `judged`."""
    root = open_store(store)
    per_array, transforms, totals, targets, notes = [], [], [], [], []
    for name, description in teachers.items():
        group = root[f"{TEACHERS}/{name}/{SPLIT}"]
        directory = Path(store) / group.path
        n, seq_len, k = group["topk_logits"].shape
        positions = n * seq_len
        best: dict[str, tuple[int, str]] = {}  # array -> (fewest bytes, how): any codec, for logits and ids any transform
        format1 = 0  # top-k as format 1 stored it: float16 logits and ids under zstd1 bitshuffle, lse raw
        format2 = 0  # as format 2 did: the ids as they are, the rest as now
        for array in [a for a in (*TOPK, *SAMPLED) if a in group]:
            values = group[array][...]
            sizes = {codec: encoded_nbytes(directory / array, values, blosc) for codec, blosc in CODECS.items()}
            on_disk = disk_nbytes(directory / array)
            if sizes[DEFAULT] != on_disk:
                notes.append(f"{name}/{array}: re-encoded {sizes[DEFAULT]} B but {on_disk} B on disk")
            per_array.append([description, array, f"{values.nbytes / positions:.1f}", f"{on_disk / positions:.1f}",
                              *[cell(size, values.nbytes, positions) for size in sizes.values()]])
            best[array] = min((size, codec) for codec, size in sizes.items())
            stored = parse_layout(directory / array).transform
            if array == "topk_logits" or (array == "topk_ids" and stored):
                options = LOGIT_TRANSFORMS if array == "topk_logits" else id_transforms(stored)
                best[array] = transform_rows(description, array, directory / array, values, positions, options,
                                             transforms)
            if array in TOPK:
                format1 += encoded_nbytes(directory / array, values, CODECS["none" if array == "lse" else FORMAT1],
                                          transform=None)
                format2 += (encoded_nbytes(directory / array, values, {}, transform=None) if array == "topk_ids"
                            else sizes[DEFAULT])
        topk_default = sum(disk_nbytes(directory / a) for a in TOPK) / positions
        topk_best = sum(best[a][0] for a in TOPK) / positions
        how = "; ".join(f"{a.removeprefix('topk_')}: {best[a][1]}" for a in TOPK)
        sampled = sum(disk_nbytes(directory / a) for a in SAMPLED if a in group) / positions
        totals.append([description, root.attrs["vocab_size"], positions, format1 / positions, format2 / positions,
                       topk_default, topk_best, how, sampled if "sample_ids" in group else "-"])
        if name in judged:
            targets.append(Target(f"top-{k} B/position, default codec, {description}", topk_default, TARGET,
                                  at_least=False))
    codec_names = list(CODECS)
    return Section("2. Store size per position", [
        Table(["teacher", "vocab", "positions", "top-k B/position: format 1 (zstd1 bitshuffle, float16 logits)",
               "format 2 (lz4hc, sorted_key_delta)", "format 3 default (+ vocab_rank ids), on disk",
               "best lossless", "best: how",
               "sampled ids + counts B/position, default codec"], totals,
              "Totals (top-k = topk_logits + topk_ids + lse)"),
        Table(["teacher", "array", "raw B/position", "on disk", *codec_names], per_array,
              "Bytes per position (compression ratio) per array and codec, shard index and chunk crc32c included; "
              "topk_logits and topk_ids through their kdcache codecs (format 3)"),
        Table(["teacher", "array", "stored as", "lossless on this data", *codec_names], transforms,
              "Transforms of topk_logits and topk_ids, bytes per position (the codec columns' shuffle applies to "
              "the transform's output)"),
    ], targets, notes)


def transform_rows(description: str, array: str, array_dir: Path, values: np.ndarray, positions: int,
                   options: Transforms, rows: list[list]) -> tuple[int, str]:
    """Append a row per transform of the array; returns (fewest bytes, how) over lossless transforms and codecs."""
    candidates = []
    for transform, (encode, decode) in options.items():
        coded = encode(values)
        differ = int(np.count_nonzero(decode(coded).view(np.uint16) != values.view(np.uint16)))
        sizes = {codec: encoded_nbytes(array_dir, coded, blosc, transform=None) for codec, blosc in CODECS.items()}
        rows.append([description, array, transform,
                     f"no: {differ:,} of {values.size:,} values change" if differ else "yes",
                     *[f"{size / positions:.1f}" for size in sizes.values()]])
        if not differ:
            candidates += [(size, f"{transform}, {codec}") for codec, size in sizes.items()]
    return min(candidates)


# ---------------------------------------------------------------------------------------------------------------
# Real teachers.


def trained_run(name: str) -> tuple[str, dict[str, str]] | None:
    """runs/<name>'s store and trained teachers {name: model dir}, if `make` built them here (only the store's tokens
    are read: it may be of an older format)."""
    run = REPO / "runs" / name
    models = {p.parent.name: str(p) for p in sorted((run / "teachers").glob("*/model")) if (p / "config.json").is_file()}
    try:
        open_store(str(run / "cache.zarr"), any_version=True)
    except StoreError:
        return None
    return (str(run / "cache.zarr"), models) if models else None


def describe_trained(run: str, model_dir: str, vocab: int) -> str:
    """'<run> <teacher> (vocab V, N steps, train CE x)' from the teacher's metrics log."""
    log = Path(model_dir).parent / "metrics.jsonl"
    last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
    trained = f", {last['step']} steps, train CE {last['loss']:.2f}" if "loss" in last else ""
    return f"{run} {Path(model_dir).parent.name} (vocab {vocab:,}{trained})"


def trained_run_section(run: str, source: str, models: dict[str, str], profile: Profile, workdir: Path) -> Section:
    """Top-k and sampled targets of a run's trained teachers on 512 of its sequences, measured (and judged)."""
    seq_len = open_store(source, any_version=True).attrs["seq_len"]
    store = subset_store(source, workdir / f"{run}.zarr", 512, 128)
    vocab = open_store(store).attrs["vocab_size"]
    cfg = bench_config(vocab, seq_len, 128, models, k=profile.k, temperatures=[1.0, 2.0], samples=profile.samples,
                       batch_size=profile.precompute_batch)
    precompute_targets(cfg, device=profile.device, store=store)
    return measure(store, {name: describe_trained(run, path, vocab) for name, path in models.items()}, list(models))


def train_real_teacher(workdir: Path) -> tuple[str, Path, str]:
    """A small Llama trained for REAL_STEPS steps on BabyLM text; returns (token store, model dir, description)."""
    os.environ.setdefault("BABYLM_DIR", str(REPO.parent / "shared" / "data" / "babylm"))
    cfg = load_config(REPO / "configs" / "mini_real.yaml")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, vocab_size=16000))
    paths = prepare_data(cfg, workdir / "runs")
    dataset = TokenDataset(paths.store, SPLIT)
    model = build_model(REAL_SHAPE, dataset.attrs["vocab_size"], dataset.attrs["special_ids"])
    out = workdir / "real-teacher"
    settings = TrainConfig(lr=3e-3, batch_size=8, max_steps=REAL_STEPS, warmup_steps=20, checkpoint_every=10**9,
                           log_every=REAL_STEPS // 4)
    train(model, dataset, settings, out, lm_loss, seed=0, resume=False, fingerprint={}, tokenizer_dir=paths.tokenizer)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return str(paths.store), out / "model", (f"Llama {count_parameters(model) / 1e6:.1f}M trained {REAL_STEPS} steps "
                                             f"on BabyLM text (train CE {last['loss']:.2f})")


def real_stores(profile: Profile, workdir: Path, random_teachers: dict[str, Path]) -> tuple[Section, str, list[str]]:
    """Precompute real (and random-init) teachers' top-64 and sampled targets and measure them.

    Returns the section, the BabyLM-text store and the two teacher groups of it that hold trained targets
    (the second a copy under another name, for the two-teacher reader benchmark).
    """
    data_store, model_dir, description = train_real_teacher(workdir)
    store = subset_store(data_store, workdir / "real.zarr", 256, 128)
    teachers = {"real": model_dir, "real-copy": model_dir, **random_teachers}
    cfg = bench_config(profile.vocab, profile.seq_len, 128, teachers, k=profile.k, temperatures=[1.0, 2.0],
                       samples=profile.samples, batch_size=profile.precompute_batch)
    precompute_targets(cfg, device=profile.device, store=store)
    described = {"real": description,
                 **{name: f"{name} (random init)" for name in random_teachers}}
    main = measure(store, described, ["real"])
    for run in TRAINED_RUNS:
        if (found := trained_run(run)) is None:
            main.notes.append(f"No trained teachers and token store under runs/{run} (`make cache "
                              f"CONFIG=configs/{run}.yaml` adds them).")
            continue
        merge(main, trained_run_section(run, *found, profile, workdir))
    main.notes += [
        f"256 sequences x {profile.seq_len} positions for the teachers trained here, 512 sequences of the run's "
        f"own length for the runs' teachers; k={profile.k}, temperatures 1 and 2, {profile.samples} samples at T=1.",
        "Every trained teacher is judged; the random-init ones (flat logits, near-uniform ids) are context. The "
        "200-step 16000-token teacher is less peaked than a converged one; mini_real's teachers (BabyLM text, "
        "vocabulary 8000) are the best-trained real-text teachers here; the demo's (640 tokens, a top-64 row is a "
        "tenth of the vocabulary) are a toy.",
    ]
    return main, store, ["real", "real-copy"]


def merge(into: Section, other: Section) -> None:
    for mine, theirs in zip(into.tables, other.tables):
        mine.rows += theirs.rows
    into.targets += other.targets
    into.notes += other.notes


if __name__ == "__main__":
    profile = PROFILES["cpu"]
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        work = Path(tmp)
        teachers = {name: save_random_teacher(shape, profile.vocab, work / "teachers" / name, seed=i)
                    for i, (name, shape) in enumerate(profile.teachers.items())}
        print(run_section(real_stores, profile, work, teachers)[0].markdown())
