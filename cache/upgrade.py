"""`kdcache upgrade`: bring a store of format 2 to the current format in place, without the teachers.

Format 3 differs from format 2 only in how `topk_ids` are encoded (through kdcache.vocab_rank, whose order is
the new `vocab_order` attribute of each token split); every value reads the same. So an upgrade counts each
token split's ids, re-encodes the `topk_ids` of every complete shard (decoded through the old layout, encoded
through the new one, the bytes precompute writes) and then sets the format version, and the teachers' settings
digests that include it: minutes on a CPU instead of running the teachers again. Shards not marked complete are
left out, for `kdcache precompute` to compute as it would after any interruption.

Safe to interrupt: each array is written beside the old one (`<array>.upgrading`) and swapped in with two
renames, a rerun finishes what is left, and the store claims the new version only once every array is done.
Nothing else may use the store meanwhile. Local stores only (the swap renames directories).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from kdcache.cache import FORMAT_VERSION, UPGRADABLE_VERSION
from kdcache.cache.codecs import VOCAB_RANK, VocabRankCodec
from kdcache.cache.encoder import encode_shard
from kdcache.cache.layout import dir_bytes, layout_from_json, local_path
from kdcache.cache.lock import lock_store
from kdcache.cache.manifest import seal_store, unseal_store
from kdcache.cache.reader import ShardedArrayReader
from kdcache.cache.schema import (
    TEACHERS, TOKENS, StoreError, completed_shards, ids_dtype, open_store, settings_digest, shard_range, splits,
    teacher_names, vocab_order_attr,
)
from kdcache.files import atomic_write

PENDING, REPLACED = ".upgrading", ".replaced"  # suffixes of an array being written, and of the one it replaces


@dataclass
class UpgradeReport:
    from_version: int
    arrays: int = 0  # arrays re-encoded
    bytes_before: int = 0  # of those arrays
    bytes_after: int = 0
    seconds: float = 0.0


def upgrade_store(path: str | os.PathLike) -> UpgradeReport:
    """Upgrade the local store at `path` from UPGRADABLE_VERSION to FORMAT_VERSION (a current one is left as is)."""
    store, start = str(path), time.perf_counter()
    directory = local_path(store)
    if directory is None:
        raise StoreError(f"{store}: upgrade rewrites shard files in place and needs a local store")
    root = open_store(store, mode="r+", any_version=True)
    report = UpgradeReport(root.attrs.get("format_version"))
    if report.from_version == FORMAT_VERSION:
        return report
    if report.from_version != UPGRADABLE_VERSION:
        raise StoreError(f"{store}: format version {report.from_version!r} cannot be upgraded (only "
                         f"{UPGRADABLE_VERSION} can): recreate the store (`kdcache data --overwrite`, then "
                         f"`kdcache precompute`)")
    with lock_store(store, "kdcache upgrade"):  # no other writer while shard files are swapped
        unseal_store(directory)  # until sealed again, the store reads as one being written
        if ids_dtype(root.attrs["vocab_size"]) == "uint16":  # int32 ids are stored as they are in format 3 too
            for split in splits(root):
                order = _split_vocab_order(root, directory, split)
                for teacher in teacher_names(root):
                    group = root.get(f"{TEACHERS}/{teacher}/{split}")
                    ids_dir = directory / TEACHERS / teacher / split / "topk_ids"
                    _finish_interrupted_swap(ids_dir)
                    if group is not None and (ids_dir / "zarr.json").is_file():
                        _rank_ids(ids_dir, order, completed_shards(group), report)
        for teacher in teacher_names(root):
            attrs = root[f"{TEACHERS}/{teacher}"].attrs
            attrs.update({"format_version": FORMAT_VERSION,
                          "settings_digest": settings_digest({**attrs.asdict(), "format_version": FORMAT_VERSION})})
        root.attrs["format_version"] = FORMAT_VERSION  # last: the store claims the version once all of it has it
        seal_store(directory)  # the store is whole again: record what it holds (cache.manifest)
    report.seconds = time.perf_counter() - start
    return report


def _split_vocab_order(root: zarr.Group, directory: Path, split: str) -> str:
    """The split's `vocab_order` attribute, counted from its tokens (and stored) if it has none yet."""
    tokens = root[f"{TOKENS}/{split}"]
    if "vocab_order" not in tokens.attrs:
        ids = ShardedArrayReader(directory / tokens.path).read_sequences(np.arange(tokens.shape[0]))
        tokens.attrs["vocab_order"] = vocab_order_attr(ids, root.attrs["vocab_size"])
    return tokens.attrs["vocab_order"]


def _rank_ids(array_dir: Path, order_base64: str, complete: np.ndarray, report: UpgradeReport) -> None:
    """Re-encode the complete shards of a format-2 `topk_ids` array through kdcache.vocab_rank."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]  # the sharding codec's chain (parse_layout checks it)
    old = ShardedArrayReader(array_dir)
    if old.layout.transform is not None:
        if old.layout.transform.codec_name == VOCAB_RANK:
            return  # upgraded by an earlier, interrupted run
        raise StoreError(f"{array_dir}: topk_ids stored through {old.layout.transform.codec_name}, not as format 2 "
                         f"stored them")
    inner.insert(0, VocabRankCodec.from_base64(order_base64).to_dict())
    pending = array_dir.with_name(array_dir.name + PENDING)
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir()
    text = json.dumps(meta, indent=2)
    layout = layout_from_json(text, str(pending / "zarr.json"))
    for shard in np.flatnonzero(complete):
        rows = shard_range(int(shard), layout.shape[0], layout.per_shard)
        atomic_write(pending / layout.shard_key(int(shard)), encode_shard(layout, old.read_sequences(rows)))
    (pending / "zarr.json").write_text(text)  # last: until then the directory is no array to zarr
    report.arrays += 1
    report.bytes_before += dir_bytes(array_dir)
    report.bytes_after += dir_bytes(pending)
    replaced = array_dir.with_name(array_dir.name + REPLACED)
    array_dir.rename(replaced)
    pending.rename(array_dir)
    shutil.rmtree(replaced)


def _finish_interrupted_swap(array_dir: Path) -> None:
    """Tidy what a run stopped mid-swap left: between the two renames the old array goes back (its new copy is
    written again); after them the old copy is removed."""
    replaced = array_dir.with_name(array_dir.name + REPLACED)
    if replaced.exists() and not array_dir.exists():
        replaced.rename(array_dir)
    shutil.rmtree(replaced, ignore_errors=True)
