"""What a store holds, for people: the metadata summary, one position's soft targets, and their text tables.

`summarize` reads metadata only (attributes, array shapes, completion records, file sizes), so it is instant
on any store size; `soft_target_entry` decodes one position; the sampled statistics are computed by
`kdcache.cache.stats`. The `*_text` functions lay each document out as aligned tables (`kdcache inspect |
show | stats`). Nothing here imports torch or click.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from kdcache.cache import stats as st
from kdcache.cache.layout import local_path
from kdcache.cache.storage import StoreFiles
from kdcache.cache.schema import TEACHERS, TOKENS, WORDS, StoreError, completed_shards, sha256_file, splits, teacher_names
from kdcache.cache.xtok import is_cross
from kdcache.cache.xtok_inspect import cross_position_entry, cross_text

# ---------------------------------------------------------------------------------------------------------------
# Store access and metadata


def codec_chain(array: zarr.Array) -> str:
    """The chunk codecs of an array (inside the sharding codec), e.g. 'kdcache.sorted_key_delta, blosc lz4hc5
    bitshuffle, crc32c'; the `bytes` serializer is left out."""
    codecs = [c.to_dict() for c in array.metadata.codecs]
    if codecs and codecs[0]["name"] == "sharding_indexed":
        codecs = list(codecs[0]["configuration"]["codecs"])
    names = []
    for codec in codecs:
        conf = codec.get("configuration", {})
        if codec["name"] == "blosc":
            names.append(f"blosc {conf['cname']}{conf['clevel']} {conf['shuffle']}")
        elif codec["name"] != "bytes":
            names.append(codec["name"])
    return ", ".join(names) or "none"


def array_info(array: zarr.Array, sizes: dict[str, int]) -> dict:
    on_disk = sum(size for rel, size in sizes.items() if rel.startswith(f"{array.path}/"))
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "codecs": codec_chain(array),
        "raw_bytes": int(array.nbytes),
        "bytes_on_disk": on_disk,
        "compression_ratio": array.nbytes / on_disk if on_disk else None,
    }


def teacher_summary(root: zarr.Group, name: str, sizes: dict[str, int]) -> dict:
    tgroup = root[f"{TEACHERS}/{name}"]
    attrs = tgroup.attrs
    shards, arrays, positions = {}, {}, 0
    for split in sorted(tgroup.group_keys()):
        group = tgroup[split]
        done = completed_shards(group)
        shards[split] = {"complete": int(done.sum()), "total": int(done.size)}
        positions += int(np.prod(root[f"{TOKENS}/{split}"].shape))
        for array_name in sorted(group.array_keys()):
            arrays[f"{split}/{array_name}"] = array_info(group[array_name], sizes)
    on_disk = sum(a["bytes_on_disk"] for a in arrays.values())
    raw = sum(a["raw_bytes"] for a in arrays.values())
    return {
        "k": attrs.get("k"),
        "modes": list(attrs.get("modes", [])),
        "temperatures": list(attrs.get("temperatures", [])),
        "hidden_layers": list(attrs.get("hidden_layers", [])),
        "hidden_dtype": attrs.get("hidden_dtype"),
        "samples": attrs.get("samples", 0),
        "ensemble_of": attrs.get("ensemble_of"),
        "source": attrs.get("source"),
        "complete": bool(shards) and all(s["complete"] == s["total"] for s in shards.values()),
        "shards": shards,
        "bytes_on_disk": on_disk,
        "raw_bytes": raw,
        "bytes_per_position": on_disk / positions if on_disk and positions else None,
        "compression_ratio": raw / on_disk if on_disk else None,
        "arrays": arrays,
    }


def summarize(root: zarr.Group, store: str) -> dict:
    sizes = StoreFiles(store).files()  # file sizes only (a listing): no data is read
    attrs = root.attrs
    return {
        "store": store,
        "format_version": attrs.get("format_version"),
        "kdcache_version": attrs.get("kdcache_version"),
        "seq_len": attrs.get("seq_len"),
        "vocab_size": attrs.get("vocab_size"),
        "tokenizer_sha256": attrs.get("tokenizer_sha256"),
        "splits": {
            s: {"num_sequences": int(root[f"{TOKENS}/{s}"].shape[0]), "words": words_in_sequences(root, s),
                **array_info(root[f"{TOKENS}/{s}"], sizes)}
            for s in splits(root)
        },
        "teachers": {t: teacher_summary(root, t, sizes) for t in teacher_names(root)},
    }


def check_split(root: zarr.Group, split: str) -> None:
    if split not in splits(root):
        raise StoreError(f"{root.store}: no split {split!r} (have {', '.join(splits(root)) or 'none'})")


def check_teachers(root: zarr.Group, wanted: tuple[str, ...]) -> list[str]:
    """The requested teachers in order, or every teacher when none is named."""
    have = teacher_names(root)
    if not have:
        raise StoreError(f"{root.store}: no teacher targets in this store yet")
    for name in wanted:
        if name not in have:
            raise StoreError(f"{root.store}: unknown teacher {name!r} (have {', '.join(have)})")
    return list(wanted) or have


# ---------------------------------------------------------------------------------------------------------------
# Tokens as text


def load_tokenizer(store: str, explicit: str | None, want_sha: str | None) -> tuple[Any, str | None]:
    """The store's tokenizer and a warning for the user, if any. The tokenizer is `explicit` (it must match the
    store's sha256) or the run's sibling `tokenizer/` dir (skipped with the warning when it does not match);
    None when there is none, so ids are shown instead."""
    from tokenizers import Tokenizer

    if explicit:
        path = Path(explicit) / "tokenizer.json" if Path(explicit).is_dir() else Path(explicit)
        if not path.is_file():
            raise StoreError(f"{explicit}: no tokenizer.json here")
    else:
        store_dir = local_path(store)
        path = store_dir.resolve().parent / "tokenizer" / "tokenizer.json" if store_dir else None
        if path is None or not path.is_file():
            return None, None
    if want_sha and sha256_file(path) != want_sha:
        message = f"{path}: not the store's tokenizer (sha256 differs from the store's tokenizer_sha256)"
        if explicit:
            raise StoreError(message)
        return None, f"{message}; showing token ids"
    return Tokenizer.from_file(str(path)), None


def decode(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> str:
    if tokenizer is None:
        return " ".join(f"#{int(i)}" for i in ids)
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token as text; a token holding part of a UTF-8 character shows as its vocabulary entry instead."""
    if tokenizer is not None and tokenizer.id_to_token(int(token_id)) is None:  # padding past the tokenizer's ids
        return f"<unused #{int(token_id)}>"
    text = decode(tokenizer, [token_id])
    return tokenizer.id_to_token(int(token_id)) if "\ufffd" in text and tokenizer is not None else text


# ---------------------------------------------------------------------------------------------------------------
# One position


def soft_target_entry(targets: st.Targets, temperature: float, top: int, tokenizer: Any) -> dict:
    """One teacher's soft targets at one position: its `top` most probable tokens at `temperature`, the mass
    of its whole top-k and the tail mass (None when `temperature` is not cached)."""
    p, tail = st.soft_targets(targets, temperature)
    ids = targets.ids[:top]
    return {
        "k": targets.ids.shape[-1],
        "temperatures": targets.temperatures,
        "exact": tail is not None,
        "ids": ids.tolist(),
        "tokens": [token_text(tokenizer, i) for i in ids],
        "probs": p[:top].tolist(),
        "topk_mass": float(p.sum()),
        "tail_mass": None if tail is None else float(tail),
    }


def position_document(root: zarr.Group, store: str, split: str, seq: int, pos: int, teachers: list[str],
                      temperature: float, top: int, tokenizer: Any) -> dict:
    """What `show` prints: the context up to position `pos` of sequence `seq`, the true next token and each
    teacher's soft targets there (`soft_target_entry`)."""
    tokens = root[f"{TOKENS}/{split}"]
    n, length = tokens.shape
    row = tokens[seq]
    cross = [t for t in teachers if is_cross(root[f"{TEACHERS}/{t}"].attrs.asdict())]
    same = [t for t in teachers if t not in cross]
    # position L-1 predicts the first token of the next sequence: sequences are consecutive cuts of one stream
    next_id = int(row[pos + 1]) if pos + 1 < length else (int(tokens[seq + 1, 0]) if seq + 1 < n else None)
    return {
        "store": store, "split": split, "seq": seq, "pos": pos, "temperature": temperature,
        "context": decode(tokenizer, row[: pos + 1]),
        "context_ids": row[: pos + 1].tolist(),
        "next_token": None if next_id is None else token_text(tokenizer, next_id),
        "next_token_id": next_id,
        "teachers": {name: cross_position_entry(root, name, split, seq, pos, temperature, top, tokenizer)
                     if name in cross else soft_target_entry(targets.position(pos), temperature, top, tokenizer)
                     for name, targets in [*st.read_targets(root, same, split, seq).items(), *((c, None) for c in cross)]},
    }


# ---------------------------------------------------------------------------------------------------------------
# Human output

NUMERIC = re.compile(r"^(-|-?\d[\d.]*( [KMGT]?i?B)?)$")
POSITION_BUCKETS = 8  # rows of the by-position table in `stats`


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Aligned columns: a column whose cells all look like numbers (or sizes, or "-") is right-aligned."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [bool(rows) and all(NUMERIC.match(r[i]) for r in cells[1:]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip() for row in cells
    )


def words_in_sequences(root: zarr.Group, split: str) -> int | None:
    """The BabyLM words the split's sequences hold, from the metadata of `words/<split>` (None: not recorded)."""
    if f"{WORDS}/{split}" not in root:
        return None
    attrs = root[f"{WORDS}/{split}"].attrs
    return int(attrs["words"]) - int(attrs.get("dropped_words", 0))


def inspect_text(s: dict) -> str:
    head = table(["store", s["store"]], [
        ["format", f"{s['format_version']} (kdcache {s['kdcache_version']})"],
        ["seq_len", s["seq_len"]], ["vocab_size", s["vocab_size"]], ["tokenizer", f"sha256 {s['tokenizer_sha256']}"],
    ])
    split_rows = [[n, x["num_sequences"], x["num_sequences"] * s["seq_len"],
                   "-" if x["words"] is None else x["words"], human_bytes(x["bytes_on_disk"])]
                  for n, x in s["splits"].items()]
    teacher_rows, array_rows = [], []
    for name, t in s["teachers"].items():
        hidden = f"{','.join(map(str, t['hidden_layers']))} {t['hidden_dtype']}" if t["hidden_layers"] else "-"
        done = ", ".join(f"{sp} {x['complete']}/{x['total']}" for sp, x in t["shards"].items())
        temperatures = ",".join(f"{x:g}" for x in t["temperatures"])
        teacher_rows.append([name, t["k"], ",".join(t["modes"]), temperatures, hidden, done, human_bytes(t["bytes_on_disk"]),
                             num(t["bytes_per_position"], 1), num(t["compression_ratio"], 2)])
        for array, a in t["arrays"].items():
            array_rows.append([f"{name}/{array}", "x".join(map(str, a["shape"])), a["dtype"], human_bytes(a["raw_bytes"]),
                               human_bytes(a["bytes_on_disk"]), num(a["compression_ratio"], 2), a["codecs"]])
    parts = [head, table(["split", "sequences", "positions", "words", "tokens on disk"], split_rows)]
    if teacher_rows:
        header = ["teacher", "k", "modes", "T", "hidden", "shards complete", "on disk", "B/position", "ratio"]
        parts += [table(header, teacher_rows), table(["array", "shape", "dtype", "raw", "on disk", "ratio", "codecs"], array_rows)]
    return "\n\n".join(parts)


def show_text(d: dict) -> str:
    head = [f"{d['split']} sequence {d['seq']} position {d['pos']}, T = {d['temperature']:g}",
            f"context:    {d['context']!r}", f"next token: {d['next_token']!r}"]
    cross = {name: t for name, t in d["teachers"].items() if t.get("cross_tokenizer")}
    lines = [line for name, t in cross.items() for line in cross_text(name, t)]
    same = {name: t for name, t in d["teachers"].items() if name not in cross}
    if not same:
        return "\n".join(head + [""] + lines)
    return _same_tokenizer_text({**d, "teachers": same}, head) + ("\n\n" + "\n".join(lines) if lines else "")


def _same_tokenizer_text(d: dict, head: list[str]) -> str:
    names = list(d["teachers"])
    for name, t in d["teachers"].items():
        if not t["exact"]:
            head.append(f"{name}: T = {d['temperature']:g} is not cached (have {t['temperatures']}): "
                        f"probabilities renormalised over its top-{t['k']}, tail mass unknown")
    teachers = list(d["teachers"].values())

    def ranked(t: dict, rank: int) -> tuple[str, str]:
        return (repr(t["tokens"][rank]), f"{t['probs'][rank]:.4f}") if rank < len(t["tokens"]) else ("", "")

    listed = max(len(t["tokens"]) for t in teachers)
    rows = [[rank + 1] + [c for t in teachers for c in ranked(t, rank)] for rank in range(listed)]
    rows.append(["rest of top-k"] + [c for t in teachers for c in ("", num(max(t["topk_mass"] - sum(t["probs"]), 0.0), 4))])
    rows.append(["tail"] + [c for t in teachers for c in ("", num(t["tail_mass"], 4))])
    header = ["#"] + [x for n in names for x in (n, "p")]
    return "\n".join(head) + "\n\n" + table(header, rows)


def bucket_mean(values: list[float | None], positions: np.ndarray) -> float | None:
    known = [values[i] for i in positions if values[i] is not None]
    return sum(known) / len(known) if known else None


def stats_text(s: dict) -> str:
    parts = [f"split {s['split']}: {s['num_sequences']} sampled sequences ({s['positions']} positions, seed {s['seed']})"]
    if s.get("cross_tokenizer"):
        rows = [[name, num(c["alignment_rate"]), num(c["teacher_tokens_per_position"]), num(c["bytes_per_position"]),
                 num(c["topk_mass"]["mean"]), num(c["run_token_mass"]["mean"]), num(c["bits_per_byte"]),
                 c["roundtrip_failed"]]
                for name, c in s["cross_tokenizer"].items()]
        parts.append("cross-tokenizer teachers (masses at aligned positions, T = 1):\n" + table(
            ["teacher", "aligned", "its tokens/position", "bytes/position", "top-k mass", "on run tokens",
             "bits/byte", "not round-tripped"], rows))
    if not s["teachers"]:
        return "\n\n".join(parts)
    return "\n\n".join(parts + [_same_tokenizer_stats_text(s)])


def _same_tokenizer_stats_text(s: dict) -> str:
    curves = [(n, t, per_t[t]) for n, per_t in s["teachers"].items() for t in per_t]  # (teacher, temperature, stats)
    overall = [[n, t] + [num(m["topk_mass"][q]) for q in ("mean", "p5", "p50", "p95")]
               + [num(m["entropy"][q]) for q in ("mean", "p50")] for n, t, m in curves]
    parts = [table(["teacher", "T", "top-k mass", "p5", "p50", "p95", "entropy", "p50"], overall)]
    if s["agreement"]:
        rows = [[" vs ".join(a["teachers"]), num(a["top1_match"]), num(a["topk_overlap"])]
                + ["  ".join(f"T={t}: {num(j['mean'], 4)}" for t, j in a["jsd"].items())] for a in s["agreement"]]
        parts.append(table(["teachers", "top-1 match", "top-k overlap", "JSD on shared top-k (nats)"], rows))
    seq_len = len(curves[0][2]["entropy_by_position"])
    buckets = [b for b in np.array_split(np.arange(seq_len), POSITION_BUCKETS) if b.size]
    columns = [(f"H {n}@{t}", m["entropy_by_position"]) for n, t, m in curves]
    columns += [(f"top1 {'/'.join(a['teachers'])}", a["top1_match_by_position"]) for a in s["agreement"]]
    rows = [[f"{b[0]}-{b[-1]}"] + [num(bucket_mean(v, b)) for _, v in columns] for b in buckets]
    parts.append("by position (mean over sampled sequences):\n" + table(["positions"] + [c for c, _ in columns], rows))
    return "\n\n".join(parts)
