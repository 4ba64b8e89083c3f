"""Caching a teacher with its own tokenizer: each sequence's bytes re-tokenised, aligned by byte offsets, targets
per teacher token.

For every stored sequence, the exact bytes of its run tokens are decoded as UTF-8 and encoded by the teacher's
tokenizer; the teacher's tokens must give back the same bytes (a leading space its pre-tokenizer adds is allowed:
counted in its first token, or dropped when it is a token of its own). A sequence whose bytes do not survive (not UTF-8 at a cut, or changed by the
teacher's normaliser) is kept with no teacher tokens; more than ROUNDTRIP_LIMIT of a split refuses the teacher.
The teacher then runs on its own tokens, and its top-k, logsumexps and the logit of its actual next token are
stored per teacher token, with `align` mapping each run position to the teacher token ending at the same byte
(layout: kdcache.cache.xtok).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from tokenizers import Tokenizer

from kdcache.cache.encoder import ShardedArrayWriter
from kdcache.cache.schema import (
    TEACHERS, TOKENS, StoreError, completed_shards, mark_shard_complete, num_shards, sha256_file, shard_range,
    tokenizer_sha256,
)
from kdcache.cache.xtok import ALIGN, KIND, NO_MATCH, encode_vocab_map, xtok_array_specs
from kdcache.config import Config, run_paths
from kdcache.precompute.plan import GroupPlan, common_attrs, with_digest
from kdcache.precompute.targets import check_finite, forward, topk_targets
from kdcache.precompute.teachers import Teacher
from kdcache.precompute.writer import refuse_full_disk
from kdcache.progress import with_progress
from kdcache.runtime import Dist

if TYPE_CHECKING:
    from kdcache.precompute.run import PrecomputeStats

ROUNDTRIP_LIMIT = 0.01  # the share of a split's sequences a teacher's tokenizer may fail to reproduce byte for byte


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable character map (bytes_to_unicode), which byte-level BPE token strings are in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for: byte-level token strings through GPT-2's byte map, others as UTF-8
    with SentencePiece's '▁' as a space and <0xNN> byte-fallback tokens as that byte. Specials are b''."""
    table = _byte_level_table()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    out = [b""] * tokenizer.get_vocab_size()
    for token, i in tokenizer.get_vocab().items():
        if token in specials:
            continue
        if all(c in table for c in token):
            out[i] = bytes(table[c] for c in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = bytes([int(token[3:5], 16)])
        else:
            out[i] = token.replace("▁", " ").encode("utf-8")
    return out


@dataclass
class Retokenized:
    """One split re-tokenised: the teacher's tokens per sequence (ragged, zero-padded) and the alignment."""

    ids: list[np.ndarray]  # per sequence: the teacher's token ids (empty where the bytes did not round-trip)
    byte_end: list[np.ndarray]  # per sequence: the byte offset where each teacher token ends
    align: np.ndarray  # [N, L] int32: the teacher token ending where run token j ends, else NO_MATCH
    failed: np.ndarray  # [N] bool: the teacher's tokens do not give back the sequence's bytes

    @property
    def longest(self) -> int:
        return max((len(ids) for ids in self.ids), default=0)

    def padded(self, rows: range, length: int) -> tuple[np.ndarray, np.ndarray]:
        """[n, length] ids and byte ends of `rows`, zero after each sequence's tokens."""
        ids, ends = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int32)
        for out, row in enumerate(rows):
            ids[out, :len(self.ids[row])] = self.ids[row]
            ends[out, :len(self.byte_end[row])] = self.byte_end[row]
        return ids, ends


def retokenize(tokens: np.ndarray, run_bytes: list[bytes], teacher: Tokenizer, teacher_bytes: list[bytes]) -> Retokenized:
    """Each [L] row of run token ids as bytes, then as the teacher's tokens, aligned on shared byte ends."""
    lengths = np.array([len(b) for b in run_bytes], dtype=np.int64)
    run_ends = np.cumsum(lengths[tokens], axis=1)
    texts, decodable = [], np.ones(len(tokens), dtype=bool)
    raw = [b"".join(run_bytes[i] for i in row) for row in tokens.tolist()]
    for n, data in enumerate(raw):
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:  # a sequence cut inside a multi-byte character
            texts.append("")
            decodable[n] = False
    encodings = teacher.encode_batch(texts, add_special_tokens=False)
    ids, ends = [], []
    align = np.full(tokens.shape, NO_MATCH, dtype=np.int32)
    for n, (data, encoding) in enumerate(zip(raw, encodings)):
        got = b"".join(teacher_bytes[i] for i in encoding.ids)
        shift = 0 if got == data else 1 if got == b" " + data and not data.startswith(b" ") else None
        if not decodable[n] or shift is None or not data:
            decodable[n] = False
            ids.append(np.zeros(0, np.int64))
            ends.append(np.zeros(0, np.int32))
            continue
        own = encoding.ids[1:] if shift and teacher_bytes[encoding.ids[0]] == b" " else encoding.ids
        shift = shift if len(own) == len(encoding.ids) else 0  # the added space was a token alone: dropped
        end = np.cumsum([len(teacher_bytes[i]) for i in own]) - shift
        ids.append(np.array(own, dtype=np.int64))
        ends.append(end.astype(np.int32))
        at = np.searchsorted(end, run_ends[n]).clip(max=len(end) - 1)
        align[n] = np.where(end[at] == run_ends[n], at, NO_MATCH)
    return Retokenized(ids, ends, align, ~decodable)


def _first_id_of_bytes(token_bytes: list[bytes]) -> dict[bytes, int]:
    """Bytes -> the first id that stands for them (specials, b'', left out)."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes):
        if b:
            by_bytes.setdefault(b, i)
    return by_bytes


def vocab_map(run_bytes: list[bytes], teacher_bytes: list[bytes]) -> np.ndarray:
    """For each teacher id, the run id of the same bytes (the first, if several), else NO_MATCH."""
    by_bytes = _first_id_of_bytes(run_bytes)
    return np.array([by_bytes.get(b, NO_MATCH) if b else NO_MATCH for b in teacher_bytes], dtype=np.int64)


def prefix_map(run_bytes: list[bytes], teacher_bytes: list[bytes]) -> np.ndarray:
    """For each run id, the teacher id of the longest teacher token its bytes begin with (the teacher's first token
    of that text, by longest match), else NO_MATCH."""
    by_bytes = _first_id_of_bytes(teacher_bytes)
    longest = max(map(len, by_bytes), default=0)
    out = np.full(len(run_bytes), NO_MATCH, dtype=np.int64)
    for i, b in enumerate(run_bytes):
        out[i] = next((by_bytes[b[:n]] for n in range(min(len(b), longest), 0, -1) if b[:n] in by_bytes), NO_MATCH)
    return out


@dataclass
class CrossTeacher:
    """What caching one cross-tokenizer teacher needs beside the teacher: every split re-tokenised, its plan."""

    splits: dict[str, Retokenized]
    plan: GroupPlan


def run_tokenizer(cfg: Config, runs_root: str | Path, store: str, store_sha: str) -> Tokenizer:
    """The run's tokenizer (runs/<name>/tokenizer), which turns the stored token ids back into bytes."""
    directory = run_paths(cfg, runs_root).tokenizer
    if not (directory / "tokenizer.json").is_file() or tokenizer_sha256(directory) != store_sha:
        raise StoreError(f"{directory}: a cross-tokenizer teacher needs the tokenizer the tokens of {store} were "
                         f"made with (sha256 {store_sha}) here, to turn its token ids back into bytes")
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def prepare_cross_teacher(cfg: Config, teacher: Teacher, root: zarr.Group, store: str, store_attrs: dict,
                          runs_root: str | Path, precision: str) -> CrossTeacher:
    """Re-tokenise every split with the teacher's tokenizer, refuse it if too many sequences do not round-trip or
    its context is too short, and plan its group."""
    run_tok = run_tokenizer(cfg, runs_root, store, store_attrs["tokenizer_sha256"])
    own = Tokenizer.from_file(teacher.tokenizer)
    run_bytes, own_bytes = token_bytes(run_tok), token_bytes(own)
    splits = {split: retokenize(root[f"{TOKENS}/{split}"][...], run_bytes, own, own_bytes) for split in cfg.cache.splits}
    where = f"teacher {teacher.name!r} ({teacher.identity['source']}): its tokenizer {teacher.tokenizer}"
    for split, retok in splits.items():
        if (share := retok.failed.mean()) > ROUNDTRIP_LIMIT:
            first = int(np.flatnonzero(retok.failed)[0])
            raise StoreError(f"{where} does not reproduce the bytes of {share:.1%} of the {split} sequences "
                             f"({int(retok.failed.sum())} of {len(retok.failed)}, first: sequence {first}); "
                             f"at most {ROUNDTRIP_LIMIT:.0%} may fail (its normaliser changes the text, or the text is "
                             "not UTF-8 at sequence cuts)")
    length = max(retok.longest for retok in splits.values())
    context = getattr(teacher.model.config, "max_position_embeddings", None) or teacher.model.config.n_positions
    if length > context:
        raise StoreError(f"{where} cuts a sequence into {length} tokens, more than the teacher's {context} positions")
    vocab = teacher.model.config.vocab_size
    specs = xtok_array_specs(cfg.cache.k, vocab, len(cfg.cache.temperatures))
    attrs = {
        **teacher.identity,
        **common_attrs(cfg, specs, ["cross_tokenizer"], store_attrs, precision),
        "kind": KIND,
        "teacher_tokenizer_sha256": sha256_file(teacher.tokenizer),
        "teacher_vocab_size": vocab,
        "teacher_len": length,
        "vocab_map": encode_vocab_map(vocab_map(run_bytes, own_bytes)),
        "prefix_map": encode_vocab_map(prefix_map(run_bytes, own_bytes)),
        "roundtrip_failed": {split: int(retok.failed.sum()) for split, retok in splits.items()},
        "hidden_layers": [], "hidden_dtype": None, "samples": 0, "sample_temperature": None,
    }
    lengths = {name: length for name in specs if name != ALIGN}
    return CrossTeacher(splits, GroupPlan(teacher.name, specs, with_digest(attrs), lengths))


def shard_arrays(teacher: Teacher, ids: np.ndarray, ends: np.ndarray, cfg: Config, device: torch.device,
                 where: tuple[str, int]) -> dict[str, np.ndarray]:
    """The teacher-token arrays of one shard's sequences ([n, Lt] ids, zero-padded), zero past each sequence."""
    valid = torch.from_numpy(ends > 0)
    parts: list[dict[str, torch.Tensor]] = []
    for lo in range(0, len(ids), cfg.cache.batch_size):
        batch = torch.from_numpy(ids[lo:lo + cfg.cache.batch_size]).to(device)
        logits = forward(teacher.model, batch).logits  # right padding: a causal model's real positions see none
        arrays = topk_targets(logits, cfg.cache.k, cfg.cache.temperatures)
        check_finite(teacher.name, arrays, where[0], where[1] + lo)
        following = logits[:, :-1].gather(-1, batch[:, 1:, None])[..., 0].float()
        arrays["t_next_logit"] = torch.cat([following, torch.zeros_like(following[:, :1])], dim=1)
        parts.append({name: value.cpu() for name, value in arrays.items()})
    # a token's next logit exists only where the next token is real
    has_next = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    out = {"t_tokens": ids, "t_byte_end": ends}
    for name, key in (("t_topk_logits", "topk_logits"), ("t_topk_ids", "topk_ids"), ("t_lse", "lse"),
                      ("t_next_logit", "t_next_logit")):
        value = torch.cat([p[key] for p in parts])
        keep = has_next if name == "t_next_logit" else valid
        out[name] = torch.where(keep.reshape(*keep.shape, *[1] * (value.dim() - 2)), value, 0).numpy()
    return out


def cross_pass(root: zarr.Group, store: str, teacher: Teacher, cross: CrossTeacher, cfg: Config, d: Dist,
               stats: PrecomputeStats) -> None:
    """Compute and write this rank's incomplete shards of every split of a cross-tokenizer teacher."""
    per_shard, length = cfg.data.sequences_per_shard, cross.plan.attrs["teacher_len"]
    start = time.perf_counter()
    for split, retok in cross.splits.items():
        group = root[f"{TEACHERS}/{teacher.name}/{split}"]
        writers = {name: ShardedArrayWriter(store, f"{group.path}/{name}") for name in cross.plan.specs}
        done, n = completed_shards(group), len(retok.failed)
        mine = [shard for shard in range(d.rank, num_shards(n, per_shard), d.world) if not done[shard]]
        stats.shards_skipped += len(range(d.rank, num_shards(n, per_shard), d.world)) - len(mine)
        for shard in with_progress(mine, len(mine), f"{teacher.name} {split} (own tokenizer)", "shard",
                                   disable=not d.main):
            rows = shard_range(shard, n, per_shard)
            ids, ends = retok.padded(rows, length)
            arrays = shard_arrays(teacher, ids, ends, cfg, d.device, (split, rows.start))
            arrays[ALIGN] = retok.align[rows.start:rows.stop]
            with refuse_full_disk(store, f"writing {teacher.name} {split} shard {shard}"):
                for name, values in arrays.items():
                    writers[name].write(shard, values)
                mark_shard_complete(group, shard)
            stats.positions += int((ends > 0).sum())
            stats.shards_written += 1
    stats.seconds += time.perf_counter() - start
