"""The store's two lossless Zarr v3 array -> array codecs (spec: docs/cache-format.md).

`kdcache.sorted_key_delta` (topk_logits): sorted top-k logits differ little from their neighbours, but their
float16 bit patterns compress poorly (77 B of 128 per top-64 row of a teacher trained on BabyLM text). The
codec maps each float16 to an order-preserving uint16 key (the sign bit set for non-negative values, every bit
flipped for negative ones, so that key order is value order), keeps each row's first key (the row maximum) and
replaces every other key by the previous key minus it, modulo 2**16. Sorted rows give small non-negative
differences that compress to 57 B; the modular arithmetic makes the round trip exact for any float16 data,
sorted or not, NaN payloads included. The last axis is the row.

`kdcache.vocab_rank` (topk_ids): each uint16 token id is replaced by its rank in a vocabulary order that the
codec's configuration holds (kdcache writes the ids by descending frequency in the split's tokens). A
teacher's top-k favours frequent tokens, so ranks are mostly small numbers whose high bit planes are all zero,
which bitshuffle + lz4 store in fewer bytes (84 -> 72 B per top-64 row of a teacher trained on BabyLM text).
Values outside the order (>= its length) stay as they are, so every uint16 round-trips. A vocabulary beyond
65,536 ids has uint32 ids and ranks: the configuration then says `"dtype": "uint32"` and its order is uint32.

Both are registered with zarr-python on import (and through the `zarr.codecs` entry point, so plain
zarr-python reads a kdcache store when kdcache is installed); `kdcache.cache.encoder` and `.reader` call the same
`encode_array` / `decode_array` on whole shards and batches.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from zarr.abc.codec import ArrayArrayCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import NDBuffer
from zarr.core.dtype import parse_dtype
from zarr.registry import register_codec

SORTED_KEY_DELTA = "kdcache.sorted_key_delta"
VOCAB_RANK = "kdcache.vocab_rank"
SIGN = np.uint16(0x8000)
UINT16_VALUES = 2**16
ID_DTYPES = ("uint16", "uint32")  # token ids: uint16 up to 65,536 ids, uint32 beyond


def encode_sorted_key_delta(values: np.ndarray) -> np.ndarray:
    """float16 [..., k] -> uint16 [..., k]: the first key of each row, then key[i-1] - key[i] (mod 2**16)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    keys = np.where(bits & SIGN, ~bits, bits | SIGN).astype(np.uint16)
    out = keys.copy()
    np.subtract(keys[..., :-1], keys[..., 1:], out=out[..., 1:])
    return out


def decode_sorted_key_delta(encoded: np.ndarray) -> np.ndarray:
    """The inverse, in place: `encoded` (native uint16, C-contiguous, writable) becomes its float16 view."""
    np.cumsum(encoded[..., 1:], axis=-1, dtype=np.uint16, out=encoded[..., 1:])
    np.subtract(encoded[..., :1], encoded[..., 1:], out=encoded[..., 1:])  # the keys
    # key -> bits: a key with the sign bit set loses it (x ^ 0x8000), any other has every bit flipped (x ^ 0xffff).
    mask = encoded.view(np.int16) >> 15  # -1 where the sign bit is set, else 0
    np.invert(mask, out=mask)
    mask |= np.int16(-0x8000)
    encoded ^= mask.view(np.uint16)
    return encoded.view(np.float16)


@dataclass(frozen=True)
class ArrayTransform(ArrayArrayCodec):
    """What the two codecs share: a numpy transform of `value_dtype` arrays to `stored_dtype` and back, for zarr."""

    is_fixed_size = True
    codec_name: ClassVar[str]
    value_dtype: ClassVar[np.dtype]
    stored_dtype: ClassVar[np.dtype] = np.dtype(np.uint16)  # what the `bytes` codec after it stores

    def encode_array(self, values: np.ndarray) -> np.ndarray:
        """value_dtype [...] -> a new native stored_dtype array of the same shape."""
        raise NotImplementedError

    def decode_array(self, stored: np.ndarray) -> np.ndarray:
        """The inverse, in place: `stored` (native stored_dtype, C-contiguous, writable) becomes a value_dtype view."""
        raise NotImplementedError

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if dtype.to_native_dtype() != self.value_dtype or not shape:
            raise ValueError(f"{self.codec_name} encodes {self.value_dtype} arrays of at least one axis, "
                             f"not {dtype} {shape}")

    def resolve_metadata(self, chunk_spec: ArraySpec) -> ArraySpec:
        return replace(chunk_spec, dtype=parse_dtype(self.stored_dtype, zarr_format=3))

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        return input_byte_length

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        encoded = self.encode_array(chunk_array.as_numpy_array())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(encoded)

    async def _decode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        stored = np.array(chunk_array.as_numpy_array(), dtype=self.stored_dtype, order="C")  # a native, writable copy
        return chunk_spec.prototype.nd_buffer.from_numpy_array(self.decode_array(stored))


@dataclass(frozen=True)
class SortedKeyDeltaCodec(ArrayTransform):
    """float16 rows sorted descending -> their first key, then key differences; no configuration."""

    codec_name = SORTED_KEY_DELTA
    value_dtype = np.dtype(np.float16)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SortedKeyDeltaCodec:
        if data.get("name") != SORTED_KEY_DELTA or data.get("configuration", {}):
            raise ValueError(f"not a {SORTED_KEY_DELTA} codec without configuration: {data}")
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": SORTED_KEY_DELTA}

    def encode_array(self, values: np.ndarray) -> np.ndarray:
        return encode_sorted_key_delta(values)

    def decode_array(self, stored: np.ndarray) -> np.ndarray:
        return decode_sorted_key_delta(stored)


@dataclass(frozen=True)
class VocabRankCodec(ArrayTransform):
    """Token ids -> their ranks in `order` (the ids at ranks 0, 1, ..., as little-endian `dtype` bytes); `dtype` is
    uint16, or uint32 for a vocabulary beyond 65,536 ids."""

    order: bytes
    dtype: str = "uint16"
    codec_name = VOCAB_RANK

    def __post_init__(self) -> None:
        if self.dtype not in ID_DTYPES:
            raise ValueError(f"{VOCAB_RANK}: dtype must be one of {ID_DTYPES}, got {self.dtype!r}")
        size = self.value_dtype.itemsize
        n = len(self.order) // size
        order = np.frombuffer(self.order[:size * n], dtype=self.value_dtype.newbyteorder("<"))
        if len(self.order) % size or not 1 <= n <= 2 ** (8 * size) or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"{VOCAB_RANK}: order must list each id 0..n-1 exactly once, as little-endian "
                             f"{self.dtype} (n <= {2 ** (8 * size)}); got {len(self.order)} bytes that do not")

    @property
    def value_dtype(self) -> np.dtype:  # type: ignore[override]
        return np.dtype(self.dtype)

    @property
    def stored_dtype(self) -> np.dtype:  # type: ignore[override]
        return self.value_dtype

    @classmethod
    def from_order(cls, order: np.ndarray, dtype: str = "uint16") -> VocabRankCodec:
        return cls(np.asarray(order).astype(np.dtype(dtype).newbyteorder("<")).tobytes(), dtype)

    @classmethod
    def from_base64(cls, text: str, dtype: str = "uint16") -> VocabRankCodec:
        try:
            order = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError) as e:
            raise ValueError(f"{VOCAB_RANK}: order is not base64 ({e})") from None
        return cls(order, dtype)

    @property
    def order_base64(self) -> str:
        """The order as its configuration holds it."""
        return base64.b64encode(self.order).decode("ascii")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VocabRankCodec:
        conf = data.get("configuration", {})
        if data.get("name") != VOCAB_RANK or set(conf) - {"dtype"} != {"order"} or not isinstance(conf["order"], str):
            raise ValueError(f"not a {VOCAB_RANK} codec with a base64 'order': {str(data)[:200]}")
        return cls.from_base64(conf["order"], conf.get("dtype", "uint16"))

    def to_dict(self) -> dict[str, Any]:
        dtype = {} if self.dtype == "uint16" else {"dtype": self.dtype}  # uint16 stores keep their metadata as it was
        return {"name": VOCAB_RANK, "configuration": {"order": self.order_base64, **dtype}}

    @cached_property
    def _ids(self) -> np.ndarray:
        """rank -> id: the order, then (uint16 only) every value past it as itself, so the table covers uint16."""
        order = np.frombuffer(self.order, dtype=self.value_dtype.newbyteorder("<"))
        size = UINT16_VALUES if self.dtype == "uint16" else order.size
        ids = np.arange(size, dtype=self.value_dtype)
        ids[:order.size] = order
        return ids

    @cached_property
    def _ranks(self) -> np.ndarray:
        """id -> rank, the inverse permutation."""
        ranks = np.empty_like(self._ids)
        ranks[self._ids] = np.arange(self._ids.size, dtype=self.value_dtype)
        return ranks

    def encode_array(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=self.value_dtype)
        if self.dtype == "uint16":  # the table covers every uint16
            return self._ranks[values]
        return _lookup_inside(self._ranks, values)

    def decode_array(self, stored: np.ndarray) -> np.ndarray:
        if self.dtype == "uint16":
            # mode="wrap" never wraps (a uint16 indexes 65536 entries) but, unlike "raise", needs no buffer.
            return np.take(self._ids, stored, out=stored, mode="wrap")
        stored[...] = _lookup_inside(self._ids, stored)
        return stored


def _lookup_inside(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """table[values] where a value indexes the table; any other value as it is (a new array)."""
    inside = values < table.size
    return np.where(inside, table[np.where(inside, values, 0)], values)


ARRAY_TRANSFORMS: dict[str, type[ArrayTransform]] = {SORTED_KEY_DELTA: SortedKeyDeltaCodec,
                                                     VOCAB_RANK: VocabRankCodec}
for _name, _codec in ARRAY_TRANSFORMS.items():
    register_codec(_name, _codec)
