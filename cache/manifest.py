"""The store's manifest: a digest of every file of a local store, written when a writer finishes, checked on read.

Chunk data and shard indexes carry crc32c checksums, but nothing else does: a flipped byte in a `zarr.json`
can leave valid JSON that zarr accepts (a digit of an attribute), a `complete` record has no checksum, and a
shard file copied in from another store checks out. So each writer ends by sealing the store (`seal_store`):
`kdcache.manifest` at its root lists, sorted by path, one `<sha256 hex> <path>` line per file, under a header
line and above a trailer line `sha256 <hex>` of every byte before it, so a flip in the manifest is caught too.
A shard file of a checksummed layout is listed by its fingerprint, the sha256 of its index (with its crc32c)
followed by the crc32c ending each inner chunk: that pins its content without reading it. `kdcache verify`
compares every file with the manifest (`manifest_problems`); the reader checks the metadata documents and
completion records it depends on before it reads (`check_documents`) and every shard once when it maps it
(`shard_fingerprint`). A store without a manifest (written by an older kdcache) is read and verified as before.
Spec: docs/cache-format.md, "The manifest".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from kdcache.cache import FORMAT_VERSION
from kdcache.cache.layout import CRC_BYTES, EMPTY, ShardLayout, local_path, parse_layout
from kdcache.cache.schema import COMPLETE, TEACHERS, TOKENS, WORDS, StoreError
from kdcache.files import atomic_write

MANIFEST = "kdcache.manifest"
HEADER = b"kdcache manifest 1\n"
TRAILER_BYTES = len(b"sha256 \n") + 64
META = "zarr.json"

Entries = dict[str, str]  # path relative to the store, "/"-separated -> hex digest


def differs(path: Path) -> str:
    return f"{path}: differs from the store's manifest (damaged, or replaced after the store was written)"


def unlisted(path: Path) -> str:
    return f"{path}: not in the store's manifest (added after the store was written)"


def missing(path: Path) -> str:
    return f"{path}: missing (the store's manifest lists it)"


def seal_store(store: str | os.PathLike) -> None:
    """Write the manifest of a local store (other stores are not sealed): call once every write is done."""
    directory = local_path(store)
    if directory is None:
        return
    files = sorted(_files(directory), key=lambda file: file[0])
    lines = [f"{file_digest(path, layout)} {rel}\n" for rel, path, layout, _ in files]
    body = HEADER + "".join(lines).encode()
    atomic_write(directory / MANIFEST, body + _trailer(body))


def unseal_store(store: str | os.PathLike) -> None:
    """Remove the manifest of a local store about to change: until it is sealed again, a reader checks it as a store
    being written (incomplete groups are refused as such) instead of reporting every new file as damage."""
    directory = local_path(store)
    if directory is not None:
        (directory / MANIFEST).unlink(missing_ok=True)


def read_manifest(directory: Path) -> Entries | None:
    """The manifest's entries; None when the store has none; StoreError when it is damaged."""
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    body = data[:-TRAILER_BYTES]
    if not body.startswith(HEADER) or data[-TRAILER_BYTES:] != _trailer(body):
        raise StoreError(f"{path}: damaged manifest (its trailer is not the sha256 of the lines above it)")
    entries = {}
    for line in body[len(HEADER):].decode().splitlines():
        digest, _, rel = line.partition(" ")
        entries[rel] = digest
    return entries


def manifest_problems(directory: Path) -> list[str] | None:
    """`kdcache verify`'s check: a line per file missing, added or changed; None when the store has no manifest.
    The shards of an array whose zarr.json changed are not compared: their layout is in doubt."""
    try:
        entries = read_manifest(directory)
    except StoreError as e:
        return [str(e)]
    if entries is None:
        return None
    files = {rel: (path, layout, meta) for rel, path, layout, meta in _files(directory)}
    problems = [missing(directory / rel) for rel in sorted(entries.keys() - files.keys())]
    problems += [unlisted(files[rel][0]) for rel in sorted(files.keys() - entries.keys())]
    common = sorted(entries.keys() & files.keys())
    changed = {rel for rel in common if _is_meta(rel) and file_digest(files[rel][0], None) != entries[rel]}
    for rel in common:
        path, layout, meta = files[rel]
        if rel in changed or (meta not in changed and not _is_meta(rel) and file_digest(path, layout) != entries[rel]):
            problems.append(differs(path))
    return problems


def checked_manifest(store: str | os.PathLike, split: str, teachers: list[str] | None) -> Entries | None:
    """The manifest of a local store once `check_documents` passed for a read of `split` and `teachers` (None:
    every teacher it lists); None for a store without one, or one that is not local."""
    directory = local_path(store)
    entries = None if directory is None or _other_version(directory) else read_manifest(directory)
    if entries is not None:
        listed = sorted({rel.split("/")[1] for rel in entries if rel.startswith(f"{TEACHERS}/") and rel.count("/") > 1})
        check_documents(directory, entries, split, listed if teachers is None else teachers)
    return entries


def _other_version(directory: Path) -> bool:
    """Whether the root document names another format version: such a store is refused for its version (by
    `schema.open_store`), whose rules its manifest may not follow."""
    try:
        version = json.loads((directory / META).read_bytes())["attributes"]["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return version != FORMAT_VERSION


def check_documents(directory: Path, entries: Entries, split: str, teachers: list[str]) -> None:
    """Raise a StoreError on the first metadata document or `complete` record that a read of `split` and
    `teachers` depends on and that is missing, unlisted, or differs from the manifest (a teacher or split the
    store lacks altogether is left to the reader's own checks)."""
    teachers = [teacher for teacher in teachers if (directory / TEACHERS / teacher).is_dir()]
    groups = [f"{TOKENS}/{split}", f"{WORDS}/{split}"] + [f"{TEACHERS}/{teacher}/{split}" for teacher in teachers]
    tops = [META, f"{TOKENS}/{META}", f"{WORDS}/{META}"] + ([f"{TEACHERS}/{META}"] if teachers else [])
    tops += [f"{TEACHERS}/{teacher}/{META}" for teacher in teachers] + [f"{group}/{META}" for group in groups]
    below = sorted(rel for rel in entries for group in groups if rel.startswith(f"{group}/")
                   and (_is_meta(rel) or rel.startswith(f"{group}/{COMPLETE}/")))
    for rel in dict.fromkeys(tops + below):
        path = directory / rel
        if rel not in entries and path.is_file():
            raise StoreError(unlisted(path))
        if rel in entries and not path.is_file():
            raise StoreError(missing(path))
        if rel in entries and file_digest(path, None) != entries[rel]:
            raise StoreError(differs(path))


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


def file_digest(path: Path, layout: ShardLayout | None) -> str:
    """What the manifest lists for `path`: a shard's fingerprint under `layout`, else the sha256 of its bytes."""
    if layout is None or path.stat().st_size == 0:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return shard_fingerprint(np.memmap(path, dtype=np.uint8, mode="r"), layout)


def _trailer(body: bytes) -> bytes:
    return b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n"


def _is_meta(rel: str) -> bool:
    return rel == META or rel.endswith(f"/{META}")


def _files(directory: Path) -> Iterator[tuple[str, Path, ShardLayout | None, str | None]]:
    """Every file of the store but the manifest: (relative path, path, the sharded layout it is a shard of or
    None, the relative path of that array's zarr.json or None)."""
    owners: dict[Path, tuple[ShardLayout, str] | None] = {}  # directory -> the sharded array it lies in
    for parent, dirs, names in os.walk(directory):
        here = Path(parent)
        owners[here] = _sharded(here, directory) if META in names else owners.get(here.parent)
        for name in names:
            path = here / name
            if path != directory / MANIFEST and path.is_file():
                owner = None if name == META else owners[here]
                yield path.relative_to(directory).as_posix(), path, *(owner or (None, None))


def _sharded(array_dir: Path, directory: Path) -> tuple[ShardLayout, str] | None:
    """(layout, relative path of its zarr.json) when `array_dir` holds a sharded array the reader decodes."""
    try:
        return parse_layout(array_dir), (array_dir / META).relative_to(directory).as_posix()
    except StoreError:
        return None
