"""Shared pieces of the benchmarks: shape profiles, timing, synthetic stores and teachers, and results as
markdown and JSON.

Every benchmark (`bench_*.py`) returns a `Section`: tables of figures plus the `Target`s it checks. The
figures that carry a claim are ratios measured within one run (precompute / forward-only, offline / plain
step), so they hold across machines better than the absolute numbers do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.cache.schema import CodecSettings
from kdcache.config import CacheConfig, Config, DataConfig, ModelConfig, TeacherConfig, TokenizerConfig
from kdcache.cache.schema import TOKENS, create_store, open_store, vocab_order_attr, write_tokens
from kdcache.student.model import build_model

REPO = Path(__file__).resolve().parents[1]
SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2}
SPLIT = "train"


# ---------------------------------------------------------------------------------------------------------------
# Shapes.


@dataclass(frozen=True)
class Profile:
    """The shapes and sizes of one benchmark run."""

    name: str
    device: str
    vocab: int
    seq_len: int
    teachers: dict[str, ModelConfig]  # the two teachers: precompute, online KD
    hidden_teacher_layer: int  # a hidden layer of the first teacher, for the hidden-alignment variants
    student: ModelConfig
    batch: int  # student sequences per step
    precompute_sequences: int
    precompute_batch: int
    per_shard: int
    warmup: int  # untimed student steps
    steps: int  # timed student steps
    repeats: int  # precompute / forward-only alternations
    k: int = 64
    samples: int = 64


SEED_TEACHERS = {
    "llama-16m": ModelConfig(arch="llama", hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=8,
                             max_position=256),
    "gpt2-97m": ModelConfig(arch="gpt2", hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                            max_position=256, tie_embeddings=True),
}
SEED_STUDENT = ModelConfig(arch="llama", hidden_size=512, intermediate_size=1024, num_layers=16, num_heads=8,
                           max_position=256)


def halved(shape: ModelConfig) -> ModelConfig:
    """Half the width, depth and heads: the seed shapes' proportions at a size 2 CPU cores can time."""
    return dataclasses.replace(shape, hidden_size=shape.hidden_size // 2,
                               intermediate_size=shape.intermediate_size // 2, num_layers=shape.num_layers // 2,
                               num_heads=shape.num_heads // 2)


PROFILES = {
    # gpu.sh: the seed project's shapes on one CUDA GPU.
    "seed": Profile("seed", "cuda", 16000, 128, SEED_TEACHERS, 4, SEED_STUDENT, batch=128,
                    precompute_sequences=2048, precompute_batch=128, per_shard=256, warmup=3, steps=10, repeats=2),
    # make bench on a CPU: the seed shapes halved, the seed vocabulary and sequence length, a small batch.
    "cpu": Profile("cpu", "cpu", 16000, 128, {f"{n}-half": halved(s) for n, s in SEED_TEACHERS.items()}, 2,
                   halved(SEED_STUDENT), batch=4, precompute_sequences=32, precompute_batch=16, per_shard=8,
                   warmup=2, steps=12, repeats=2),
    # gpu.py --quick: proves the GPU script end to end in seconds; its figures mean nothing.
    "quick": Profile("quick", "cpu", 2000, 32,
                     {"llama-q": ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                             max_position=32),
                      "gpt2-q": ModelConfig(arch="gpt2", hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=2, max_position=32)},
                     1, ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position=32),
                     batch=4, precompute_sequences=64, precompute_batch=16, per_shard=16, warmup=1, steps=4,
                     repeats=1),
}


# ---------------------------------------------------------------------------------------------------------------
# Results.


@dataclass
class Target:
    """A claim: `value` must be >= (or <=) `threshold`. `value` None: not measured here (why in `note`)."""

    name: str
    value: float | None
    threshold: float
    at_least: bool
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def verdict(self) -> str:
        if self.met is None:
            return f"not measured ({self.note})" if self.note else "not measured"
        margin = abs(self.value - self.threshold) / self.threshold
        if self.met:
            return f"met, by {margin:.1%}"
        return f"NOT met, {margin:.1%} {'short' if self.at_least else 'over the limit'}"

    def row(self) -> list[str]:
        value = "-" if self.value is None else f"{fmt(self.value)}{self.unit}"
        return [self.name, value, f"{'>=' if self.at_least else '<='} {fmt(self.threshold)}{self.unit}", self.verdict()]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def markdown(self) -> str:
        lines = [f"*{self.caption}*", ""] if self.caption else []
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "---|" * len(self.headers))
        lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""  # the benchmark failed: what happened

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""] + ([f"**FAILED**: {self.error}", ""] if self.error else [])
        for table in self.tables:
            parts += [table.markdown(), ""]
        if self.targets:
            parts += [Table(["target", "value", "want", "verdict"], [t.row() for t in self.targets]).markdown(), ""]
        parts += [f"- {note}" for note in self.notes]
        parts.append(f"\n(this section ran in {self.seconds:.0f} s)")
        return "\n".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": self.seconds,
            "tables": [{"caption": t.caption, "headers": t.headers, "rows": [[jsonable(c) for c in r] for r in t.rows]}
                       for t in self.tables],
            "targets": [{**dataclasses.asdict(t), "met": t.met} for t in self.targets],
            "notes": self.notes,
            "error": self.error,
        }


def run_section(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a benchmark, which returns a Section or (Section, what later benchmarks reuse...); time it."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    section = result[0] if isinstance(result, tuple) else result
    section.seconds = time.perf_counter() - start
    print(f"[bench] {section.title}: {section.seconds:.0f} s", flush=True)
    return result


def report(info: dict[str, str], sections: list[Section]) -> tuple[str, str, str]:
    """(machine lines, summary table of every target, the sections) as markdown."""
    header = "\n".join(f"- **{key}**: {value}" for key, value in info.items())
    rows = [[section.title.split(".")[0], *target.row()] for section in sections for target in section.targets]
    rows += [[section.title.split(".")[0], "the benchmark itself", "-", "-", f"FAILED: {section.error}"]
             for section in sections if section.error]
    summary = Table(["item", "target", "value", "want", "verdict"], rows).markdown()
    return header, summary, "\n\n".join(section.markdown() for section in sections)


def jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def fmt(value: Any) -> str:
    """Numbers to 3 significant figures (with k/M for large ones), everything else as text."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != v:
            return "n/a"
        if abs(v) >= 1e6:
            return f"{v / 1e6:.3g}M"
        if abs(v) >= 1e4:
            return f"{v / 1e3:.3g}k"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"
    return "-" if value is None else str(value)


def machine(device: str) -> dict[str, str]:
    """What ran the benchmark: hardware, software versions, the commit."""
    import numcodecs
    import transformers
    import zarr

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), None)
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"
                + (f", {int(mem) / 2**20:.0f} GiB RAM" if mem else ""),
        "device": torch.cuda.get_device_name() if device == "cuda"
                  else f"CPU ({torch.get_num_threads()} torch threads)",
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, "
                    f"numpy {np.__version__}",
        "commit": _git_commit(),
    }
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): what a wall-clock timing needs around it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int, device: str) -> dict[str, list[float]]:
    """Seconds of each of `reps` calls of every fn after `warmup` untimed ones, the fns called in turn (in
    alternating order from round to round) so that a machine whose speed drifts slows all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name, fn in list(fns.items())[::1 if rep % 2 == 0 else -1]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_calls(fn: Callable[[], Any], warmup: int, reps: int, device: str) -> list[float]:
    """Seconds of each of `reps` calls of fn after `warmup` untimed ones (the device synchronised around each)."""
    return time_interleaved({"fn": fn}, warmup, reps, device)["fn"]


# ---------------------------------------------------------------------------------------------------------------
# Stores and teachers.


def save_random_teacher(shape: ModelConfig, vocab: int, path: Path, seed: int) -> Path:
    """A randomly initialised teacher as a Hugging Face directory (no tokenizer: precompute then skips that check)."""
    torch.manual_seed(seed)
    build_model(shape, vocab, SPECIAL_IDS).save_pretrained(path)
    return path


def synthetic_store(path: Path, vocab: int, seq_len: int, n: int, per_shard: int, seed: int = 0) -> str:
    """A store holding `n` uniformly random token sequences as tokens/train."""
    root = create_store(str(path), {"seq_len": seq_len, "vocab_size": vocab, "tokenizer_sha256": "synthetic",
                                    "special_ids": SPECIAL_IDS})
    tokens = np.random.default_rng(seed).integers(3, vocab, (n, seq_len))
    write_tokens(root, SPLIT, tokens, per_shard, CodecSettings(), vocab)
    return str(path)


def subset_store(source: str, path: Path, n: int, per_shard: int) -> str:
    """A store with the first `n` train sequences of `source` and its identity (tokenizer, vocabulary); `source`
    may be of an older store format (its tokens are read alone). Teacher ids will be ranked in the order of the
    whole source split, as in the run's own store: a few hundred sequences leave most of a vocabulary uncounted."""
    src = open_store(source, any_version=True)
    attrs = {key: src.attrs[key] for key in ("seq_len", "vocab_size", "tokenizer_sha256", "special_ids")}
    root = create_store(str(path), attrs)
    tokens = src[f"{TOKENS}/{SPLIT}"]
    write_tokens(root, SPLIT, tokens[:n], per_shard, CodecSettings(), attrs["vocab_size"])
    if tokens.dtype == np.uint16:
        root[f"{TOKENS}/{SPLIT}"].attrs["vocab_order"] = (tokens.attrs.get("vocab_order")
                                                         or vocab_order_attr(tokens[...], attrs["vocab_size"]))
    return str(path)


def bench_config(vocab: int, seq_len: int, per_shard: int, teachers: dict[str, Path], **cache: Any) -> Config:
    """A run config whose teachers are the given model directories; `cache` overrides CacheConfig fields."""
    return Config(
        name="bench",
        tokenizer=TokenizerConfig(vocab_size=vocab),
        data=DataConfig(seq_len=seq_len, sequences_per_shard=per_shard),
        teachers=[TeacherConfig(name, pretrained=str(path)) for name, path in teachers.items()],
        cache=CacheConfig(splits=[SPLIT], **cache),
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=jsonable) + "\n")
