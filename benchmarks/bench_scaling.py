"""Item 5: precompute time and store bytes per position at three corpus sizes spanning 100x.

One small random-init teacher at the seed vocabulary (16000) and sequence length (128), top-64 and two
temperatures, over synthetic token stores of 8, 80 and 800 sequences (the fastest of 3 interleaved rounds: noise
on a shared machine only ever adds time). Linear cost: each added position costs the same whatever the size
(the smallest size also pays the fixed cost of a run), and the bytes per position stay flat. `precompute s` is
precompute's own clock (`PrecomputeStats`); `wall` adds loading the teacher and checking the groups.

    python benchmarks/bench_scaling.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchlib import (
    PROFILES, SPLIT, Profile, Section, Table, bench_config, run_section, save_random_teacher, synthetic_store,
)
from bench_store import disk_nbytes
from kdcache.config import ModelConfig
from kdcache.cache.schema import TEACHERS, TOKENS
from kdcache.precompute.run import PrecomputeStats, precompute_targets

SIZES = (8, 80, 800)
ROUNDS = 3
TEACHER = ModelConfig(arch="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, max_position=128)
PER_SHARD = 64
BATCH = 4  # divides every size: per-position cost depends on the batch (memory traffic of the [B, L, V] logits)


def run(profile: Profile, workdir: Path) -> Section:
    teacher = save_random_teacher(TEACHER, profile.vocab, workdir / "scaling-teacher", seed=0)
    cfg = bench_config(profile.vocab, profile.seq_len, PER_SHARD, {"small": teacher}, k=profile.k,
                       temperatures=[1.0, 2.0], batch_size=BATCH)
    stores = {n: synthetic_store(workdir / f"scaling-{n}.zarr", profile.vocab, profile.seq_len, n, PER_SHARD, seed=n)
              for n in SIZES}
    runs: dict[int, list[tuple[float, float, PrecomputeStats]]] = {n: [] for n in SIZES}
    for _ in range(ROUNDS):  # sizes interleaved: a machine that speeds up or slows down affects all of them alike
        for n, store in stores.items():
            start = time.perf_counter()
            stats = precompute_targets(cfg, device=profile.device, store=store, overwrite=True)
            runs[n].append((stats.seconds, time.perf_counter() - start, stats))
    rows, previous = [], None
    for n, store in stores.items():
        seconds, wall, stats = min(runs[n], key=lambda run: run[0])
        marginal = "-" if previous is None else (seconds - previous[0]) / (stats.positions - previous[1]) * 1e6
        previous = (seconds, stats.positions)
        rows.append([n, stats.positions, seconds, wall, seconds / stats.positions * 1e6, marginal,
                     disk_nbytes(Path(store) / TEACHERS / "small" / SPLIT) / stats.positions,
                     disk_nbytes(Path(store) / TOKENS / SPLIT) / stats.positions])
    table = Table(["sequences", "positions", "precompute s", "wall s (with loading)", "us per position",
                   "us per added position (from the size above)", "teacher B/position", "tokens B/position"], rows,
                  f"{profile.device}, a {TEACHER.hidden_size}x{TEACHER.num_layers} Llama (random init), vocab "
                  f"{profile.vocab}, k={profile.k}, 2 temperatures, shards of {PER_SHARD} sequences, batch {BATCH}, "
                  f"fastest of {ROUNDS} interleaved rounds")
    section = Section("5. Scaling with corpus size", [table])
    first, last = rows[1][5], rows[2][5]
    section.notes.append(
        f"Linear cost: each added position costs {first:.0f} us from {SIZES[0]} to {SIZES[1]} sequences and "
        f"{last:.0f} us from {SIZES[1]} to {SIZES[2]} ({abs(last / first - 1):.0%} apart; the smallest size's "
        "cost per position also carries the fixed cost of a run: writer threads, group checks, completion marks). "
        "Bytes per position are set by the shard layout and do not grow with the corpus.")
    return section


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        print(run_section(run, PROFILES["cpu"], Path(tmp)).markdown())
