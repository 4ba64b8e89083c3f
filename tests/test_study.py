"""`kdcache study`: variants as validated overrides, the statistics of the report, and a tiny study end to end
(every run trained once; a rerun trains nothing)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcache.config import ConfigError, load_config
from kdcache.study.report import paired_interval, study_table, summarize


def result(variant: str, seed: int, dev_ce: float, pairs: float, kind: str = "kd") -> dict:
    return {"variant": variant, "seed": seed, "kind": kind, "dev_ce": dev_ce, "dev_perplexity": math.exp(dev_ce),
            "pairs": {"blimp": pairs}, "train_tokens_per_s": 1000.0, "train_seconds": 1.0, "curve": [], "parameters": 1}


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    interval = paired_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) x sd 1 / sqrt(3)
    assert interval["mean"] == 2.0 and interval["n"] == 3
    assert interval["low"] == pytest.approx(2.0 - half) and interval["high"] == pytest.approx(2.0 + half)
    assert paired_interval([0.5])["low"] is None  # one seed: no interval


def test_summary_pairs_each_variant_with_the_baseline_seed_by_seed():
    results = [result("ce", 1, 3.0, 0.60, "baseline"), result("ce", 2, 3.2, 0.62, "baseline"),
               result("kd", 1, 2.9, 0.61), result("kd", 2, 3.0, 0.65)]
    summary = summarize(results, "ce")
    assert summary["ce"]["dev_ce"]["mean"] == pytest.approx(3.1)
    assert summary["ce"]["dev_ce"]["std"] == pytest.approx(math.sqrt(0.02))
    assert "vs_baseline" not in summary["ce"]
    assert summary["kd"]["vs_baseline"]["dev_ce"]["values"] == pytest.approx([-0.1, -0.2])
    assert summary["kd"]["vs_baseline"]["pairs"]["mean"] == pytest.approx(0.02)
    table = study_table(summary, "ce")
    assert table.splitlines()[0].startswith("| variant | kind | seeds | dev CE (nats)")
    assert "| kd | kd | 2 | 2.9500 ± 0.0707 |" in table


def study_config(tmp_path: Path, variants: dict, **cache) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "cache": {"samples": 8, "sample_temperature": 1.0, **cache},
        "distill": {"temperature": 2.0, "form": "tail"}, "study": {"seeds": [1, 2], "variants": variants}}))
    return path


def test_variants_override_distill_and_training_and_are_validated_on_load(tmp_path):
    cfg = load_config(study_config(tmp_path, {
        "ce": {"kind": "baseline"},
        "sampled": {"distill": {"form": "sampled", "temperature": 1.0}, "student_train": {"lr": 0.01}},
        "hidden": {"distill": {"hidden": {"weight": 0.1}}}}))
    sampled = cfg.variant("sampled", 2)
    assert (sampled.seed, sampled.distill.form, sampled.distill.temperature, sampled.student_train.lr) == (2, "sampled", 1.0, 0.01)
    assert sampled.distill.hard_weight == cfg.distill.hard_weight and sampled.student_train.batch_size == cfg.student_train.batch_size
    assert cfg.variant("hidden", 1).distill.hidden.weight == 0.1 and cfg.variant("hidden", 1).distill.hidden.kind == "mse"
    assert cfg.distill.form == "tail"  # the run's own section is untouched


@pytest.mark.parametrize("variants, message", [
    ({"x": {"distill": {"fomr": "tail"}}}, "study.variants.x.distill: unknown key 'fomr' (did you mean 'form'?"),
    ({"x": {"student_train": {"lr": "fast"}}}, "study.variants.x.student_train.lr: expected float"),
    ({"x": {"distill": {"form": "sampled"}}},
     "study.variants.x: distill.temperature 2.0 != cache.sample_temperature 1.0: form 'sampled' trains on draws"),
])
def test_a_bad_variant_is_refused_on_load_naming_it(tmp_path, variants, message):
    with pytest.raises(ConfigError) as error:
        load_config(study_config(tmp_path, variants))
    assert message in str(error.value) and str(tmp_path) in str(error.value)


def test_sampled_targets_at_another_temperature_are_refused_naming_both_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "cache": {"samples": 8, "sample_temperature": 1.0},
                                    "distill": {"form": "sampled", "temperature": 2.0}}))
    with pytest.raises(ConfigError, match=r"distill.temperature 2.0 != cache.sample_temperature 1.0"):
        load_config(path)


def run_dir(root: Path, name: str, records: list[dict]) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_plot_draws_the_dev_curves_of_run_directories_without_loading_torch(tmp_path):
    runs = [run_dir(tmp_path, name, [{"step": 1, "loss": 5.0}, {"step": 2, "dev_ce": ce + 0.5},
                                     {"step": 4, "dev_ce": ce}]) for name, ce in (("ce", 4.0), ("tail", 3.9))]
    out = tmp_path / "curves.png"
    code = ("import sys; from kdcache.cli import main; "
            f"main(['plot', {str(runs[0])!r}, {str(runs[1])!r}, '--out', {str(out)!r}], standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'torch loaded'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "(2 runs)" in proc.stdout and out.stat().st_size > 10_000


def test_plot_of_a_run_without_dev_evaluations_says_what_to_set(tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import main

    run = run_dir(tmp_path, "old", [{"step": 1, "loss": 5.0}])
    result = CliRunner().invoke(main, ["plot", str(run), "--out", str(tmp_path / "curves.png")])
    assert result.exit_code == 2 and "no dev_ce records (set student_train.eval_every)" in result.output, result.output


@pytest.mark.slow
def test_a_tiny_study_end_to_end_and_a_rerun_trains_nothing(tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import main
    from test_distill import tiny_config

    runs = tmp_path / "runs"
    cfg = tiny_config(runs)
    cfg["student_train"] = {**cfg["student_train"], "max_steps": 6, "eval_every": 3}
    cfg["distill"]["hidden"]["weight"] = 0.0
    cfg["study"] = {"seeds": [1, 2], "variants": {"ce": {"kind": "baseline"}, "tail": {},
                                                  "renorm": {"distill": {"form": "renorm"}}}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def kdcache(*args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--config", str(config), "--runs-root", str(runs)])
        assert result.exit_code == 0, result.output
        return result.output

    for step in ("data", "teachers", "precompute"):
        kdcache(step)
    def trained(output: str) -> list[str]:  # (Hugging Face's bars on the captured stderr share the lines)
        return re.findall(r"study \d+/\d+: [^\n]*", output)

    assert trained(kdcache("study")) == [
        f"study {i}/6: {v}, seed {s} -> {runs}/tiny/study/{v}/seed{s}"
        for i, (s, v) in enumerate([(s, v) for s in (1, 2) for v in ("ce", "tail", "renorm")], 1)]
    root = runs / "tiny" / "study"
    document = json.loads((root / "study.json").read_text())
    assert [(r["variant"], r["seed"]) for r in document["runs"]] == [(v, s) for s in (1, 2) for v in ("ce", "tail", "renorm")]
    assert all(r["curve"] and [step for step, _ in r["curve"]] == [3, 6] for r in document["runs"])
    assert set(document["summary"]["tail"]["vs_baseline"]) == {"dev_ce", "pairs"}
    assert "vs_baseline" not in document["summary"]["ce"]
    assert "| tail | kd | 2 |" in (root / "study.md").read_text() and (root / "study.png").stat().st_size > 10_000
    # Same seed: the CE-only and the distilled student start from the same weights and read the same batches.
    first = {v: json.loads((root / v / "seed1" / "metrics.jsonl").read_text().splitlines()[0]) for v in ("ce", "tail")}
    assert first["ce"]["loss"] == pytest.approx(first["tail"]["hard_ce"], rel=1e-5)

    before = {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/result.json")}
    assert trained(kdcache("study")) == []  # rerun: nothing trained, the report written again
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*/seed*/result.json")}
    (root / "renorm" / "seed2" / "result.json").unlink()  # an interrupted run: only it is redone
    assert trained(kdcache("study")) == [f"study 6/6: renorm, seed 2 -> {runs}/tiny/study/renorm/seed2"]
