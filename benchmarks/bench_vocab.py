"""Item 6: what the vocabulary size costs: store bytes, precompute rate and memory, student step, reader rate.

At V = 4,096, 32,000, 50,257 and 150,000 (one run, the sizes interleaved where they are timed): a random-init
teacher (the 64x2 Llama of item 5) precomputes top-64 + lse at T = 1, 2 and 64 samples over a synthetic store;
bytes per position per array family; precompute positions/s and the process's peak resident memory over its
run; the student (item 4's CPU shape) steps with the offline tail KD loss and with the plain LM loss; the direct
reader's tokens/s over the top-64 arrays. One more precompute at V = 262,144 with the default cache batch (64
sequences of 128) checks its memory bound (precompute/targets.py: passes of at most 2**27 logits).

    python benchmarks/bench_vocab.py          # this section alone; prints its markdown
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import torch

from bench_reader import throughput
from bench_scaling import TEACHER
from bench_step import kd_plan, teacher_batch, training_step
from bench_store import disk_nbytes
from benchlib import (
    PROFILES, SPLIT, Profile, Section, Table, bench_config, run_section, save_random_teacher, synthetic_store,
    time_interleaved,
)
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import TEACHERS
from kdcache.precompute.run import precompute_targets
from kdcache.student.distill import make_kd_loss
from kdcache.student.lm import lm_loss

VOCABS = (4_096, 32_000, 50_257, 150_000)
BIG_VOCAB = 262_144  # Gemma's: the memory bound at the default cache batch
SEQUENCES, BATCH = 32, 16  # precompute: sequences of the profile's length, cache.batch_size
STEPS = 7  # timed student steps per variant (the profile's 12 take minutes at 150,000; 3 were too noisy here)
READER_ROUNDS = 3  # the reader's rate: the best of this many rounds over the sizes in turn (load only slows it)
TOPK = ("topk_logits", "topk_ids", "lse")
SAMPLED = ("sample_ids", "sample_counts")
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The process's peak resident memory while the block runs, sampled every 2 ms by a thread (torch's kernels
    release the GIL), and what it was before."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def precompute(vocab: int, profile: Profile, workdir: Path, sequences: int, batch: int, samples: int
               ) -> tuple[str, float, PeakRss]:
    """A store of `sequences` random sequences precomputed by a random teacher of `vocab`: (store, positions/s,
    peak memory)."""
    teacher = save_random_teacher(TEACHER, vocab, workdir / f"teacher-{vocab}", seed=0)
    store = synthetic_store(workdir / f"vocab-{vocab}.zarr", vocab, profile.seq_len, sequences, profile.per_shard)
    cfg = bench_config(vocab, profile.seq_len, profile.per_shard, {"t": teacher}, k=profile.k,
                       temperatures=[1.0, 2.0], samples=samples, batch_size=batch)
    gc.collect()
    with PeakRss() as memory:
        stats = precompute_targets(cfg, device=profile.device, store=store, overwrite=True)
    return store, stats.positions / stats.seconds, memory


def bytes_per_position(store: str, names: tuple[str, ...], positions: int) -> float:
    return sum(disk_nbytes(Path(store) / TEACHERS / "t" / SPLIT / name) for name in names) / positions


def student_steps(profile: Profile) -> dict[str, float]:
    """Median seconds of a plain LM step and of an offline tail KD step (one teacher) of the same student, interleaved,
    and the peak resident memory each adds over its first steps."""
    profile = dataclasses.replace(profile, teachers=dict(list(profile.teachers.items())[:1]), steps=STEPS)
    device = torch.device(profile.device)
    batch = teacher_batch(profile, device)
    plan = kd_plan(profile, "tail", hidden=False)
    wanted = {"input_ids", *(f"{t}/{a}" for t, arrays in plan.arrays().items() for a in arrays)}
    steps = {"plain": training_step(profile, device, {"input_ids": batch["input_ids"]}, lambda: (lm_loss, None)),
             "kd": training_step(profile, device, {k: v for k, v in batch.items() if k in wanted},
                                 lambda: (make_kd_loss(plan, None), None))}
    out = {}
    for name, step in steps.items():  # the first steps allocate the optimizer state: the peak of a step after them
        step()
        gc.collect()
        with PeakRss() as memory:
            step()
        out[f"{name} GiB"] = (memory.peak - memory.before) / 2**30
    times = time_interleaved(steps, profile.warmup - 1, profile.steps, profile.device)
    return {**out, **{name: median(t) for name, t in times.items()}}


def run(profile: Profile, workdir: Path) -> Section:
    load = os.getloadavg()[0]
    rows, positions, stores = [], SEQUENCES * profile.seq_len, {}
    for vocab in VOCABS:
        stores[vocab], rate, memory = precompute(vocab, profile, workdir, SEQUENCES, BATCH, profile.samples)
        step = student_steps(dataclasses.replace(profile, vocab=vocab))
        rows.append([vocab, bytes_per_position(stores[vocab], TOPK, positions),
                     bytes_per_position(stores[vocab], SAMPLED, positions), rate, memory.peak / 2**30,
                     (memory.peak - memory.before) / 2**30, step["plain"] * 1e3, step["kd"] * 1e3,
                     step["kd"] / step["plain"], step["plain GiB"], step["kd GiB"]])
        print(f"[bench] vocab {vocab}: {rows[-1]}", flush=True)
    readers = {v: StoreReader(store, teachers=["t"], arrays={"t": list(TOPK)}) for v, store in stores.items()}
    rates = {v: max(throughput(readers[v].batch, SEQUENCES, profile.seq_len, seed=r) for r in range(READER_ROUNDS))
             for v in VOCABS}
    for row in rows:
        row.append(rates[row[0]])
    _, big_rate, big = precompute(BIG_VOCAB, profile, workdir, 64, 64, profile.samples)
    student = profile.student
    table = Table(
        ["vocab", "top-64 + lse B/position", "64 samples B/position", "precompute positions/s", "precompute peak GiB",
         "(added GiB)", "plain step ms", "KD step ms", "KD / plain", "plain step +GiB", "KD step +GiB",
         "reader tokens/s"], rows,
        f"{profile.device}; teacher: random {TEACHER.hidden_size}x{TEACHER.num_layers} Llama, {SEQUENCES} random "
        f"sequences of {profile.seq_len}, cache batch {BATCH}, k={profile.k}, T = 1, 2, {profile.samples} samples; "
        f"student {student.arch} {student.hidden_size}x{student.num_layers}, batch {profile.batch} x "
        f"{profile.seq_len}, tail KD from one teacher, median of {STEPS} interleaved steps; reader: "
        f"batches of 32 over the top-64 arrays, best of {READER_ROUNDS} rounds")
    section = Section("6. Vocabulary size", [table])
    small, large = rows[0], rows[-1]
    section.notes += [
        f"One run, {torch.get_num_threads()} torch thread(s), load average {load:.1f} on {os.cpu_count()} cores at "
        "its start (other jobs shared the machine): "
        "compare within this table only. The sizes run one after the other, the plain and KD steps interleaved.",
        f"From V = {small[0]:,} to {large[0]:,} ({large[0] / small[0]:.0f}x): precompute positions/s fall "
        f"{small[3] / large[3]:.0f}x and its peak grows {large[4] / small[4]:.1f}x: the teacher's output layer, then "
        "top-k, logsumexp and sampling, each a pass over all V logits of every position (passes of at most 2**27 "
        "logits bound what is held). The plain step grows "
        f"{large[6] / small[6]:.1f}x and the KD step {large[7] / small[7]:.1f}x: the student's own output layer, "
        "its softmax and the AdamW update of its V-row embedding and head. KD / plain: "
        f"{', '.join(f'{row[8]:.2f}' for row in rows)}: the KD loss computes the cross-entropy and each teacher's KL "
        "in one chunked pass over the student's logits with their analytic gradient, about what autograd's "
        "cross-entropy costs alone, so the ratio does not grow with V (its spread here is the load's).",
        f"Bytes do not scale with V, only with its logarithm: top-64 + lse take {small[1]:.0f} to {large[1]:.0f} "
        f"B/position, 64 samples {small[2]:.0f} to {large[2]:.0f}; the float16 logits and float32 lse are the same "
        "at every V, the ids need log2(V) bit planes after bitshuffle (12 at 4,096, 18 at 150,000; uint32 past "
        "65,536 adds no plane that is not used). The reader decodes k values per position, not V: its rate does not "
        "depend on V beyond the load's spread.",
        f"V = {BIG_VOCAB:,} at the default cache batch (64 sequences of {profile.seq_len}, {profile.samples} "
        f"samples): precompute peaks at {big.peak / 2**30:.2f} GiB resident ({(big.peak - big.before) / 2**30:.2f} "
        f"GiB over the process before it), {big_rate:,.0f} positions/s.",
        "A random-init teacher spreads its top-k over the whole vocabulary: no frequency skew for "
        "kdcache.vocab_rank to exploit, so the ids' bytes here are an upper bound (a teacher trained on BabyLM "
        "text takes 72 B for its top-64 ids at 16,000, item 2). Bytes exclude the zarr.json documents, whose "
        "vocabulary order grows with V (4 x 4/3 bytes per id per topk_ids array: 0.8 MB at 150,000).",
    ]
    return section


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        print(run_section(run, PROFILES["cpu"], Path(tmp)).markdown())
