"""Soft-target statistics: top-k mass, entropy and teacher agreement over a seeded sample of a store.

Plain numpy over the cached arrays (no torch, so `kdcache` stays instant). For a cached temperature T,
p_i(T) = exp(topk_logit_i / T - lse_T) is the exact teacher probability of topk_id_i, and the tail bucket
1 - sum_i p_i completes the (k+1)-class distribution the default loss distils; at any other temperature
only the top-k renormalised among themselves is known.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
import zarr

from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import TEACHERS, StoreError, completed_shards
from kdcache.cache.xtok import is_cross
from kdcache.files import staged

MASS_BINS = 20
TARGET_ARRAYS = ("topk_ids", "topk_logits", "lse")


@dataclass
class Targets:
    """One teacher's cached top-k targets for some positions: arrays share their leading shape."""

    ids: np.ndarray  # [..., k]
    logits: np.ndarray  # [..., k] float32 (cached as float16), sorted descending
    lse: np.ndarray  # [..., n_T] float32
    temperatures: list[float]
    vocab_size: int

    def position(self, pos: int) -> Targets:
        """The targets at one position of a single sequence's [L, ...] arrays."""
        return replace(self, ids=self.ids[pos], logits=self.logits[pos], lse=self.lse[pos])


def temperature_index(temperatures: list[float], temperature: float) -> int | None:
    for i, t in enumerate(temperatures):
        if np.isclose(t, temperature):
            return i
    return None


def soft_targets(t: Targets, temperature: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of the top-k ids at `temperature`, and the tail mass (None when T is not cached)."""
    logits = t.logits / temperature
    index = temperature_index(t.temperatures, temperature)
    if index is None:  # no log-sum-exp at this T: renormalise over the top-k
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True), None
    p = np.exp(logits - t.lse[..., index : index + 1])
    mass = p.sum(-1, keepdims=True)
    # float16 logits against a float32 lse can overshoot 1 when the tail is tiny (the KD losses clamp it too)
    p = p / np.maximum(mass, 1.0)
    tail = np.clip(1.0 - mass[..., 0], 0.0, None)
    if t.logits.shape[-1] >= t.vocab_size:
        tail = np.zeros_like(tail)  # no token lies outside the top-k: any residue is rounding
    return p, tail


def entropy(p: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Entropy in nats of the (k+1)-class distribution: the top-k ids plus one tail bucket."""
    terms = np.concatenate([p, tail[..., None]], axis=-1)
    safe = np.where(terms > 0, terms, 1.0)
    return -(terms * np.log(safe)).sum(-1)


def read_targets(root: zarr.Group, teachers: list[str], split: str, seqs: np.ndarray | int) -> dict[str, Targets]:
    """Each teacher's targets of the given sequences (an index array, or one sequence index), read through the
    direct reader, so a damaged, missing or replaced shard is named (checksums, the store's manifest) rather than
    raised by zarr without its file or, for a missing shard, read as fill values."""
    rows = [int(i) for i in np.atleast_1d(seqs)]
    reader = StoreReader(store_url(root), teachers=teachers, arrays={t: TARGET_ARRAYS for t in teachers}, split=split,
                         require_complete=False)  # one reader, one manifest check, one read for every teacher
    batch = reader.batch(rows)
    arrays = {t: {name: batch[f"{t}/{name}"] for name in TARGET_ARRAYS} for t in teachers}
    if np.ndim(seqs) == 0:
        arrays = {t: {name: a[0] for name, a in by_name.items()} for t, by_name in arrays.items()}
    return {t: Targets(a["topk_ids"], a["topk_logits"].astype(np.float32), a["lse"],
                       [float(x) for x in root[f"{TEACHERS}/{t}"].attrs["temperatures"]], int(root.attrs["vocab_size"]))
            for t, a in arrays.items()}


def store_url(root: zarr.Group) -> str:
    """Where an open store lives, as a path or URL the direct reader takes."""
    fs = getattr(root.store, "fs", None)  # zarr's FsspecStore; a LocalStore prints as its file:// URL
    return fs.unstrip_protocol(root.store.path) if fs is not None else str(root.store)


def split_group(root: zarr.Group, teacher: str, split: str) -> zarr.Group:
    path = f"{TEACHERS}/{teacher}/{split}"
    if path not in root:
        raise StoreError(f"{root.store}: teacher {teacher!r} has no split {split!r}")
    return root[path]


def complete_sequences(root: zarr.Group, teacher: str, split: str) -> np.ndarray:
    """[N] bool: the sequence lies in a shard the writer marked complete."""
    group = split_group(root, teacher, split)
    per_shard, n = int(group.attrs["per_shard"]), int(group.attrs["num_sequences"])
    return np.repeat(completed_shards(group), per_shard)[:n]


def sample_sequences(root: zarr.Group, teachers: list[str], split: str, size: int, seed: int) -> np.ndarray:
    """A seeded random sample (sorted) of the sequences complete for every teacher."""
    ok = np.logical_and.reduce([complete_sequences(root, t, split) for t in teachers])
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        raise StoreError(f"{root.store}: no sequence of split {split!r} is complete for {', '.join(teachers)}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(size, candidates.size), replace=False))


def by_position(x: np.ndarray) -> list[float | None]:
    """Mean over sequences of an [n, L] array, ignoring NaN (None where a position has no value: JSON has no NaN)."""
    count = (~np.isnan(x)).sum(0)
    mean = np.nansum(x, 0) / np.maximum(count, 1)
    return [float(m) if c else None for m, c in zip(mean, count)]


def summary(x: np.ndarray) -> dict:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": None, "p5": None, "p50": None, "p95": None}
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def teacher_stats(t: Targets) -> dict:
    """Per cached temperature: top-k mass and entropy, overall and by position."""
    out = {}
    for temperature in t.temperatures:
        p, tail = soft_targets(t, temperature)
        mass, h = 1.0 - tail, entropy(p, tail)
        counts, edges = np.histogram(mass, bins=MASS_BINS, range=(0.0, 1.0))
        out[str(temperature)] = {
            "topk_mass": {**summary(mass), "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}},
            "topk_mass_by_position": by_position(mass),
            "entropy": summary(h),
            "entropy_by_position": by_position(h),
        }
    return out


def kl_terms(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """p * log(p / m) with 0 log 0 = 0 (m > 0 wherever p > 0)."""
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(m > 0, m, 1.0)), 0.0)


def match_ids(a_ids: np.ndarray, b_ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of a's ids: whether b's top-k at the same position holds it, and where (flat index into b)."""
    rows = np.arange(a_ids[..., 0].size, dtype=np.int64).reshape(*a_ids.shape[:-1], 1) * vocab_size
    a_key, b_key = (a_ids + rows).ravel(), (b_ids + rows).ravel()  # unique per (position, id): one sorted search
    order = np.argsort(b_key, kind="stable")
    at = np.minimum(np.searchsorted(b_key[order], a_key), b_key.size - 1)
    return (b_key[order][at] == a_key).reshape(a_ids.shape), order[at].reshape(a_ids.shape)


def shared_support_jsd(shared: np.ndarray, b_index: np.ndarray, a_p: np.ndarray, b_p: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (nats) between two teachers on the ids in both top-k sets, each renormalised
    there; NaN where no id is shared. `shared`, `b_index` come from match_ids."""
    pa = np.where(shared, a_p, 0.0)
    pb = np.where(shared, b_p.ravel()[b_index], 0.0)  # b's probability of a's i-th id
    na, nb = pa.sum(-1, keepdims=True), pb.sum(-1, keepdims=True)
    pa, pb = pa / np.where(na > 0, na, 1.0), pb / np.where(nb > 0, nb, 1.0)
    m = (pa + pb) / 2
    jsd = 0.5 * (kl_terms(pa, m) + kl_terms(pb, m)).sum(-1)
    return np.where((na[..., 0] > 0) & (nb[..., 0] > 0), jsd, np.nan)


def agreement(a: Targets, b: Targets) -> dict:
    """Top-1 match rate and top-k overlap (temperature-free), and shared-support JSD at each common temperature."""
    top1 = (a.ids[..., 0] == b.ids[..., 0]).astype(np.float64)
    shared, b_index = match_ids(a.ids.astype(np.int64), b.ids.astype(np.int64), a.vocab_size)
    out = {
        "top1_match": float(top1.mean()),
        "top1_match_by_position": by_position(top1),
        "topk_overlap": float(shared.sum(-1).mean() / min(a.ids.shape[-1], b.ids.shape[-1])),
        "jsd": {},
    }
    for temperature in (t for t in a.temperatures if temperature_index(b.temperatures, t) is not None):
        jsd = shared_support_jsd(shared, b_index, soft_targets(a, temperature)[0], soft_targets(b, temperature)[0])
        out["jsd"][str(temperature)] = {**summary(jsd), "by_position": by_position(jsd)}
    return out


def compute_stats(root: zarr.Group, split: str, teachers: list[str], sample: int, seed: int) -> dict:
    """Soft-target statistics of same-tokenizer teachers; cross-tokenizer ones (cache.xtok) get their own."""
    from kdcache.cache.xtok_inspect import cross_stats  # it builds on this module

    seqs = sample_sequences(root, teachers, split, sample, seed)
    cross = [t for t in teachers if is_cross(root[f"{TEACHERS}/{t}"].attrs.asdict())]
    teachers = [t for t in teachers if t not in cross]
    targets = read_targets(root, teachers, split, seqs)
    return {
        "cross_tokenizer": {t: cross_stats(root, t, split, seqs) for t in cross},
        "split": split,
        "seed": seed,
        "num_sequences": int(seqs.size),
        "positions": int(seqs.size * root.attrs["seq_len"]),
        "teachers": {t: teacher_stats(x) for t, x in targets.items()},
        "agreement": [{"teachers": [a, b], **agreement(targets[a], targets[b])} for a, b in combinations(teachers, 2)],
    }


def plot_stats(stats: dict, out: Path) -> None:
    """Top-k mass histogram, entropy by position, top-1 agreement and JSD by position; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((hist, ent), (top1, jsd)) = plt.subplots(2, 2, figsize=(12, 8))
    for teacher, per_t in stats["teachers"].items():
        for temperature, s in per_t.items():
            h = s["topk_mass"]["histogram"]
            hist.stairs(h["counts"], h["edges"], label=f"{teacher} T={temperature}")
            ent.plot(s["entropy_by_position"], label=f"{teacher} T={temperature}")
    hist.set(title="top-k mass", xlabel="mass of the cached top-k", ylabel="positions")
    ent.set(title="entropy of top-k + tail (nats)", xlabel="position in sequence")
    for pair in stats["agreement"]:
        name = " vs ".join(pair["teachers"])
        top1.plot(pair["top1_match_by_position"], label=name)
        for temperature, s in pair["jsd"].items():
            jsd.plot([np.nan if v is None else v for v in s["by_position"]], label=f"{name} T={temperature}")
    top1.set(title="teacher agreement: top-1 match rate", xlabel="position in sequence", ylim=(0, 1))
    jsd.set(title="teacher agreement: JSD on shared top-k (nats)", xlabel="position in sequence")
    for ax in (hist, ent, top1, jsd):
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "needs two teachers", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"split {stats['split']}: {stats['num_sequences']} sampled sequences (seed {stats['seed']})")
    fig.tight_layout()
    with staged(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
