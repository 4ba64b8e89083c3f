"""The store schema: every group, array, dtype, chunking, codec and attribute of a kdcache store.

This is the one module that knows the layout (spec: docs/cache-format.md). Writers
(`precompute/`) create arrays through it; readers (`student/`, `kdcache.cache.reader`, the CLI)
open and check stores through it.

    cache.zarr/                       root attrs: format_version, seq_len, vocab_size, tokenizer_sha256, ...
      tokens/<split>                  [N, L] token ids
      words/<split>                   [N] uint32 words per sequence (optional: kdcache.cache.words)
      teachers/<name>/                attrs: teacher identity, k, temperatures, layers, dtypes, modes
        <split>/topk_logits           [N, L, k] float16, sorted descending (temperature 1; kdcache.sorted_key_delta)
        <split>/topk_ids              [N, L, k] uint16 | uint32 (kdcache.vocab_rank)
        <split>/lse                   [N, L, n_temperatures] float32: logsumexp(logits / T)
        <split>/sample_ids            [N, L, S] uint16 | uint32  (random-sampling KD, optional)
        <split>/sample_counts         [N, L, S] uint16            (0 = padding)
        <split>/hidden_<l>            [N, L, H] float16 | int8    (optional, per cached layer)
        <split>/hidden_<l>_scale      [N, L] float16              (int8 only: value = q * scale)
        <split>/complete              [n_shards] uint8            (1 once a shard is fully written)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from kdcache import __version__
from kdcache.cache import FORMAT_VERSION, UPGRADABLE_VERSION
from kdcache.cache.codecs import SORTED_KEY_DELTA, VOCAB_RANK, ArrayTransform, SortedKeyDeltaCodec, VocabRankCodec
from kdcache.errors import KdcacheError

TOKENS = "tokens"
WORDS = "words"  # optional words per sequence beside the tokens (kdcache.cache.words)
TEACHERS = "teachers"
COMPLETE = "complete"
ENSEMBLE = "ensemble"  # the teacher group holding the top-k of the teachers' mean logits (cache.ensemble)
MAX_SAMPLES = int(np.iinfo(np.uint16).max)  # sampled draws per position: sample_counts are uint16

# Teacher attributes outside its settings digest: where the weights live and which kdcache wrote them do not
# change the targets.
NOT_DIGESTED = ("source", "kdcache_version", "settings_digest")


class StoreError(KdcacheError):
    """A store that is missing, malformed, incomplete or does not match what the caller expects."""


@dataclass(frozen=True)
class ArraySpec:
    """Shape past the [N, L] (sequence, position) axes, dtype, and how the array is encoded."""

    trailing: tuple[int, ...]
    dtype: str
    # Arrays that barely compress (tokens, float16 activations) skip Blosc: its per-call cost buys nothing.
    compress: bool = True
    # Blosc shuffle under `codec.shuffle: auto`, measured with lz4hc on teachers trained on BabyLM text
    # (docs/benchmarks.md, item 2): bitshuffle for the logits' key differences, the top-k ids, lse and int8
    # activations (whose byte shuffle is a no-op); byte shuffle for the sampled ids and counts.
    shuffle: str = "shuffle"
    # The kdcache array -> array codec it is stored through (cache.codecs): SORTED_KEY_DELTA for rows sorted
    # descending, VOCAB_RANK for token ids (in the order of the split's `vocab_order` attribute).
    transform: str | None = None


@dataclass
class CodecSettings:
    """How compressed arrays are stored (the run config's `cache.codec`): Blosc for every compressed array (docs/benchmarks.md, item 2, measured the choices)."""

    cname: Literal["zstd", "lz4", "lz4hc", "blosclz", "zlib", "none"] = "lz4hc"
    clevel: int = 5
    # auto: the shuffle measured best for each array (cache.schema.teacher_array_specs)
    shuffle: Literal["auto", "bitshuffle", "shuffle", "noshuffle"] = "auto"


def ids_dtype(vocab_size: int) -> str:
    """Token ids' dtype: uint16 while the ids fit it, else uint32 (older large-vocabulary stores hold int32)."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def vocab_order(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids by descending count in `tokens`, ties by id: the order kdcache.vocab_rank ranks a split's ids in."""
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size)
    return np.argsort(-counts, kind="stable")


def vocab_order_attr(tokens: np.ndarray, vocab_size: int) -> str:
    """`vocab_order` as a token split's attribute (and the codec's configuration) holds it: base64."""
    return VocabRankCodec.from_order(vocab_order(tokens, vocab_size), ids_dtype(vocab_size)).order_base64


def array_transform(spec: ArraySpec, order_base64: str | None) -> list[ArrayTransform]:
    """The array -> array codec list (zarr's `filters`) of an array with this spec."""
    if spec.transform == SORTED_KEY_DELTA:
        return [SortedKeyDeltaCodec()]
    if spec.transform == VOCAB_RANK:
        if order_base64 is None:
            raise ValueError(f"{VOCAB_RANK} needs a vocabulary order")
        return [VocabRankCodec.from_base64(order_base64, spec.dtype)]
    return []


def compressors(codec: CodecSettings, spec: ArraySpec) -> list[BloscCodec | Crc32cCodec]:
    """Blosc (unless off), then a crc32c per inner chunk: without it most flipped bytes decode silently."""
    if not spec.compress or codec.cname == "none":
        return [Crc32cCodec()]
    shuffle = spec.shuffle if codec.shuffle == "auto" else codec.shuffle
    return [BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=shuffle), Crc32cCodec()]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tokenizer_dir: str | Path) -> str:
    """Identity of a tokenizer: the sha256 of its tokenizer.json (vocabulary, merges, normaliser, specials)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise StoreError(f"{path}: tokenizer.json not found")
    return sha256_file(path)


def token_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


def num_shards(num_sequences: int, per_shard: int) -> int:
    return -(-num_sequences // per_shard)


def shard_range(shard: int, num_sequences: int, per_shard: int) -> range:
    return range(shard * per_shard, min((shard + 1) * per_shard, num_sequences))


def _storage_options(path: str) -> dict[str, Any] | None:
    # fsspec's local filesystem does not create parent folders unless asked; zarr's nested keys need them.
    return {"auto_mkdir": True} if str(path).startswith("file://") else None


def open_store(path: str, mode: str = "r", any_version: bool = False) -> zarr.Group:
    """Open a store (a local path or any fsspec URL zarr accepts) and check its format version (unless
    `any_version`: for deciding whether an old store may be replaced)."""
    try:
        root = zarr.open_group(store=str(path), mode=mode, zarr_format=3, storage_options=_storage_options(path))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise StoreError(f"{path}: not a kdcache store ({e.__class__.__name__}: {e})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a zarr.json zarr cannot take: damaged, or no v3
        raise StoreError(f"{path}/zarr.json: not a kdcache store's root ({e.__class__.__name__}: {e})") from None
    version = root.attrs.get("format_version")
    if mode != "w" and version is None and mode == "r":
        raise StoreError(f"{path}: not a kdcache store (no format_version attribute)")
    if version is not None and version != FORMAT_VERSION and not any_version:
        how = ("`kdcache upgrade` converts it in place" if version == UPGRADABLE_VERSION else
               "recreate the store: `kdcache data --overwrite`, then `kdcache precompute`")
        raise StoreError(f"{path}: store format version {version}, this kdcache reads version {FORMAT_VERSION} ({how})")
    return root


def create_store(path: str, attrs: dict[str, Any]) -> zarr.Group:
    """Create (or reopen) the root group with its provenance attributes."""
    root = zarr.open_group(store=str(path), mode="a", zarr_format=3, storage_options=_storage_options(path))
    root.attrs.update({"format_version": FORMAT_VERSION, "kdcache_version": __version__, **attrs})
    return root


def create_sharded_array(
    group: zarr.Group,
    name: str,
    num_sequences: int,
    seq_len: int,
    spec: ArraySpec,
    per_shard: int,
    codec: CodecSettings,
    attrs: dict[str, Any] | None = None,
    order_base64: str | None = None,
) -> zarr.Array:
    """A [N, L, ...] array sharded along sequences: one shard = `per_shard` sequences, one inner chunk = one sequence.
    `order_base64`: the vocabulary order of a VOCAB_RANK array."""
    shape = (num_sequences, seq_len, *spec.trailing)
    return group.create_array(
        name,
        shape=shape,
        dtype=spec.dtype,
        shards=(min(per_shard, max(num_sequences, 1)), seq_len, *spec.trailing),
        chunks=(1, seq_len, *spec.trailing),
        filters=array_transform(spec, order_base64),
        compressors=compressors(codec, spec),
        fill_value=0,
        # An all-zero inner chunk must still be written: the direct reader maps every chunk.
        config={"write_empty_chunks": True},
        attributes=attrs or {},
        overwrite=True,
    )


def write_tokens(root: zarr.Group, split: str, tokens: np.ndarray, per_shard: int, codec: CodecSettings, vocab_size: int) -> None:
    tokens = tokens.astype(ids_dtype(vocab_size))
    # vocab_order: what the teachers' VOCAB_RANK arrays take as their order
    attrs = {"digest": token_digest(tokens), "per_shard": per_shard,
             "vocab_order": vocab_order_attr(tokens, vocab_size)}
    group = root.require_group(TOKENS)
    arr = create_sharded_array(
        group, split, tokens.shape[0], tokens.shape[1], ArraySpec((), tokens.dtype.name, compress=False), per_shard, codec,
        attrs=attrs,
    )
    arr[...] = tokens


def read_tokens(root: zarr.Group, split: str) -> np.ndarray:
    try:
        return root[f"{TOKENS}/{split}"][...]
    except KeyError:
        raise StoreError(f"{root.store}: no token split {split!r}") from None


def splits(root: zarr.Group) -> list[str]:
    return sorted(root[TOKENS].array_keys()) if TOKENS in root else []


def teacher_names(root: zarr.Group) -> list[str]:
    return sorted(root[TEACHERS].group_keys()) if TEACHERS in root else []


def teacher_array_specs(
    k: int, vocab_size: int, n_temperatures: int, samples: int, hidden_sizes: dict[int, int], hidden_dtype: str
) -> dict[str, ArraySpec]:
    """Every array of one teacher split, from the cache settings."""
    ids = ids_dtype(vocab_size)
    specs = {
        "topk_logits": ArraySpec((k,), "float16", shuffle="bitshuffle", transform=SORTED_KEY_DELTA),
        # Ranks in the split's frequency order: 84 -> 72 B per top-64 row (docs/benchmarks.md, item 2). The
        # sampled ids are not ranked: their byte-shuffled ids gained nothing from it.
        "topk_ids": ArraySpec((k,), ids, shuffle="bitshuffle", transform=VOCAB_RANK),
        "lse": ArraySpec((n_temperatures,), "float32", shuffle="bitshuffle"),
    }
    if samples:
        width = min(samples, vocab_size)
        specs["sample_ids"] = ArraySpec((width,), ids)
        specs["sample_counts"] = ArraySpec((width,), "uint16")
    for layer, size in sorted(hidden_sizes.items()):
        # float16 activations barely compress (1.01-1.09x): stored raw, they read several times faster
        specs[f"hidden_{layer}"] = ArraySpec((size,), hidden_dtype, compress=hidden_dtype == "int8", shuffle="bitshuffle")
        if hidden_dtype == "int8":
            specs[f"hidden_{layer}_scale"] = ArraySpec((), "float16")
    return specs


def create_teacher_split(
    root: zarr.Group,
    teacher: str,
    split: str,
    specs: dict[str, ArraySpec],
    teacher_attrs: dict[str, Any],
    per_shard: int,
    codec: CodecSettings,
    axis_lengths: dict[str, int] | None = None,
) -> zarr.Group:
    """Create `teachers/<teacher>/<split>` with empty arrays and an all-zero completion record. `axis_lengths`:
    arrays whose second axis is not seq_len (a cross-tokenizer group's teacher tokens, cache.xtok)."""
    tokens = root[f"{TOKENS}/{split}"]
    n, seq_len = tokens.shape
    order = tokens.attrs.get("vocab_order")
    if order is None and any(spec.transform == VOCAB_RANK for spec in specs.values()):
        raise StoreError(f"{root.store}: {TOKENS}/{split} has no vocab_order attribute (rerun `kdcache data`)")
    tgroup = root.require_group(TEACHERS).require_group(teacher)
    tgroup.attrs.update(teacher_attrs)
    group = tgroup.require_group(split)
    group.attrs.update({"num_sequences": n, "per_shard": per_shard, "token_digest": tokens.attrs["digest"]})
    for name, spec in specs.items():
        length = (axis_lengths or {}).get(name, seq_len)
        create_sharded_array(group, name, n, length, spec, per_shard, codec, order_base64=order)
    group.create_array(COMPLETE, shape=(num_shards(n, per_shard),), chunks=(1,), dtype="uint8",
                       fill_value=0, compressors=[], overwrite=True)
    return group


def completed_shards(split_group: zarr.Group) -> np.ndarray:
    return split_group[COMPLETE][...].astype(bool)


def mark_shard_complete(split_group: zarr.Group, shard: int) -> None:
    # One chunk per shard: ranks marking different shards never touch the same object.
    split_group[COMPLETE][shard] = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def settings_digest(attrs: dict[str, Any]) -> str:
    """A teacher group's `settings_digest`: the sha256 of its attributes but NOT_DIGESTED."""
    digested = {key: value for key, value in attrs.items() if key not in NOT_DIGESTED}
    return hashlib.sha256(canonical_json(digested).encode()).hexdigest()


def check_store(
    root: zarr.Group,
    *,
    tokenizer_sha: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    teachers: Iterable[str] = (),
    split_names: Iterable[str] = (),
    require_complete: bool = True,
) -> None:
    """Refuse a store that does not match what the consumer expects; one message lists every problem."""
    where = str(root.store)
    attrs = root.attrs
    problems = []
    for key, want in (("tokenizer_sha256", tokenizer_sha), ("vocab_size", vocab_size), ("seq_len", seq_len)):
        if want is not None and attrs.get(key) != want:
            problems.append(f"{key} is {attrs.get(key)!r}, expected {want!r}")
    have_splits = splits(root)
    for split in split_names:
        if split not in have_splits:
            problems.append(f"no token split {split!r} (have {have_splits})")
    have_teachers = teacher_names(root)
    for teacher in teachers:
        if teacher not in have_teachers:
            problems.append(f"no teacher {teacher!r} (have {have_teachers})")
            continue
        for split in split_names:
            path = f"{TEACHERS}/{teacher}/{split}"
            if path not in root:
                problems.append(f"teacher {teacher!r} has no split {split!r}")
                continue
            group = root[path]
            if group.attrs.get("token_digest") != root[f"{TOKENS}/{split}"].attrs.get("digest"):
                problems.append(f"teacher {teacher!r} split {split!r} was computed on other tokens (digest differs)")
            done = completed_shards(group)
            if require_complete and not done.all():
                problems.append(f"teacher {teacher!r} split {split!r} is incomplete: {int(done.sum())}/{done.size} shards")
    if problems:
        raise StoreError(f"{where}: " + "; ".join(problems))
