"""Cross-tokenizer teacher groups: a teacher with its own tokenizer, its targets per its own token, aligned by bytes.

A group whose attribute `kind` is `cross_tokenizer` holds, per stored sequence, the sequence's bytes as the
teacher's tokenizer cut them (ragged: `n_i <= teacher_len` tokens, padded with zeros) and the alignment of the
run's token positions to the teacher's (spec: docs/cache-format.md, "Cross-tokenizer teacher groups"):

    teachers/<name>/<split>/t_tokens       [N, Lt] the teacher's token ids (0 after the sequence's n_i tokens)
                            t_byte_end     [N, Lt] int32: the byte offset where each teacher token ends (0 = padding)
                            t_topk_logits  [N, Lt, k] float16, sorted descending (kdcache.sorted_key_delta)
                            t_topk_ids     [N, Lt, k] the ids of those logits, in the teacher's vocabulary
                            t_lse          [N, Lt, n_T] float32: logsumexp(logits / T) over the teacher's vocabulary
                            t_next_logit   [N, Lt] float32: the logit of the teacher's own next token (0 at the last)
                            align          [N, L] int32: the teacher token that ends where run token j ends, else -1
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from kdcache.cache.codecs import SORTED_KEY_DELTA
from kdcache.cache.schema import ArraySpec, ids_dtype

KIND = "cross_tokenizer"  # the `kind` attribute of such a teacher group (same-tokenizer groups have none)
TEACHER_AXIS = ("t_tokens", "t_byte_end", "t_topk_logits", "t_topk_ids", "t_lse", "t_next_logit")
ALIGN = "align"  # the one array on the run's position axis
NO_MATCH = -1  # vocab_map / prefix_map entry with no counterpart; align entry of no shared boundary


def is_cross(group_attrs: dict[str, Any]) -> bool:
    return group_attrs.get("kind") == KIND


def xtok_array_specs(k: int, teacher_vocab: int, n_temperatures: int) -> dict[str, ArraySpec]:
    """Every array of one cross-tokenizer teacher split (the second axis: teacher tokens, or run positions for
    `align`). Teacher ids are not rank-coded: kdcache.vocab_rank's order is the run vocabulary's."""
    ids = ids_dtype(teacher_vocab)
    return {
        "t_tokens": ArraySpec((), ids, shuffle="bitshuffle"),
        "t_byte_end": ArraySpec((), "int32", shuffle="bitshuffle"),
        "t_topk_logits": ArraySpec((k,), "float16", shuffle="bitshuffle", transform=SORTED_KEY_DELTA),
        "t_topk_ids": ArraySpec((k,), ids, shuffle="bitshuffle"),
        "t_lse": ArraySpec((n_temperatures,), "float32", shuffle="bitshuffle"),
        "t_next_logit": ArraySpec((), "float32", shuffle="bitshuffle"),
        ALIGN: ArraySpec((), "int32", shuffle="bitshuffle"),
    }


def axis_lengths(group_attrs: dict[str, Any]) -> dict[str, int]:
    """Array name -> the length of its second axis when it is not the run's seq_len (the teacher-token arrays)."""
    return dict.fromkeys(TEACHER_AXIS, int(group_attrs["teacher_len"])) if is_cross(group_attrs) else {}


def encode_vocab_map(mapping: np.ndarray) -> str:
    """An id map attribute: base64 of little-endian int32 (`vocab_map`: the run id of each teacher id; `prefix_map`:
    the teacher id of each run id; NO_MATCH: none)."""
    return base64.b64encode(np.asarray(mapping, dtype="<i4").tobytes()).decode("ascii")


def decode_vocab_map(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i4").astype(np.int64)


def ragged_problem(byte_end: np.ndarray, align: np.ndarray) -> str | None:
    """What breaks the ragged layout in a block of sequences ([n, Lt] byte ends, [n, L] alignment), or None:
    each row's byte ends rise strictly then are 0 (padding); align is -1 or a teacher token index, rising."""
    counts = (byte_end > 0).sum(-1)
    valid = np.arange(byte_end.shape[1]) < counts[:, None]
    if ((byte_end > 0) != valid).any():
        return "teacher byte ends: padding (0) before the end of a sequence's tokens"
    rises = np.diff(byte_end, axis=-1) > 0
    if (~rises & valid[:, 1:]).any():
        return "teacher byte ends do not rise within a sequence"
    if (align < NO_MATCH).any() or (align >= counts[:, None]).any():
        return "align holds an index outside the sequence's teacher tokens"
    earlier = np.maximum.accumulate(align, axis=-1)[:, :-1]  # the largest index before each position
    if ((align[:, 1:] >= 0) & (align[:, 1:] <= earlier)).any():
        return "align is not strictly rising"
    return None
