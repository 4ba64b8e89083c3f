"""A sharded array's layout on disk: its zarr.json parsed into what the direct reader and encoder need.

Only the layouts kdcache writes are accepted (spec: docs/cache-format.md): shards of whole sequences whose
inner chunk is one sequence, encoded by [kdcache transform?, bytes, blosc?, crc32c?], and a shard index of
(offset, nbytes) little-endian uint64 pairs followed by its crc32c. Anything else is refused with a
StoreError, so `kdcache.cache.reader` and `kdcache.cache.encoder` agree on every byte they touch. Also
where a local store lives (`local_path`) and how many bytes its files hold (`dir_bytes`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.codecs import ARRAY_TRANSFORMS, ArrayTransform
from kdcache.cache.schema import StoreError

EMPTY = 2**64 - 1  # offset and nbytes of an inner chunk that was never written: read as the fill value
CRC_BYTES = 4
DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"}


def local_path(store: str | os.PathLike) -> Path | None:
    """The directory of a local store (plain path or file:// URL); None for any other fsspec URL."""
    scheme, sep, rest = str(store).partition("://")
    if not sep:
        return Path(store)
    return Path(rest) if scheme == "file" else None


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under `path` (scandir only: no data is read)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += dir_bytes(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


@dataclass(frozen=True)
class ShardLayout:
    """What one array's zarr.json says, restricted to the sharded layouts the direct reader decodes."""

    shape: tuple[int, ...]
    dtype: np.dtype  # what the `bytes` codec stored, in its byte order (the transform's stored_dtype under one)
    per_shard: int  # sequences per shard; the inner chunk is one sequence
    fill_value: np.ndarray  # an unwritten chunk's stored values (broadcast over a chunk)
    transform: ArrayTransform | None  # the kdcache array -> array codec that starts the inner chain, if any
    blosc: dict[str, Any] | None  # configuration of the blosc codec after `bytes` (cname, clevel, ...), if any
    checksummed: bool  # a crc32c codec ends the inner chain
    index_at_end: bool
    separator: str

    @property
    def array_dtype(self) -> np.dtype:
        """What a read returns, in native byte order."""
        return self.transform.value_dtype if self.transform else self.dtype.newbyteorder("=")

    @property
    def compressed(self) -> bool:
        return self.blosc is not None

    @property
    def index_nbytes(self) -> int:
        return self.per_shard * 16 + CRC_BYTES

    def shard_key(self, shard: int) -> str:
        return self.separator.join(["c", str(shard), *["0"] * (len(self.shape) - 1)])


def _named(entry: Any) -> tuple[str, dict]:
    """(name, configuration) of a zarr.json {"name": ..., "configuration": ...} entry."""
    return (entry.get("name"), entry.get("configuration", {})) if isinstance(entry, dict) else (str(entry), {})


def _parse_transform(codec: Any, dtype: np.dtype, where: str) -> ArrayTransform | None:
    """The kdcache array -> array codec `codec` names (None for any other codec), checked against the array."""
    name, conf = _named(codec)
    if name not in ARRAY_TRANSFORMS:
        return None
    try:
        transform = ARRAY_TRANSFORMS[name].from_dict({"name": name, "configuration": conf})
    except ValueError as e:
        raise StoreError(f"{where}: {e}") from None
    if transform.value_dtype != dtype:
        raise StoreError(f"{where}: {name} encodes {transform.value_dtype}, not {dtype}")
    return transform


def _parse_inner_codecs(codecs: list, dtype: np.dtype, where: str) -> tuple[ArrayTransform | None, np.dtype,
                                                                             dict | None, bool]:
    """[kdcache transform?, bytes, blosc?, crc32c?] -> (the transform or None, stored dtype with its byte order,
    blosc configuration or None, checksummed)."""
    transform = _parse_transform(codecs[0], dtype, where) if codecs else None
    serial = [_named(c) for c in (codecs[1:] if transform else codecs)]  # what follows the array -> array codec
    names = [name for name, _ in serial]
    if not names or names[0] != "bytes" or names[1:] not in ([], ["blosc"], ["crc32c"], ["blosc", "crc32c"]):
        shown = [transform.codec_name] + names if transform else names
        raise StoreError(f"{where}: inner codecs {shown} not supported "
                         f"(optionally one of {sorted(ARRAY_TRANSFORMS)}, bytes, then optionally blosc, then crc32c)")
    chunk_dtype = transform.stored_dtype if transform else dtype
    endian = serial[0][1].get("endian")
    if endian not in ("little", "big") and not (endian is None and chunk_dtype.itemsize == 1):
        raise StoreError(f"{where}: bytes codec endian {endian!r} not supported for {chunk_dtype}")
    stored = chunk_dtype.newbyteorder("<" if endian != "big" else ">")
    blosc = serial[1][1] if "blosc" in names else None
    return transform, stored, blosc, names[-1] == "crc32c"


def parse_layout(array_dir: Path) -> ShardLayout:
    """Read and validate `array_dir/zarr.json`; refuse any layout the direct reader cannot decode."""
    meta_path = array_dir / "zarr.json"
    try:
        text = meta_path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{meta_path}: array metadata not found") from None
    return layout_from_json(text, str(meta_path))


def layout_from_json(text: str | bytes, where: str) -> ShardLayout:
    """`parse_layout` of zarr.json text read from anywhere (`where` names it in errors)."""
    try:
        meta = json.loads(text)
    except ValueError as e:  # not JSON, or not UTF-8
        raise StoreError(f"{where}: not valid JSON ({e})") from None
    try:
        return _layout(meta, where)
    except StoreError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:  # valid JSON of the wrong shape
        raise StoreError(f"{where}: malformed array metadata ({e.__class__.__name__}: {e})") from None


def _layout(meta: Any, where: str) -> ShardLayout:
    """`layout_from_json` of the parsed document."""
    if not isinstance(meta, dict):
        raise StoreError(f"{where}: not a Zarr v3 array")

    def refuse(what: str) -> StoreError:
        return StoreError(f"{where}: {what}")

    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise refuse("not a Zarr v3 array")
    shape = tuple(meta.get("shape", ()))
    if len(shape) < 2:
        raise refuse(f"shape {list(shape)}: expected [sequences, positions, ...]")
    if meta.get("data_type") not in DTYPES:
        raise refuse(f"data_type {meta.get('data_type')!r} not supported")
    dtype = np.dtype(meta["data_type"])
    if meta.get("storage_transformers"):
        raise refuse("storage transformers not supported")
    grid_name, grid = _named(meta.get("chunk_grid", {}))
    shard_shape = tuple(grid.get("chunk_shape", ()))
    if grid_name != "regular" or len(shard_shape) != len(shape) or shard_shape[1:] != shape[1:] or shard_shape[0] < 1:
        raise refuse(f"chunk grid {meta.get('chunk_grid')}: expected shards of whole sequences {['n', *shape[1:]]}")
    key_name, key = _named(meta.get("chunk_key_encoding", {}))
    separator = key.get("separator", "/")
    if key_name != "default" or separator not in ("/", "."):
        raise refuse(f"chunk key encoding {meta.get('chunk_key_encoding')} not supported")
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or _named(codecs[0])[0] != "sharding_indexed":
        raise refuse(f"codecs {[_named(c)[0] for c in codecs]}: expected one sharding_indexed codec")
    sharding = _named(codecs[0])[1]
    if tuple(sharding.get("chunk_shape", ())) != (1, *shape[1:]):
        raise refuse(f"inner chunk shape {sharding.get('chunk_shape')}: expected one sequence {[1, *shape[1:]]}")
    transform, stored, blosc, checksummed = _parse_inner_codecs(sharding.get("codecs", []), dtype, where)
    index_codecs = [_named(c) for c in sharding.get("index_codecs", [])]
    if index_codecs != [("bytes", {"endian": "little"}), ("crc32c", {})]:
        raise refuse(f"index codecs {sharding.get('index_codecs')}: expected bytes (little endian), crc32c")
    location = sharding.get("index_location", "end")
    if location not in ("start", "end"):
        raise refuse(f"index_location {location!r} not supported")
    try:
        fill = meta.get("fill_value")
        fill_value = np.array(float(fill) if isinstance(fill, str) else fill, dtype=dtype)
    except (TypeError, ValueError):
        raise refuse(f"fill_value {meta.get('fill_value')!r} not supported for {dtype}") from None
    if transform:  # a chunk of fill values, as stored: decoding it gives the fill value back
        fill_value = transform.encode_array(np.full(shape[1:], fill_value))
    return ShardLayout(shape, stored, shard_shape[0], fill_value, transform, blosc, checksummed, location == "end",
                       separator)
