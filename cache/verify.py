"""`verify_store`: decode every chunk of a store (local or remote) against the schema; one line per problem.

Checked: every shard file of every complete shard is present with a valid index checksum and every inner chunk
decodes to the right size (chunk bytes carry a checksum only when the inner codec chain ends in crc32c; without
one, most flipped bytes in a compressed chunk decode silently to other values); shapes and dtypes against
`kdcache.cache.schema`; completeness; NaN/inf in float arrays; ids inside the vocabulary; top-k sorted
descending; sample counts summing to `samples`; a cross-tokenizer group's ragged layout (cache.xtok); `complete`
records of 0 or 1; words per sequence (when recorded) adding up to their total; and the attributes that tie it
together (format version, tokenizer, token digests, `k`, temperatures). First, every file against the store's
manifest (`kdcache.cache.manifest`), or without one, every zarr.json for valid JSON: a damaged file is named
before zarr parses it, and what zarr then fails to read is one line, never an exception.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import zarr

from kdcache.cache import FORMAT_VERSION
from kdcache.cache.lock import lock_store
from kdcache.cache.manifest import (
    META, Entries, manifest_problems, read_manifest, seal_problems, seal_store, shard_entries, unsealed,
)
from kdcache.cache.reader import ShardedArrayReader
from kdcache.cache.storage import StoreFiles
from kdcache.cache.words import read_word_counts
from kdcache.cache.xtok import ALIGN, axis_lengths, is_cross, ragged_problem, xtok_array_specs
from kdcache.cache.schema import (
    COMPLETE, TEACHERS, TOKENS, WORDS, ArraySpec, StoreError, ids_dtype, num_shards, open_store,
    read_tokens, shard_range, splits, teacher_array_specs, teacher_names, token_digest,
)

Check = Callable[[np.ndarray], str | None]  # one shard's data -> what is wrong with it, or None


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found in the store at `path` (a local directory or a URL), one line each; empty when sound."""
    store = str(path)
    files = StoreFiles(store)
    problems = []
    if files.exists(META):  # first, what is named by file before zarr trips over it
        problems = manifest_problems(files)
        problems = _unparsed_documents(files) + seal_problems(store) if problems is None else problems
    try:
        root = open_store(store)
    except StoreError as e:
        if not problems:
            raise
        return problems + [str(e)]
    attrs = root.attrs.asdict()
    absent = [f"{store}: root attribute {key!r} missing"
              for key in ("seq_len", "vocab_size", "tokenizer_sha256") if key not in attrs]
    if absent:
        return problems + absent
    listed = read_manifest(files) if not problems else None  # sound: remote shards come from the shard cache
    for split in _guarded(problems, TOKENS, lambda: splits(root)):
        problems += _guarded(problems, f"{TOKENS}/{split}", lambda: _verify_tokens(root, files, split, listed))
        problems += _guarded(problems, f"{WORDS}/{split}", lambda: _verify_words(root, split))
    for teacher in _guarded(problems, TEACHERS, lambda: teacher_names(root)):
        problems += _guarded(problems, f"{TEACHERS}/{teacher}", lambda: _verify_teacher(root, files, teacher, listed))
    return problems


def seal_verified(store: str) -> int:
    """`kdcache seal`: under the write lock, verify every chunk of `store` and, when nothing but its seal is
    missing, record its manifest; returns the number of files listed. StoreError naming the problems otherwise."""
    with lock_store(store, "kdcache seal"):
        problems = [line for line in verify_store(store) if line != unsealed(store)]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise StoreError(f"{store}: not sealed: verify found {len(problems)} problems: {shown}")
        seal_store(store)
    return len(read_manifest(StoreFiles(store)) or {})


def _unparsed_documents(files: StoreFiles) -> list[str]:
    """Without a manifest: each zarr.json that is not a JSON object."""
    problems = []
    documents = sorted(rel for rel in files.files() if rel == META or rel.endswith(f"/{META}"))
    for rel, data in files.read_many(documents).items():
        try:
            parsed = json.loads(data)
        except ValueError as e:  # not JSON, or not UTF-8
            problems.append(f"{files.name(rel)}: not valid JSON ({e})")
            continue
        if not isinstance(parsed, dict):
            problems.append(f"{files.name(rel)}: not a JSON object")
    return problems


def _guarded(problems: list[str], where: str, check: Callable[[], list[str]]) -> list[str]:
    """`check()`; an exception zarr raises on metadata it cannot parse is added to `problems` as one line and
    the part is skipped (the manifest, or the line, names the damage)."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - what a damaged document makes zarr raise varies with the flipped byte
        problems.append(f"{where}: cannot be read ({e.__class__.__name__}: {e})")
        return []


def _verify_tokens(root: zarr.Group, files: StoreFiles, split: str, listed: Entries | None) -> list[str]:
    path = f"{TOKENS}/{split}"
    vocab = root.attrs["vocab_size"]
    shape = (root[path].shape[0], root.attrs["seq_len"])
    problems = _verify_array(files, path, shape, ArraySpec((), ids_dtype(vocab)), None, [_ids_below(vocab)], listed)
    if not problems and token_digest(read_tokens(root, split)) != root[path].attrs.get("digest"):
        problems.append(f"{path}: stored tokens do not match the digest attribute")
    return problems


def _verify_words(root: zarr.Group, split: str) -> list[str]:
    """The optional words per sequence: one count per token sequence, adding up to their recorded total."""
    try:
        read_word_counts(root, split)
    except StoreError as e:
        return [str(e)]
    return []


def _verify_teacher(root: zarr.Group, files: StoreFiles, teacher: str, listed: Entries | None) -> list[str]:
    group_path = f"{TEACHERS}/{teacher}"
    attrs = root[group_path].attrs.asdict()
    where = f"{group_path}: attribute"
    problems = [f"{where} {key!r} missing" for key in ("k", "temperatures") if key not in attrs]
    if problems:
        return problems
    if attrs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        problems.append(f"{where} format_version is {attrs['format_version']!r}, expected {FORMAT_VERSION}")
    if attrs.get("tokenizer_sha256", root.attrs["tokenizer_sha256"]) != root.attrs["tokenizer_sha256"]:
        problems.append(f"{where} tokenizer_sha256 differs from the store's")
    if 1.0 not in attrs["temperatures"]:  # the spec: T = 1 is always cached (the exact top-k + tail targets)
        problems.append(f"{where} temperatures {attrs['temperatures']} lack 1.0")
    for split in sorted(root[group_path].group_keys()):
        problems += _verify_teacher_split(root, files, teacher, split, attrs, listed)
    return problems


def _verify_teacher_split(root: zarr.Group, files: StoreFiles, teacher: str, split: str, attrs: dict[str, Any],
                          listed: Entries | None) -> list[str]:
    path = f"{TEACHERS}/{teacher}/{split}"
    group = root[path]
    if f"{TOKENS}/{split}" not in root:
        return [f"{path}: no token split {split!r} to go with it"]
    tokens = root[f"{TOKENS}/{split}"]
    n, seq_len = tokens.shape
    problems = []
    if group.attrs.get("token_digest") != tokens.attrs.get("digest"):
        problems.append(f"{path}: token_digest differs from {TOKENS}/{split}'s digest (computed on other tokens)")
    if group.attrs.get("num_sequences") != n:
        problems.append(f"{path}: num_sequences is {group.attrs.get('num_sequences')!r}, tokens have {n}")
    per_shard = group.attrs.get("per_shard", 1)
    marks = group[COMPLETE][...] if COMPLETE in group else np.zeros(0, dtype=np.uint8)
    problems += [f"{files.name(f'{path}/{COMPLETE}/c/{shard}')}: completion record holds {marks[shard]}, not 0 or 1"
                 for shard in np.flatnonzero(marks > 1).tolist()]  # the records carry no checksum
    done = marks.astype(bool)
    if done.size != num_shards(n, per_shard):
        return problems + [f"{path}/{COMPLETE}: {done.size} entries, expected {num_shards(n, per_shard)} shards"]
    if not done.all():
        missing = np.flatnonzero(~done).tolist()
        problems.append(f"{path}: incomplete: {int(done.sum())}/{done.size} shards complete (not: {missing})")
    have = set(group.array_keys())
    if is_cross(attrs):
        return problems + _verify_cross_split(files, path, group, attrs, root.attrs["seq_len"], done, listed)
    hidden = {int(name.removeprefix("hidden_")): group[name].shape[-1] for name in have
              if name.startswith("hidden_") and not name.endswith("_scale")}
    specs = teacher_array_specs(attrs["k"], root.attrs["vocab_size"], len(attrs["temperatures"]),
                                attrs.get("samples", 0), hidden, attrs.get("hidden_dtype") or "float16")
    wanted = [f"hidden_{layer}" for layer in attrs.get("hidden_layers", [])]
    problems += [f"{path}: array {name!r} missing" for name in sorted(set(specs) | set(wanted)) if name not in have]
    for name in sorted(set(specs) & have):
        checks = _value_checks(name, specs[name], root.attrs["vocab_size"], attrs.get("samples", 0))
        problems += _verify_array(files, f"{path}/{name}", (n, seq_len), specs[name], done, checks, listed)
    return problems


def _verify_cross_split(files: StoreFiles, path: str, group: zarr.Group, attrs: dict[str, Any], seq_len: int,
                        done: np.ndarray, listed: Entries | None) -> list[str]:
    """A cross-tokenizer split (cache.xtok): its arrays on the teacher's token axis or the run's, teacher ids inside
    the teacher's vocabulary, and the ragged layout (byte ends, alignment) of every complete shard."""
    missing = [key for key in ("teacher_len", "teacher_vocab_size", "vocab_map") if key not in attrs]
    if missing:
        return [f"{path}: cross-tokenizer attributes {missing} missing"]
    vocab, n = attrs["teacher_vocab_size"], group.attrs.get("num_sequences", 0)
    specs, lengths = xtok_array_specs(attrs["k"], vocab, len(attrs["temperatures"])), axis_lengths(attrs)
    have = set(group.array_keys())
    problems = [f"{path}: array {name!r} missing" for name in sorted(specs) if name not in have]
    for name in sorted(set(specs) & have):
        checks = _value_checks(name.removeprefix("t_"), specs[name], vocab, 0) + (
            [_ids_below(vocab)] if name == "t_tokens" else [])
        problems += _verify_array(files, f"{path}/{name}", (n, lengths.get(name, seq_len)), specs[name], done,
                                  checks, listed)
    if problems:
        return problems
    ends, align = (_reader(files, f"{path}/{name}", listed) for name in ("t_byte_end", ALIGN))
    for shard in np.flatnonzero(done).tolist():
        rows = shard_range(shard, n, ends.per_shard)
        if what := ragged_problem(ends.read_sequences(rows), align.read_sequences(rows)):
            problems.append(f"{path}: {what} (shard {shard})")
    return problems


def _reader(files: StoreFiles, path: str, listed: Entries | None) -> ShardedArrayReader:
    """The array at `path`, its shards checked against the manifest's entries when there is one."""
    return ShardedArrayReader(files.under(path), listed=None if listed is None else shard_entries(listed, path))


def _verify_array(files: StoreFiles, path: str, shape: tuple[int, int], spec: ArraySpec, done: np.ndarray | None,
                  checks: list[Check], listed: Entries | None) -> list[str]:
    """Decode every shard marked in `done` (None: every shard) and run `checks` on each."""
    try:
        reader = _reader(files, path, listed)
    except StoreError as e:
        return [str(e)]
    want = (*shape, *spec.trailing)
    # int32: the ids of a large-vocabulary store written before they were uint32 (read as their metadata says)
    dtypes = {spec.dtype, "int32"} if spec.dtype == "uint32" else {spec.dtype}
    if reader.shape != want or reader.dtype.name not in dtypes:
        return [f"{path}: {reader.dtype}{list(reader.shape)}, expected {spec.dtype}{list(want)}"]
    if done is None:
        done = np.ones(num_shards(shape[0], reader.per_shard), dtype=bool)
    problems = []
    found: dict[str, list[int]] = defaultdict(list)  # what is wrong -> the shards where it is
    for shard in np.flatnonzero(done).tolist():
        try:
            block = reader.read_sequences(shard_range(shard, shape[0], reader.per_shard))
        except StoreError as e:
            problems.append(str(e))
            continue
        for check in checks:
            if (what := check(block)) is not None:
                found[what].append(shard)
    return problems + [f"{path}: {what} (shards {shards})" for what, shards in found.items()]


def _value_checks(name: str, spec: ArraySpec, vocab_size: int, samples: int) -> list[Check]:
    checks = [_finite] if np.dtype(spec.dtype).kind == "f" else []
    if name in ("topk_ids", "sample_ids"):
        checks.append(_ids_below(vocab_size))
    if name == "topk_logits":
        checks.append(_sorted_descending)
    if name == "sample_counts":
        checks.append(lambda counts: None if (counts.sum(-1, dtype=np.int64) == samples).all()
                      else f"sample counts do not sum to samples={samples}")
    return checks


def _finite(block: np.ndarray) -> str | None:
    return None if np.isfinite(block).all() else "NaN or inf values"


def _sorted_descending(block: np.ndarray) -> str | None:
    return "top-k values not sorted descending" if (np.diff(block, axis=-1) > 0).any() else None


def _ids_below(vocab_size: int) -> Check:
    def check(block: np.ndarray) -> str | None:
        inside = block.size == 0 or (block.min() >= 0 and block.max() < vocab_size)
        return None if inside else f"token ids outside [0, {vocab_size})"
    return check
