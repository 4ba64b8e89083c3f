"""A study's numbers: per-variant mean and spread over seeds, paired differences to the baseline with 95% intervals."""

from __future__ import annotations

import math
import statistics
from typing import Any

from scipy import stats as scipy_stats

# metric -> (label, format, whether lower is better)
METRICS = {
    "dev_ce": ("dev CE (nats)", "{:.4f}", True),
    "dev_perplexity": ("dev perplexity", "{:.2f}", True),
    "pairs": ("minimal pairs", "{:.4f}", False),
    "train_tokens_per_s": ("train tokens/s", "{:,.0f}", False),
    "words_seen": ("words seen", "{:,.0f}", False),  # BabyLM's count (whitespace words of the training text)
}
COMPARED = ("dev_ce", "pairs")  # the metrics whose paired differences to the baseline are reported


def metric_values(result: dict[str, Any]) -> dict[str, float]:
    """One run's metrics; `pairs` is the mean over its minimal-pair directories (each a macro mean over paradigms)."""
    pairs = list(result["pairs"].values())
    return {"dev_ce": result["dev_ce"], "dev_perplexity": result["dev_perplexity"],
            "pairs": sum(pairs) / len(pairs) if pairs else math.nan,
            "train_tokens_per_s": result["train_tokens_per_s"] or math.nan,
            "words_seen": result.get("words_seen") or math.nan}  # None: a store without words, or an older result


def spread(values: list[float]) -> dict[str, Any]:
    if any(math.isnan(v) for v in values):  # a metric some run lacks (words seen of a store without words)
        return {"mean": math.nan, "std": None, "values": values}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of per-seed differences with its Student-t confidence interval (None with fewer than two seeds)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(differences), "values": differences}
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * statistics.stdev(differences) \
        / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(differences), "values": differences}


def summarize(results: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    """Per variant (in first-seen order): each metric's spread over seeds, and for every variant but the baseline
    the paired difference (variant - baseline, same seed) of the compared metrics."""
    by_variant: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = metric_values(r)
    summary: dict[str, Any] = {}
    for variant, seeds in by_variant.items():
        entry: dict[str, Any] = {"seeds": sorted(seeds), "kind": next(r["kind"] for r in results if r["variant"] == variant)}
        entry |= {m: spread([seeds[s][m] for s in sorted(seeds)]) for m in METRICS}
        if baseline is not None and variant != baseline:
            common = sorted(set(seeds) & set(by_variant[baseline]))
            entry["vs_baseline"] = {m: paired_interval([seeds[s][m] - by_variant[baseline][s][m] for s in common])
                                    for m in COMPARED}
        summary[variant] = entry
    return summary


def _mean_std(cell: dict[str, Any], fmt: str) -> str:
    return fmt.format(cell["mean"]) + ("" if cell["std"] is None else " ± " + fmt.format(cell["std"]))


def _interval(cell: dict[str, Any], fmt: str) -> str:
    if cell["low"] is None:
        return f"{cell['mean']:+.4f}"
    verdict = "  " if cell["low"] <= 0 <= cell["high"] else " *"
    return f"{cell['mean']:+.4f} [{cell['low']:+.4f}, {cell['high']:+.4f}]{verdict}"


def study_table(summary: dict[str, Any], baseline: str | None) -> str:
    """The markdown table: mean ± std over seeds per metric, then the paired differences to the baseline."""
    header = ["variant", "kind", "seeds"] + [METRICS[m][0] for m in METRICS]
    header += [f"Δ {METRICS[m][0]} vs {baseline} (95% CI)" for m in COMPARED] if baseline else []
    rows = []
    for variant, entry in summary.items():
        row = [variant, entry["kind"], str(len(entry["seeds"]))]
        row += [_mean_std(entry[m], METRICS[m][1]) for m in METRICS]
        if baseline:
            row += [_interval(entry["vs_baseline"][m], "{:+.4f}") if "vs_baseline" in entry else "-" for m in COMPARED]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
