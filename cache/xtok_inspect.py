"""Cross-tokenizer teacher groups for people: one position (`show`) and sampled statistics (`stats`).

At run position j, a cross-tokenizer teacher (cache.xtok) is shown with its own tokens of the sequence up to the
byte where run token j ends and, when one of its tokens ends there (`align`), its prediction of the next token
in its own vocabulary; tokens are shown through the teacher's tokenizer when its directory (the group's `source`)
still holds it, else through the run's token with the same bytes, else as ids. The statistics are what decides
how much a cross-tokenizer form can use: the share of run positions aligned, teacher tokens per run token, and
the teacher's probability mass on tokens that are run tokens at the aligned positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from kdcache.cache import stats as st
from kdcache.cache.layout import local_path
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import TEACHERS, sha256_file
from kdcache.cache.xtok import ALIGN, decode_vocab_map

POSITION_ARRAYS = ("t_tokens", "t_byte_end", "t_topk_ids", "t_topk_logits", "t_lse", ALIGN)


def read_group(root: zarr.Group, teacher: str, split: str, rows: Sequence[int], names: Sequence[str]) -> dict:
    """Arrays of one teacher's split for some sequences, through the direct (manifest-checked) reader when local."""
    store = str(root.store)
    if local_path(store) is not None:
        batch = StoreReader(store, teachers=[teacher], arrays={teacher: names}, split=split,
                            require_complete=False).batch(list(rows))
        return {name: batch[f"{teacher}/{name}"] for name in names}
    group = root[f"{TEACHERS}/{teacher}/{split}"]
    return {name: np.stack([group[name][i] for i in rows]) for name in names}


def teacher_tokenizer(attrs: dict[str, Any]) -> Any:
    """The teacher's own tokenizer, when its directory still holds the tokenizer.json the group was made with."""
    from tokenizers import Tokenizer

    path = Path(str(attrs.get("source", ""))) / "tokenizer.json"
    if path.is_file() and sha256_file(path) == attrs.get("teacher_tokenizer_sha256"):
        return Tokenizer.from_file(str(path))
    return None


def _texts(ids: np.ndarray, own: Any, mapping: np.ndarray, run: Any) -> list[str]:
    """Teacher tokens as text: its own tokenizer, else the run token of the same bytes, else #id."""
    if own is not None:
        return [own.decode([int(i)], skip_special_tokens=False) for i in ids]
    return [run.decode([int(mapping[i])]) if run is not None and mapping[i] >= 0 else f"#{int(i)}" for i in ids]


def cross_position_entry(root: zarr.Group, teacher: str, split: str, seq: int, pos: int, temperature: float,
                         top: int, run_tokenizer: Any) -> dict:
    """`show`'s entry for a cross-tokenizer teacher at run position `pos` of sequence `seq`."""
    attrs = root[f"{TEACHERS}/{teacher}"].attrs.asdict()
    a = {name: value[0] for name, value in read_group(root, teacher, split, [seq], POSITION_ARRAYS).items()}
    own, mapping = teacher_tokenizer(attrs), decode_vocab_map(attrs["vocab_map"])
    count = int((a["t_byte_end"] > 0).sum())
    at = int(a[ALIGN][pos])
    shown = int(a[ALIGN][:pos + 1].max()) + 1  # its tokens up to the last boundary both share, at or before pos
    entry: dict[str, Any] = {"cross_tokenizer": True, "aligned": at >= 0, "teacher_position": at if at >= 0 else None,
                             "teacher_tokens": _texts(a["t_tokens"][:shown], own, mapping, run_tokenizer),
                             "teacher_token_count": count, "temperatures": attrs["temperatures"], "k": attrs["k"]}
    if at < 0:
        return entry
    targets = st.Targets(a["t_topk_ids"][at], a["t_topk_logits"][at].astype(np.float32), a["t_lse"][at],
                         [float(x) for x in attrs["temperatures"]], int(attrs["teacher_vocab_size"]))
    p, tail = st.soft_targets(targets, temperature)
    ids = targets.ids[:top]
    return {**entry, "exact": tail is not None, "ids": ids.tolist(), "tokens": _texts(ids, own, mapping, run_tokenizer),
            "probs": p[:top].tolist(), "topk_mass": float(p.sum()), "tail_mass": None if tail is None else float(tail),
            "run_token_mass": float(p[mapping[targets.ids] >= 0].sum())}


def cross_text(name: str, t: dict) -> list[str]:
    """The lines `show` prints for a cross-tokenizer teacher."""
    lines = [f"{name} (own tokenizer): {t['teacher_token_count']} tokens in this sequence; up to the last shared boundary: "
             + "|".join(t["teacher_tokens"])]
    if not t["aligned"]:
        return lines + [f"{name}: none of its tokens ends where this run token ends: no target at this position"]
    lines.append(f"{name}: its position {t['teacher_position']} ends here; its next token (own vocabulary), "
                 f"top-k mass {t['topk_mass']:.4f}, tail {t['tail_mass'] if t['tail_mass'] is None else round(t['tail_mass'], 4)}, "
                 f"on run tokens {t['run_token_mass']:.4f}:")
    return lines + [f"  {rank + 1:>3} {token!r:<20} {p:.4f}" for rank, (token, p) in enumerate(zip(t["tokens"], t["probs"]))]


def cross_stats(root: zarr.Group, teacher: str, split: str, seqs: np.ndarray) -> dict:
    """Alignment rate, teacher tokens per run token, and the mass on run tokens at aligned positions (T = 1)."""
    attrs = root[f"{TEACHERS}/{teacher}"].attrs.asdict()
    names = ("t_byte_end", "t_topk_ids", "t_topk_logits", "t_lse", "t_next_logit", ALIGN)
    a = read_group(root, teacher, split, seqs.tolist(), names)
    mapping, aligned = decode_vocab_map(attrs["vocab_map"]), a[ALIGN] >= 0
    at = np.maximum(a[ALIGN], 0)[..., None]
    logits = np.take_along_axis(a["t_topk_logits"].astype(np.float32), at, axis=1)
    ids = np.take_along_axis(a["t_topk_ids"].astype(np.int64), at, axis=1)
    lse1 = a["t_lse"][..., attrs["temperatures"].index(1.0)]
    lse = np.take_along_axis(lse1, a[ALIGN].clip(0), axis=1)
    p = np.exp(logits - lse[..., None])
    run_mass = np.where(aligned, (p * (mapping[ids] >= 0)).sum(-1), np.nan)
    positions = a[ALIGN].size
    return {
        "alignment_rate": float(aligned.mean()),
        "alignment_by_position": st.by_position(aligned.astype(np.float64)),
        "teacher_tokens_per_position": float((a["t_byte_end"] > 0).sum() / positions),
        "bytes_per_position": float(a["t_byte_end"].max(-1).sum() / positions),
        "run_token_mass": st.summary(run_mass),
        "topk_mass": st.summary(np.where(aligned, p.sum(-1), np.nan)),
        "roundtrip_failed": attrs.get("roundtrip_failed", {}).get(split),
        "bits_per_byte": bits_per_byte(a["t_byte_end"], a["t_next_logit"], lse1),
    }


def bits_per_byte(byte_end: np.ndarray, next_logit: np.ndarray, lse: np.ndarray) -> float | None:
    """The teacher's cross-entropy on its own next tokens per byte they cover, in bits (comparable across
    tokenizers): each sequence's first token is not predicted, so its bytes are left out."""
    count = (byte_end > 0).sum(-1)
    has_next = np.arange(byte_end.shape[1]) < (count - 1)[:, None]
    covered = np.where(count > 1, byte_end.max(-1) - byte_end[:, 0], 0).sum()
    nats = -np.where(has_next, next_logit - lse, 0).sum()
    return float(nats / covered / np.log(2)) if covered else None
