"""Learning curves by words seen: every chck_* directory of a training run scored like the final model (held-out CE,
minimal pairs; optionally on the first N pairs of each paradigm, BabyLM's "fast" evaluation of checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kdcache.student.evaluate import evaluate_model
from kdcache.student.export import word_checkpoints

Point = dict[str, Any]


def curve_point(label: str, report: dict[str, Any]) -> Point:
    """One point of a curve: what was scored, after how many words, and its scores (pairs: the mean over the
    minimal-pair directories, each a mean over paradigms)."""
    pairs = [r["mean"] for r in report["minimal_pairs"].values()]
    return {"checkpoint": label, "source": report["source"], "step": report.get("step"),
            "words_seen": report.get("words_seen"), "dev_ce": report["dev"]["ce"] if "dev" in report else None,
            "pairs": sum(pairs) / len(pairs) if pairs else None}


def model_curve(model_dir: str | Path, *, store: str | Path | None, pair_dirs: list[str], batch_size: int,
                pairs_per_paradigm: int, echo: Callable[[str], None] = print) -> list[Point]:
    """The curve of one trained model: each of its run's chck_* directories in order of words, then the final model,
    all scored with the same settings. Empty when the run saved no checkpoint by words."""
    run_dir = Path(model_dir).parent
    checkpoints = word_checkpoints(run_dir) if Path(model_dir).name == "model" else []  # a hub id has no run
    scored = [(directory.name, directory) for _, directory in checkpoints]
    points = []
    for label, directory in scored + [("final", Path(model_dir))] if scored else []:
        report = evaluate_model(directory, store=store, pair_dirs=pair_dirs, batch_size=batch_size,
                                pairs_per_paradigm=pairs_per_paradigm)
        points.append(curve_point(label, report))
        echo(f"  {run_dir.name} {label}: {points[-1]['words_seen']:,} words, dev CE "
             + (f"{points[-1]['dev_ce']:.4f}" if points[-1]["dev_ce"] is not None else "-")
             + (f", minimal pairs {points[-1]['pairs']:.4f}" if points[-1]["pairs"] is not None else ""))
    return points
