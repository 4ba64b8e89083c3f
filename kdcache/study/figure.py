"""Figures of training runs: dev cross-entropy learning curves, learning curves by words seen (the chck_*
checkpoints), and a study's final metrics with error bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.config import METRICS_FILE
from kdcache.files import staged


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (train windows and dev evaluations); none if it has no such file."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> None:
    with staged(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=110)


def draw_curves(ax: Any, curves: dict[str, list[list[tuple[int, float]]]]) -> None:
    """Per label, the mean over its runs of (step, value) curves, with a min-max band when there are several."""
    for label, runs in curves.items():
        steps = sorted(set.intersection(*[{s for s, _ in run} for run in runs])) if runs else []
        if not steps:
            continue
        values = np.array([[dict(run)[s] for s in steps] for run in runs])
        line, = ax.plot(steps, values.mean(0), label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
    ax.set(xlabel="optimizer step", ylabel="dev cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], out: Path, title: str) -> None:
    """One figure of learning curves (`kdcache plot RUN_DIR...`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_curves(ax, curves)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def plot_study(results: list[dict[str, Any]], summary: dict[str, Any], out: Path, title: str) -> None:
    """Learning curves per variant (mean and band over seeds), then final dev CE and minimal pairs (mean ± std)."""
    plt = _pyplot()
    fig, (curves_ax, ce_ax, pairs_ax) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]})
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for r in results:
        if r["curve"]:
            curves.setdefault(r["variant"], []).append([tuple(point) for point in r["curve"]])
    draw_curves(curves_ax, curves)
    curves_ax.set_title("dev cross-entropy while training")
    names = list(summary)
    for ax, metric, label in ((ce_ax, "dev_ce", "final dev CE (nats)"), (pairs_ax, "pairs", "minimal-pair accuracy")):
        means = [summary[n][metric]["mean"] for n in names]
        errors = [summary[n][metric]["std"] or 0 for n in names]
        # mean ± std as a point with error bars (a bar on a cut axis would exaggerate), and every seed's value
        ax.errorbar(range(len(names)), means, yerr=errors, fmt="o", capsize=5, color="tab:blue", markersize=7)
        for i, n in enumerate(names):
            ax.scatter([i + 0.12] * len(summary[n][metric]["values"]), summary[n][metric]["values"], color="gray", s=12)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", rotation_mode="anchor")  # long names
        ax.grid(axis="y", alpha=0.3)
        low, high = min(min(summary[n][metric]["values"]) for n in names), max(max(summary[n][metric]["values"]) for n in names)
        pad = (high - low) * 0.5 or abs(high) * 0.01 or 0.01
        ax.set(ylim=(low - pad, high + pad), title=label)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def plot_word_curves(curves: dict[str, list[dict[str, Any]]], out: Path, title: str) -> None:
    """Dev CE and minimal-pair accuracy against words seen (log scale), one line per model (`kdcache eval`'s
    curves.json, or several runs' together: `kdcache plot`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "dev_ce", "dev cross-entropy (nats)"), (axes[1], "pairs", "minimal-pair accuracy")):
        for name, points in curves.items():
            xy = [(p["words_seen"], p[metric]) for p in points if p.get(metric) is not None and p.get("words_seen")]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
        ax.set_xscale("log")
        ax.set(xlabel="words seen", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
