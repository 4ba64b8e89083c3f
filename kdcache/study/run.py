"""Train and evaluate every (variant, seed) of a study, skipping finished runs and resuming interrupted ones."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer

from kdcache.cache.schema import open_store, read_tokens, tokenizer_sha256
from kdcache.config import Config, TeacherConfig, run_paths
from kdcache.precompute.cross_tokenizer import token_bytes
from kdcache.precompute.teachers import own_tokenizer
from kdcache.files import atomic_write
from kdcache.runtime import barrier, init_distributed
from kdcache.study.figure import plot_study, read_metrics
from kdcache.study.report import study_table, summarize
from kdcache.student.distill import distill
from kdcache.student.evaluate import evaluate_model

RESULT = "result.json"  # written last: a run directory holding it is finished


@dataclass(frozen=True)
class StudyRun:
    variant: str
    seed: int
    directory: Path

    @property
    def result(self) -> Path:
        return self.directory / RESULT


def study_runs(cfg: Config, runs_root: str | Path = "runs") -> list[StudyRun]:
    """Every (variant, seed) of the config's study, seed-major: all variants of the first seed come first."""
    root = run_paths(cfg, runs_root).study
    return [StudyRun(name, seed, root / name / f"seed{seed}") for seed in cfg.study.seeds for name in cfg.study.variants]


def train_and_evaluate(cfg: Config, run: StudyRun, runs_root: str | Path) -> dict[str, Any]:
    """One student of the study, trained (or resumed) and evaluated; its result.json is written last."""
    variant = cfg.variant(run.variant, run.seed)
    kind = cfg.study.variants[run.variant].kind
    start = time.perf_counter()
    model_dir = distill(variant, runs_root, resume=True, baseline=kind == "baseline", online=kind == "online",
                        out_dir=run.directory)
    seconds = time.perf_counter() - start
    d = init_distributed()
    if d.main:  # under torchrun the ranks trained together; one of them evaluates and writes
        write_result(cfg, run, kind, model_dir, seconds, runs_root)
    barrier(d)
    return json.loads(run.result.read_text())


def write_result(cfg: Config, run: StudyRun, kind: str, model_dir: Path, seconds: float, runs_root: str | Path) -> None:
    """The trained student's dev loss, minimal pairs, throughput and learning curve, as the run's result.json."""
    paths = run_paths(cfg, runs_root)
    report = evaluate_model(model_dir, store=paths.store, pair_dirs=cfg.eval.minimal_pair_dirs,
                            batch_size=cfg.eval.batch_size,
                            pairs_per_paradigm=cfg.eval.pairs_per_paradigm)
    records = read_metrics(run.directory)
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    result = {
        "variant": run.variant, "seed": run.seed, "kind": kind,
        "dev_ce": report["dev"]["ce"], "dev_perplexity": report["dev"]["perplexity"],
        "pairs": {directory: r["mean"] for directory, r in report["minimal_pairs"].items()},
        "train_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "train_seconds": seconds,  # this invocation's (a resumed run counts only what was left)
        "curve": [(r["step"], r["dev_ce"]) for r in records if "dev_ce" in r],
        "parameters": report["parameters"], "words_seen": report["words_seen"],
    }
    atomic_write(run.result, json.dumps(result, indent=2) + "\n")


def teacher_results(cfg: Config, runs_root: str | Path = "runs") -> dict[str, dict[str, Any]]:
    """Each teacher's dev CE and minimal pairs, the level the students are compared with (evaluated once, kept in
    study/teachers/<name>.json)."""
    paths = run_paths(cfg, runs_root)
    results = {}
    for teacher in cfg.teachers:
        path = paths.study / "teachers" / f"{teacher.name}.json"
        if not path.is_file():
            source, store = paths.teacher_model(teacher), teacher_store(cfg, teacher, runs_root)
            report = evaluate_model(source, store=store, pair_dirs=cfg.eval.minimal_pair_dirs,
                                    batch_size=cfg.eval.batch_size, pairs_per_paradigm=cfg.eval.pairs_per_paradigm)
            pairs = [r["mean"] for r in report["minimal_pairs"].values()]
            dev_ce = report["dev"]["ce"] if store else None
            atomic_write(path, json.dumps({"dev_ce": dev_ce, "parameters": report["parameters"],
                                           "words_seen": report["words_seen"],
                                           "bits_per_byte": dev_bits_per_byte(dev_ce, store, source) if store else None,
                                           "pairs": sum(pairs) / len(pairs) if pairs else None}, indent=2) + "\n")
        results[teacher.name] = json.loads(path.read_text())
    return results


def teacher_store(cfg: Config, teacher: TeacherConfig, runs_root: str | Path) -> Path | None:
    """The token store a teacher's dev CE is measured on: the run's, or its own when it was trained on its own
    tokenizer; None for a pretrained teacher with another tokenizer (it has no store here)."""
    paths = run_paths(cfg, runs_root)
    if teacher.tokenizer is not None:
        return paths.teacher_run(teacher.name).store
    return None if own_tokenizer(paths.teacher_model(teacher), tokenizer_sha256(paths.tokenizer)) else paths.store


def dev_bits_per_byte(dev_ce: float, store: Path, model_dir: str) -> float:
    """Dev cross-entropy per byte in bits, comparable across tokenizers: nats per token / bytes per dev token / ln 2."""
    lengths = np.array([len(b) for b in token_bytes(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")))])
    return dev_ce / lengths[read_tokens(open_store(str(store)), "dev")].mean() / math.log(2)


def run_study(cfg: Config, runs_root: str | Path = "runs", echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every run's result, training the runs that have none yet."""
    runs = study_runs(cfg, runs_root)
    results = []
    for number, run in enumerate(runs, 1):
        if run.result.is_file():
            results.append(json.loads(run.result.read_text()))
            continue
        echo(f"study {number}/{len(runs)}: {run.variant}, seed {run.seed} -> {run.directory}")
        results.append(train_and_evaluate(cfg, run, runs_root))
    return results


def write_study(cfg: Config, results: list[dict[str, Any]], runs_root: str | Path, wall_seconds: float) -> Path:
    """study.json (every number), study.md (the table, how to read it, the figure) and study.png; returns study.md."""
    baseline = next((name for name, v in cfg.study.variants.items() if v.kind == "baseline"), None)
    summary = summarize(results, baseline)
    root = run_paths(cfg, runs_root).study
    trained_s = sum(r["train_seconds"] for r in results)
    teachers = teacher_results(cfg, runs_root)
    document = {"name": cfg.name, "config": cfg.source_path, "seeds": cfg.study.seeds, "baseline": baseline,
                "wall_seconds": wall_seconds, "train_seconds": trained_s, "teachers": teachers, "summary": summary,
                "runs": results,
                "variants": {name: vars(v) for name, v in cfg.study.variants.items()}}
    atomic_write(root / "study.json", json.dumps(document, indent=2) + "\n")
    plot_study(results, summary, root / "study.png", f"{cfg.name}: {len(cfg.study.seeds)} seeds per variant")
    overrides = "\n".join(f"- `{name}` ({v.kind}): distill {v.distill or '{}'}, student_train {v.student_train or '{}'}"
                          for name, v in cfg.study.variants.items())
    teacher_lines = "\n".join(
        f"- teacher `{name}`: {r['parameters'] / 1e6:.2f}M parameters"
        + ("" if r["dev_ce"] is None else f", dev CE {r['dev_ce']:.4f}")
        + ("" if r.get("bits_per_byte") is None else f" ({r['bits_per_byte']:.4f} bits per byte)")
        + ("" if r["pairs"] is None else f", minimal pairs {r['pairs']:.4f}")
        + ("" if r.get("words_seen") is None else f", {r['words_seen']:,} words seen in training")
        for name, r in teachers.items())
    markdown = f"""# Study `{cfg.name}`

Config `{cfg.source_path}`; seeds {cfg.study.seeds} (a seed sets the student's initial weights and data order; the
variants of one seed share both). Students trained in {trained_s / 60:.1f} min (this invocation: {wall_seconds / 60:.1f} min).

{teacher_lines}

{study_table(summary, baseline)}

Mean ± standard deviation over seeds. Δ: the paired difference to `{baseline}` (same seed), its mean and 95%
Student-t confidence interval over seeds; `*` marks an interval that excludes 0. Lower dev CE is better, higher
minimal-pair accuracy is better. Train tokens/s is the mean over each run's logged windows. Words seen: BabyLM's
count (whitespace words of the training text, every epoch again), for each year's word-budget accounting.

Variants:
{overrides}

![dev cross-entropy curves and final metrics](study.png)
"""
    atomic_write(root / "study.md", markdown)
    return root / "study.md"
