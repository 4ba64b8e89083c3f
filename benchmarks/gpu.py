"""Items 1-4 at the seed shapes on one CUDA GPU (run through gpu.sh): Llama-16M and GPT2-97M teachers, the
Llama-58M student, vocab 16000, batch 128 x 128, bf16 autocast.

Prints one table (every target with its value and verdict) and writes benchmarks-gpu.md (all tables, to paste
into the `gpu` block of docs/benchmarks.md) and benchmarks-gpu.json to --out (default $OUT, else /tmp).
Sized to finish within a few minutes including imports: 2048 synthetic sequences to precompute, 10 timed
student steps per variant. `--quick` (tiny shapes; on a CPU with `--device cpu`) proves the script end to end.

    python benchmarks/gpu.py [--quick] [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import bench_precompute
import bench_reader
import bench_step
import bench_store
from benchlib import PROFILES, Section, machine, report, run_section, write_json


def guarded(title: str, fn: Callable[..., Any], *args: Any) -> Any:
    """run_section, except that a failure becomes a section saying so: one failed item must not cost the others
    their (scarce) device time."""
    try:
        return run_section(fn, *args)
    except Exception as e:  # noqa: BLE001 - any failure of one benchmark is reported, not raised
        traceback.print_exc()
        return Section(title, error=f"{e.__class__.__name__}: {e} (traceback on stderr)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: proves the script, measures nothing")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --quick --device cpu to try the script)")
    profile = dataclasses.replace(PROFILES["quick" if args.quick else "seed"], device=args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        work = Path(tmp)
        result = guarded("1. Precompute throughput vs forward-only", bench_precompute.run, profile, work)
        if isinstance(result, tuple):
            precompute, cfg, store = result
            teachers = [t.name for t in cfg.teachers]
            storage = guarded("2. Store size per position", bench_store.measure, store,
                              {t: f"{t} (random init)" for t in teachers}, teachers)
            storage.notes.append("Random-init teachers: their near-uniform logits compress unlike a trained "
                                 "teacher's (docs/benchmarks.md, item 2 of the CPU run, has trained ones).")
            reader = guarded("3. Reader throughput per worker", bench_reader.run, store, teachers, work,
                             f"the precompute store above: random-init {' and '.join(teachers)}, top-{profile.k}")
            sections = [precompute, storage, reader]
        else:  # items 2 and 3 read the store item 1 writes
            sections = [result]
        sections.append(guarded("4. Student step: plain vs offline KD vs online KD", bench_step.run, profile))
    info = {**machine(profile.device), "profile": profile.name, "run time": f"{time.perf_counter() - start:.0f} s"}
    header, summary, body = report(info, sections)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-gpu.md").write_text(f"{header}\n\n{summary}\n\n{body.replace('## ', '### ')}\n")
    write_json(args.out / "benchmarks-gpu.json", {"machine": info, "profile": dataclasses.asdict(profile),
                                                  "sections": [s.as_json() for s in sections]})
    print(f"\n{header}\n\n{summary}\n\nwrote {args.out / 'benchmarks-gpu.md'} and {args.out / 'benchmarks-gpu.json'}")
    if any(section.error for section in sections):
        sys.exit(1)


if __name__ == "__main__":
    main()
