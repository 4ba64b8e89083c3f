"""The store's manifest: a digest of every file of a store, written when a writer finishes, checked on read.

Chunk data and shard indexes carry crc32c checksums, but nothing else does: a flipped byte in a `zarr.json`
can leave valid JSON that zarr accepts (a digit of an attribute), a `complete` record has no checksum, and a
shard file copied in from another store checks out. So each writer ends by sealing the store (`seal_store`):
`kdcache.manifest` at its root lists, sorted by path, one `<sha256 hex> <path>` line per file, under a header
line and above a trailer line `sha256 <hex>` of every byte before it, so a flip in the manifest is caught too.
A shard file of a checksummed layout is listed by its fingerprint, the sha256 of its index (with its crc32c)
followed by the crc32c ending each inner chunk: that pins its content without reading it. `kdcache verify`
compares every file with the manifest (`manifest_problems`); the reader checks the metadata documents and
completion records it depends on before it reads (`check_documents`) and every shard once when it maps it
(`shard_fingerprint`). A store of this format without one is unsealed (`seal_problems`): verify reports it and
distill refuses it, so deleting the manifest cannot switch these checks off. Local and remote stores alike
(`kdcache.cache.storage`).
Spec: docs/cache-format.md, "The manifest".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from kdcache.cache import FORMAT_VERSION
from kdcache.cache.layout import CRC_BYTES, EMPTY, ShardLayout, layout_from_json
from kdcache.cache.lock import live_writer
from kdcache.cache.schema import COMPLETE, TEACHERS, TOKENS, WORDS, StoreError
from kdcache.cache.storage import StoreFiles

MANIFEST = "kdcache.manifest"
HEADER = b"kdcache manifest 1\n"
TRAILER_BYTES = len(b"sha256 \n") + 64
META = "zarr.json"

Entries = dict[str, str]  # path relative to the store, "/"-separated -> hex digest


def differs(path: str | Path) -> str:
    return f"{path}: differs from the store's manifest (damaged, or replaced after the store was written)"


def unlisted(path: str | Path) -> str:
    return f"{path}: not in the store's manifest (added after the store was written)"


def missing(path: str | Path) -> str:
    return f"{path}: missing (the store's manifest lists it)"


def unsealed(store: str | os.PathLike) -> str:
    """The line naming a store of this format without a manifest, and how to seal it."""
    return (f"{store}/{MANIFEST}: missing: the store is not sealed (its writer stopped before sealing it, or the "
            "manifest was deleted), so shards swapped or replaced cannot be detected; rerun the writer "
            f"(kdcache precompute), or run `kdcache seal {store}`, which verifies every chunk first")


def is_unsealed(store: str | os.PathLike) -> bool:
    """Whether a store of this format has no manifest (a store of another format is refused for its version)."""
    files = StoreFiles(store)
    root = files.read(META)
    return root is not None and not _other_version(root) and not files.exists(MANIFEST)


def seal_problems(store: str | os.PathLike) -> list[str]:
    """A store of this format without a manifest: unsealed, while a writer works on it or since one stopped."""
    if not is_unsealed(store):
        return []
    writer = live_writer(store)
    return [f"{store}: not sealed yet: being written by {writer}" if writer else unsealed(store)]


def seal_store(store: str | os.PathLike) -> None:
    """Write the store's manifest: call once every write is done."""
    files = StoreFiles(store)
    lines = [f"{file_digest(files, rel, layout)} {rel}\n" for rel, layout, _ in store_files(files)]
    body = HEADER + "".join(lines).encode()
    files.write(MANIFEST, body + _trailer(body))


def unseal_store(store: str | os.PathLike) -> None:
    """Remove the manifest of a store about to change: until it is sealed again, a reader checks it as a store
    being written (incomplete groups are refused as such) instead of reporting every new file as damage."""
    StoreFiles(store).remove(MANIFEST)


def read_manifest(files: StoreFiles) -> Entries | None:
    """The manifest's entries; None when the store has none; StoreError when it is damaged."""
    data = files.read(MANIFEST)
    if data is None:
        return None
    body = data[:-TRAILER_BYTES]
    if not body.startswith(HEADER) or data[-TRAILER_BYTES:] != _trailer(body):
        raise StoreError(f"{files.name(MANIFEST)}: damaged manifest (its trailer is not the sha256 of the lines above it)")
    entries = {}
    for line in body[len(HEADER):].decode().splitlines():
        digest, _, rel = line.partition(" ")
        entries[rel] = digest
    return entries


def manifest_problems(files: StoreFiles) -> list[str] | None:
    """`kdcache verify`'s check: a line per file missing, added or changed; None when the store has no manifest.
    The shards of an array whose zarr.json changed are not compared: their layout is in doubt."""
    try:
        entries = read_manifest(files)
    except StoreError as e:
        return [str(e)]
    if entries is None:
        return None
    found = {rel: (layout, meta) for rel, layout, meta in store_files(files)}
    problems = [missing(files.name(rel)) for rel in sorted(entries.keys() - found.keys())]
    problems += [unlisted(files.name(rel)) for rel in sorted(found.keys() - entries.keys())]
    common = sorted(entries.keys() & found.keys())
    documents = files.read_many([rel for rel in common if _is_meta(rel)])
    changed = {rel for rel, data in documents.items() if _digest(data) != entries[rel]}
    for rel in common:
        layout, meta = found[rel]
        if rel in changed or (meta not in changed and not _is_meta(rel)
                              and file_digest(files, rel, layout, entries[rel]) != entries[rel]):
            problems.append(differs(files.name(rel)))
    return problems


def checked_manifest(store: str | os.PathLike, split: str, teachers: list[str] | None) -> Entries | None:
    """The store's manifest once `check_documents` passed for a read of `split` and `teachers` (None: every
    teacher it lists); None for a store without one."""
    files = StoreFiles(store)
    root = files.read(META)
    entries = None if root is None or _other_version(root) else read_manifest(files)
    if entries is not None:
        listed = sorted({rel.split("/")[1] for rel in entries if rel.startswith(f"{TEACHERS}/") and rel.count("/") > 1})
        check_documents(files, entries, split, listed if teachers is None else teachers)
    return entries


def _other_version(root: bytes) -> bool:
    """Whether the root document names another format version: such a store is refused for its version (by
    `schema.open_store`), whose rules its manifest may not follow."""
    try:
        version = json.loads(root)["attributes"]["format_version"]
    except (ValueError, KeyError, TypeError):
        return False
    return version != FORMAT_VERSION


def check_documents(files: StoreFiles, entries: Entries, split: str, teachers: list[str]) -> None:
    """Raise a StoreError on the first metadata document or `complete` record that a read of `split` and
    `teachers` depends on and that is missing, unlisted, or differs from the manifest (a teacher or split the
    store lacks altogether is left to the reader's own checks)."""
    teachers = [teacher for teacher in teachers if files.has_folder(f"{TEACHERS}/{teacher}")]
    groups = [f"{TOKENS}/{split}", f"{WORDS}/{split}"] + [f"{TEACHERS}/{teacher}/{split}" for teacher in teachers]
    tops = [META, f"{TOKENS}/{META}", f"{WORDS}/{META}"] + ([f"{TEACHERS}/{META}"] if teachers else [])
    tops += [f"{TEACHERS}/{teacher}/{META}" for teacher in teachers] + [f"{group}/{META}" for group in groups]
    below = sorted(rel for rel in entries for group in groups if rel.startswith(f"{group}/")
                   and (_is_meta(rel) or rel.startswith(f"{group}/{COMPLETE}/")))
    needed = list(dict.fromkeys(tops + below))
    for rel, data in files.read_many(needed).items():
        if rel not in entries and data is not None:
            raise StoreError(unlisted(files.name(rel)))
        if rel in entries and data is None:
            raise StoreError(missing(files.name(rel)))
        if rel in entries and _digest(data) != entries[rel]:
            raise StoreError(differs(files.name(rel)))


def shard_entries(entries: Entries, array: str) -> dict[str, str]:
    """The listed shard files of the array at `array` (relative path): shard key -> digest."""
    prefix = f"{array}/"
    return {rel[len(prefix):]: digest for rel, digest in entries.items()
            if rel.startswith(prefix) and rel != prefix + META}


def shard_fingerprint(data: np.ndarray, layout: ShardLayout) -> str:
    """The sha256 of a shard file's index and of the crc32c ending each of its inner chunks (`data`: its bytes
    as uint8); of the whole file when the layout has no chunk checksums, or the index does not fit the file."""
    size = layout.index_nbytes
    index = data[-size:] if layout.index_at_end else data[:size]
    entries = index[:-CRC_BYTES].view("<u8").reshape(-1, 2) if data.size >= size else np.zeros((0, 2), "<u8")
    written = entries[(entries[:, 0] != EMPTY) | (entries[:, 1] != EMPTY)]
    ends = written[:, 0] + written[:, 1]
    if not layout.checksummed or data.size < size or (written[:, 1] < CRC_BYTES).any() or (ends > data.size).any():
        return hashlib.sha256(data).hexdigest()
    crcs = data[(ends.astype(np.int64)[:, None] - CRC_BYTES + np.arange(CRC_BYTES)).reshape(-1)]
    return hashlib.sha256(index.tobytes() + crcs.tobytes()).hexdigest()


def fingerprint_of(layout: ShardLayout) -> Callable[[np.ndarray], str]:
    return lambda data: shard_fingerprint(data, layout)


def file_digest(files: StoreFiles, rel: str, layout: ShardLayout | None, listed: str | None = None) -> str:
    """What the manifest lists for `rel`: a shard's fingerprint under `layout`, else the sha256 of its bytes.
    A remote shard is fetched (never served from the shard cache) and, when it matches `listed` (what the
    manifest says), kept in the cache."""
    if layout is None:
        return _digest(files.read(rel))
    try:
        data = files.shard(rel, listed, fingerprint_of(layout), fetch=True)
    except ValueError:  # an empty file
        return _digest(b"")
    return shard_fingerprint(data, layout)


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _trailer(body: bytes) -> bytes:
    return b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"


def _is_meta(rel: str) -> bool:
    return rel == META or rel.endswith(f"/{META}")


def store_files(files: StoreFiles) -> Iterator[tuple[str, ShardLayout | None, str | None]]:
    """Every file of the store but the manifest, sorted by path: (relative path, the sharded layout it is a shard
    of or None, the relative path of that array's zarr.json or None)."""
    listing = sorted(rel for rel in files.files() if rel != MANIFEST)
    documented = {rel.rpartition("/")[0] for rel in listing if _is_meta(rel)}  # directories holding a zarr.json
    owners: dict[str, tuple[ShardLayout, str] | None] = {}
    for rel in listing:
        if _is_meta(rel):
            yield rel, None, None
            continue
        folder = rel.rpartition("/")[0]
        while folder and folder not in documented:
            folder = folder.rpartition("/")[0]
        if folder not in owners:
            owners[folder] = _sharded(files, folder) if folder in documented else None
        yield rel, *(owners[folder] or (None, None))


def _sharded(files: StoreFiles, folder: str) -> tuple[ShardLayout, str] | None:
    """(layout, relative path of its zarr.json) when `folder` holds a sharded array the reader decodes."""
    meta = f"{folder}/{META}" if folder else META
    try:
        return layout_from_json(files.read(meta) or b"", files.name(meta)), meta
    except StoreError:
        return None
