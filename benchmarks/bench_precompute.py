"""Item 1: end-to-end precompute throughput against the same teacher's bare forward (target >= 0.90).

`precompute_targets` (forward, top-k, logsumexps, device-to-host copies, shard encoding and writes, completion
marks) runs over a store of synthetic tokens; `forward_only_throughput` runs the same teacher over the same
tokens with the same batch and autocast and nothing else. Both alternate `repeats` times after a warm-up
precompute (which also pays for torch.compile of the fused logsumexp on CUDA); medians are compared.

    python benchmarks/bench_precompute.py [--profile cpu|seed|quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import median

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from benchlib import (
    PROFILES, SPLIT, Profile, Section, Table, Target, bench_config, run_section, save_random_teacher,
    synthetic_store, time_calls,
)
from kdcache.config import Config
from kdcache.cache.schema import open_store, read_tokens
from kdcache.precompute.run import precompute_targets
from kdcache.precompute.targets import forward, topk_targets
from kdcache.student.model import count_parameters

TARGET = 0.90


def precompute_store(profile: Profile, workdir: Path) -> tuple[Config, str]:
    """Random-init teachers of the profile and a synthetic store for them (no targets yet)."""
    teachers = {name: save_random_teacher(shape, profile.vocab, workdir / "teachers" / name, seed=i)
                for i, (name, shape) in enumerate(profile.teachers.items())}
    cfg = bench_config(profile.vocab, profile.seq_len, profile.per_shard, teachers, k=profile.k,
                       temperatures=[1.0, 2.0], batch_size=profile.precompute_batch)
    store = synthetic_store(workdir / "precompute.zarr", profile.vocab, profile.seq_len, profile.precompute_sequences,
                            profile.per_shard)
    return cfg, store


def measure(profile: Profile, cfg: Config, store: str, warm_store: str) -> Section:
    """Throughput rows per teacher; leaves every teacher's targets in `store`."""
    tokens = read_tokens(open_store(store), SPLIT)
    rows, targets = [], []
    for teacher in cfg.teachers:
        model = AutoModelForCausalLM.from_pretrained(teacher.pretrained, dtype=torch.float32).eval()
        precompute_targets(cfg, teachers=[teacher.name], device=profile.device, store=warm_store, overwrite=True)
        bare, full, waits = [], [], []
        for _ in range(profile.repeats):
            bare.append(forward_only_throughput(model, tokens, cfg.cache.batch_size, profile.device))
            stats = precompute_targets(cfg, teachers=[teacher.name], device=profile.device, store=store, overwrite=True)
            full.append(stats.tokens_per_s)
            waits.append(stats.writer_wait_s / stats.seconds)
        ratio = median(full) / median(bare)
        rows.append([teacher.name, f"{count_parameters(model) / 1e6:.1f}M", tokens.size, median(bare), median(full),
                     ratio, targets_throughput(model, tokens, cfg, profile.device), f"{median(waits):.0%}"])
        targets.append(Target(f"precompute / forward-only, {teacher.name}", ratio, TARGET, at_least=True))
        del model
    table = Table(["teacher", "params", "positions", "forward-only tok/s", "precompute tok/s", "ratio",
                   "top-k + logsumexps alone tok/s", "time waiting for the writer"], rows,
                  f"{profile.device}, k={cfg.cache.k}, 2 temperatures, batch {cfg.cache.batch_size} x "
                  f"{profile.seq_len}, "
                  f"shards of {profile.per_shard} sequences, medians of {profile.repeats} alternations")
    return Section("1. Precompute throughput vs forward-only", [table], targets)


@torch.inference_mode()
def forward_only_throughput(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, device: str) -> float:
    """Positions per second of the bare teacher forward over tokens [N, L] in batches, as precompute runs it
    (same autocast, no targets, no copies): the ceiling `PrecomputeStats.tokens_per_s` is measured against."""
    model.to(device)
    ids = torch.as_tensor(tokens.astype(np.int64))
    forward(model, ids[:batch_size].to(device))  # warm-up: allocator, kernels

    def every_batch() -> None:
        for lo in range(0, len(ids), batch_size):
            forward(model, ids[lo:lo + batch_size].to(device))

    return ids.numel() / time_calls(every_batch, 0, 1, device)[0]


@torch.inference_mode()
def targets_throughput(model: torch.nn.Module, tokens: np.ndarray, cfg: Config, device: str) -> float:
    """Positions per second of `topk_targets` alone on one batch of the teacher's logits: what precompute adds to
    the forward on the device before any copy or write."""
    ids = torch.as_tensor(tokens[:cfg.cache.batch_size].astype(np.int64), device=device)
    logits = forward(model.to(device), ids).logits
    seconds = median(time_calls(lambda: topk_targets(logits, cfg.cache.k, cfg.cache.temperatures), 1, 3, device))
    return ids.numel() / seconds


def run(profile: Profile, workdir: Path) -> tuple[Section, Config, str]:
    cfg, store = precompute_store(profile, workdir)
    warm = synthetic_store(workdir / "warm.zarr", profile.vocab, profile.seq_len, profile.per_shard, profile.per_shard,
                           seed=1)
    section = measure(profile, cfg, store, warm)
    if profile.device == "cpu":
        section.notes.append(
            "On a CPU the teacher, the float32 logsumexps and top-k, and the writer thread share the same cores, so "
            "every step of precompute beyond the forward is paid in full; on a GPU the forward runs on the device "
            "while the host encodes shards, which is the setting the 0.90 target is for (gpu.sh).")
    return section, cfg, store


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        print(run_section(run, PROFILES[args.profile], Path(tmp))[0].markdown())
