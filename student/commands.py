"""The `kdcache` subcommands of the student package: teachers, distill, eval, export (listed in cache/cli.py).

Each command turns the package's errors into one clear line (click.ClickException).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from cache.config import Config, ConfigError, load_config, run_paths
from cache.schema import StoreError
from student.distill import distill as run_distill
from student.evaluate import EvalError, compare, evaluate_model
from student.export import ExportError, export_model, load_model_dir
from student.train import TrainError, init_distributed, model_from_checkpoint, train_teacher

ERRORS = (ConfigError, StoreError, TrainError, EvalError, ExportError)


def fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@click.command("teachers")
@click.option("--config", "config_path", required=True, help="Run config (YAML).")
@click.option("--runs-root", default="runs", show_default=True, help="Directory holding runs/<name>/.")
@click.option("--teacher", "names", multiple=True, help="Train only this teacher (repeatable; default: all).")
@click.option("--resume", is_flag=True, help="Continue from each teacher's last checkpoint, if any.")
def teachers(config_path: str, runs_root: str, names: tuple[str, ...], resume: bool) -> None:
    """Train the config's teachers on tokens/train; each lands in runs/<name>/teachers/<teacher>/model."""
    main = init_distributed().main
    try:
        cfg = load_config(config_path)
        for teacher in [cfg.teacher(n) for n in names] if names else cfg.teachers:
            if teacher.pretrained:
                message = f"{teacher.name}: pretrained ({teacher.pretrained}), not trained"
            else:
                message = f"{teacher.name}: saved {train_teacher(cfg, teacher, runs_root, resume)}"
            if main:
                click.echo(message)
    except ERRORS as e:
        raise fail(e) from None


@click.command("distill")
@click.option("--config", "config_path", required=True, help="Run config (YAML).")
@click.option("--runs-root", default="runs", show_default=True, help="Directory holding runs/<name>/.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint, if any.")
@click.option("--baseline", is_flag=True, help="Also train the same student without distillation (runs/<name>/baseline).")
@click.option("--online", is_flag=True, help="Instead: the online baseline, teachers in memory, dense KL (runs/<name>/online).")
def distill(config_path: str, runs_root: str, resume: bool, baseline: bool, online: bool) -> None:
    """Train the student on hard labels + KL to every cached teacher (+ hidden alignment); no teacher is loaded."""
    main = init_distributed().main
    try:
        cfg = load_config(config_path)
        out = run_distill(cfg, runs_root, resume=resume, online=online)
        if main:
            click.echo(f"student: saved {out}")
        if baseline and not online:
            out = run_distill(cfg, runs_root, resume=resume, baseline=True)
            if main:
                click.echo(f"baseline (no distillation): saved {out}")
    except ERRORS as e:
        raise fail(e) from None


def model_name(model_dir: str) -> str:
    """runs/x/teachers/llama/model -> llama; any other directory -> its own name."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


def run_models(cfg: Config, runs_root: str) -> dict[str, str]:
    """Every teacher and student model of a run that exists: name -> directory."""
    paths = run_paths(cfg, runs_root)
    candidates = {t.name: t.pretrained or str(paths.teacher(t.name) / "model") for t in cfg.teachers}
    candidates |= {"student": str(paths.student / "model"), "baseline": str(paths.baseline / "model"),
                   "online": str(paths.root / "online" / "model")}
    for name, path in candidates.items():
        if not Path(path).is_dir():
            click.echo(f"{name}: no model at {path}, skipped")
    return {name: path for name, path in candidates.items() if Path(path).is_dir()}


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@click.command("eval")
@click.argument("model_dirs", nargs=-1)
@click.option("--config", "config_path", help="Run config: its store, pair directories, and (without MODEL_DIRS) its models.")
@click.option("--runs-root", default="runs", show_default=True, help="Directory holding runs/<name>/.")
@click.option("--store", help="Store whose tokens/dev gives the held-out loss (default: the config's).")
@click.option("--pairs", "pair_dirs", multiple=True, help="Directory of BLiMP-format *.jsonl files (repeatable).")
@click.option("--json", "json_out", help="Write the report of the (one) model here.")
@click.option("--batch-size", type=int, help="Sequences per forward pass (default: the config's eval.batch_size, else 64).")
def evaluate(model_dirs: tuple[str, ...], config_path: str | None, runs_root: str, store: str | None,
             pair_dirs: tuple[str, ...], json_out: str | None, batch_size: int | None) -> None:
    """Held-out loss and minimal-pair accuracy of MODEL_DIRS (default: every teacher and student of --config).

    With --config each report goes to runs/<name>/eval/<model>.json; the table compares all models side by side.
    """
    try:
        cfg = load_config(config_path) if config_path else None
        if not model_dirs and cfg is None:
            raise click.UsageError("give MODEL_DIRS or --config")
        models = {model_name(d): d for d in model_dirs} if model_dirs else run_models(cfg, runs_root)
        if len(models) < len(model_dirs):
            raise click.UsageError("two MODEL_DIRS share a name; reports are named after the model directory")
        if not models:
            raise EvalError(f"{config_path}: no trained models to evaluate yet")
        if json_out and len(models) > 1:
            raise click.UsageError("--json takes one model; with --config the reports go to runs/<name>/eval/")
        if cfg is not None:
            store = store or str(run_paths(cfg, runs_root).store)
            pair_dirs = (*cfg.eval.minimal_pair_dirs, *pair_dirs)
            batch_size = batch_size or cfg.eval.batch_size
        reports = {}
        for name, source in models.items():
            click.echo(f"evaluating {name} ({source})")
            reports[name] = report = evaluate_model(source, store=store, pair_dirs=list(pair_dirs),
                                                    batch_size=batch_size or 64)
            for directory, result in report["minimal_pairs"].items():
                click.echo(f"  {directory}: {result['pairs']:,} pairs, {result['pairs_per_s']:,.0f} pairs/s")
            if cfg is not None:
                write_json(run_paths(cfg, runs_root).eval / f"{name}.json", report)
            if json_out:
                write_json(Path(json_out), report)
    except ERRORS as e:
        raise fail(e) from None
    click.echo(compare(reports))


@click.command("export")
@click.argument("source")
@click.argument("out")
@click.option("--tokenizer", "tokenizer_dir",
              help="Tokenizer directory (default: SOURCE's own, or the one a checkpoint was trained with).")
def export(source: str, out: str, tokenizer_dir: str | None) -> None:
    """Export SOURCE (a model directory or a training checkpoint .pt) to OUT as a Hugging Face directory."""
    try:
        path = Path(source)
        if path.is_dir():
            model = load_model_dir(path)
            tokenizer_dir = tokenizer_dir or source
        else:
            model, ckpt = model_from_checkpoint(path)
            tokenizer_dir = tokenizer_dir or ckpt["tokenizer_dir"]
        click.echo(f"wrote {export_model(model, tokenizer_dir, out)}")
    except ERRORS as e:
        raise fail(e) from None
