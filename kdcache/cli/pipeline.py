"""The pipeline's commands: `kdcache data | teachers | precompute | distill | eval | export`.

Each command loads its config and calls one stage function, imported inside the command so that the store's
commands never pay for torch. Errors are KdcacheErrors, printed by the group (kdcache.cli) as one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from kdcache.cli.command import command
from kdcache.config import Config, ConfigError, load_config, run_paths

def load_run_config(path: str) -> Config:
    """`load_config`, plus the one check the config cannot make itself (it may not import the student stage):
    `distill.form`, the run's and every study variant's, names a registered KD form."""
    from kdcache.student.kd import known_forms

    cfg = load_config(path)
    forms = {"distill.form": cfg.distill.form} | {f"study.variants.{name}.distill.form": cfg.variant(name, cfg.seed).distill.form
                                                  for name in cfg.study.variants}
    for key, form in forms.items():
        if form not in known_forms():
            raise ConfigError(f"{path}: {key}: {form!r} is not one of {known_forms()}")
    return cfg


def announce(main: bool, words_seen: dict[str, int | None]) -> None:
    """One line per model about to train: the words it will see (BabyLM's count), when the store records words."""
    for name, words in words_seen.items():
        if main and words is not None:
            click.echo(f"{name} will see {words:,} words")


config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                             help="Run config (YAML).")
runs_root_option = click.option("--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False),
                                help="Directory holding runs/<name>/.")


@command("data")
@config_option
@runs_root_option
@click.option("--overwrite", is_flag=True, help="Replace a store that already holds teacher targets.")
def data(config_path: str, runs_root: str, overwrite: bool) -> None:
    """Clean the corpus, train the tokenizer and write token sequences to runs/<name>/cache.zarr."""
    from kdcache.precompute.data import data_summary, prepare_data

    click.echo(data_summary(prepare_data(load_run_config(config_path), runs_root, overwrite)))


@command("teachers")
@config_option
@runs_root_option
@click.option("--teacher", "names", multiple=True, help="Train only this teacher (repeatable; default: all).")
@click.option("--resume", is_flag=True, help="Continue from each teacher's last checkpoint, if any.")
def teachers(config_path: str, runs_root: str, names: tuple[str, ...], resume: bool) -> None:
    """Train the config's teachers on tokens/train; each lands in runs/<name>/teachers/<teacher>/model."""
    from kdcache.runtime import init_distributed
    from kdcache.precompute.teacher_training import own_token_store, train_teacher
    from kdcache.student.budget import check_word_budget, teacher_models

    main = init_distributed().main
    cfg = load_run_config(config_path)
    chosen = [cfg.teacher(n) for n in names] if names else cfg.teachers
    # a teacher with its own tokenizer sees its own token store's words: made first, so its budget is exact
    own = {t.name: own_token_store(cfg, t, runs_root).store for t in chosen if t.tokenizer and not t.pretrained}
    announce(main, check_word_budget(cfg, runs_root, teacher_models(cfg, tuple(t.name for t in chosen), own)))
    for teacher in chosen:
        if teacher.pretrained:
            message = f"{teacher.name}: pretrained ({teacher.pretrained}), not trained"
        else:
            message = f"{teacher.name}: saved {train_teacher(cfg, teacher, runs_root, resume)}"
        if main:
            click.echo(message)


@command("precompute")
@config_option
@runs_root_option
@click.option("--store", default=None, help="Store path or fsspec URL [default: <runs-root>/<name>/cache.zarr].")
@click.option("--overwrite", is_flag=True, help="Recompute the selected teachers' groups from scratch.")
@click.option("--teacher", "teachers", multiple=True, help="Only this teacher (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--writers", type=click.IntRange(min=1), default=None,
              help="Threads compressing shards per rank [default: 1 on CPU, up to 8 on CUDA].")
def precompute(config_path: str, runs_root: str, store: str | None, overwrite: bool, teachers: tuple[str, ...],
               device: str, writers: int | None) -> None:
    """Cache the teachers' top-k logits, logsumexps, samples and hidden states for every token split."""
    from kdcache.precompute.run import precompute_targets

    stats = precompute_targets(load_run_config(config_path), runs_root, overwrite, teachers, device, store, writers)
    click.echo(f"rank {stats.rank}: {stats.shards_written} shards written, {stats.shards_skipped} already complete; "
               f"{stats.positions} positions in {stats.seconds:.1f} s ({stats.tokens_per_s:,.0f}/s, "
               f"{stats.writer_wait_s:.1f} s waiting for the writer)")


@command("distill")
@config_option
@runs_root_option
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint, if any.")
@click.option("--baseline", is_flag=True, help="Also train the same student without distillation (runs/<name>/baseline).")
@click.option("--online", is_flag=True, help="Instead: the online baseline, teachers in memory, dense KL (runs/<name>/online).")
def distill(config_path: str, runs_root: str, resume: bool, baseline: bool, online: bool) -> None:
    """Train the student on hard labels + KL to every cached teacher (+ hidden alignment); no teacher is loaded."""
    from kdcache.runtime import init_distributed
    from kdcache.student.budget import check_word_budget, student_models
    from kdcache.student.distill import distill as run_distill

    main = init_distributed().main
    cfg = load_run_config(config_path)
    announce(main, check_word_budget(cfg, runs_root, student_models(cfg)))
    out = run_distill(cfg, runs_root, resume=resume, online=online)
    if main:
        click.echo(f"student: saved {out}")
    if baseline and not online:
        out = run_distill(cfg, runs_root, resume=resume, baseline=True)
        if main:
            click.echo(f"baseline (no distillation): saved {out}")


@command("eval")
@click.argument("model_dirs", nargs=-1)
@click.option("--config", "config_path", help="Run config: its store, pair directories, and (without MODEL_DIRS) its models.")
@runs_root_option
@click.option("--store", help="Store whose tokens/dev gives the held-out loss (default: the config's).")
@click.option("--pairs", "pair_dirs", multiple=True, help="Directory of BLiMP-format *.jsonl files (repeatable).")
@click.option("--json", "json_out", help="Write the report of the (one) model here.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Sequences per forward pass (default: the config's eval.batch_size, else 64).")
def evaluate(model_dirs: tuple[str, ...], config_path: str | None, runs_root: str, store: str | None,
             pair_dirs: tuple[str, ...], json_out: str | None, batch_size: int | None) -> None:
    """Held-out loss and minimal-pair accuracy of MODEL_DIRS (default: every teacher and student of --config).

    With --config each report goes to runs/<name>/eval/<model>.json: a model of the run under its name (student,
    a teacher's), any other directory under its name and a digest of its path (student-1a2b3c4d), so that no
    report replaces another model's. The table compares all models side by side.
    """
    from kdcache.files import atomic_write
    from kdcache.student.evaluate import EvalError, compare, evaluate_model, model_name, run_models

    cfg = load_run_config(config_path) if config_path else None
    if not model_dirs and cfg is None:
        raise click.UsageError("give MODEL_DIRS or --config")
    run = run_models(cfg, runs_root) if cfg is not None else None
    if model_dirs:
        if missing := [d for d in model_dirs if not Path(d).is_dir()]:
            raise EvalError(f"{missing[0]}: model directory not found")
        models = {model_name(d, run): d for d in model_dirs}
    else:
        models = dict(run)
        for name in [name for name, path in models.items() if not Path(path).is_dir()]:
            click.echo(f"{name}: no model at {models.pop(name)}, skipped")
    if len(models) < len(model_dirs):
        raise click.UsageError("two MODEL_DIRS share a name; reports are named after the model directory")
    if not models:
        raise EvalError(f"{config_path}: no trained models to evaluate yet under {run_paths(cfg, runs_root).root}")
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
                                                batch_size=batch_size or 64,
                                                pairs_per_paradigm=cfg.eval.pairs_per_paradigm if cfg else 0)
        for directory, result in report["minimal_pairs"].items():
            click.echo(f"  {directory}: {result['pairs']:,} pairs, {result['pairs_per_s']:,.0f} pairs/s")
        document = json.dumps(report, indent=2) + "\n"
        if cfg is not None:
            atomic_write(run_paths(cfg, runs_root).eval / f"{name}.json", document)
        if json_out:
            atomic_write(json_out, document)
    click.echo(compare(reports))
    if cfg is not None and not model_dirs:
        write_curves(cfg, runs_root, models, store, list(pair_dirs), batch_size or 64)


def write_curves(cfg: Config, runs_root: str, models: dict[str, str], store: str, pair_dirs: list[str],
                 batch_size: int) -> None:
    """The learning curves of the run's models that saved checkpoints by words seen: every chck_* scored, then
    runs/<name>/eval/curves.json and curves.png (log x axis)."""
    from kdcache.files import atomic_write
    from kdcache.student.curves import model_curve
    from kdcache.study.figure import plot_word_curves

    curves = {}
    for name, source in models.items():
        points = model_curve(source, store=store, pair_dirs=pair_dirs, batch_size=batch_size,
                             pairs_per_paradigm=cfg.eval.curve_pairs_per_paradigm, echo=click.echo)
        if points:
            curves[name] = points
    if not curves:
        return
    out = run_paths(cfg, runs_root).eval
    atomic_write(out / "curves.json", json.dumps({"name": cfg.name, "curves": curves}, indent=2) + "\n")
    plot_word_curves(curves, out / "curves.png", f"{cfg.name}: learning curves by words seen")
    click.echo(f"wrote {out / 'curves.json'}, {out / 'curves.png'} ({sum(map(len, curves.values()))} points)")


@command("export")
@click.argument("source")
@click.argument("out", required=False)
@click.option("--tokenizer", "tokenizer_dir",
              help="Tokenizer directory (default: SOURCE's own, or the one a checkpoint was trained with).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--submission", type=click.Path(file_okay=False),
              help="Instead: SOURCE is a run (runs/<name>); write its final model and every chck_* checkpoint here, "
                   "one folder per BabyLM branch, with the upload commands.")
@click.option("--repo", default="<hf-user>/<model-name>", show_default=True,
              help="Hugging Face repository the --submission upload lines push to.")
def export(source: str, out: str | None, tokenizer_dir: str | None, overwrite: bool, submission: str | None,
           repo: str) -> None:
    """Export SOURCE (a model directory or a training checkpoint .pt) to OUT as a Hugging Face directory; or, with
    `--submission OUT RUN`, a run's final model and checkpoints by words seen in BabyLM's layout."""
    from kdcache.student.export import ExportError, export_model, export_submission, load_model_dir, read_training_state
    from kdcache.student.checkpoint import model_from_checkpoint

    if (submission is None) == (out is None):
        raise click.UsageError("give SOURCE OUT, or --submission OUT RUN")
    out = submission or out
    if Path(out).exists() and not overwrite:
        raise ExportError(f"{out}: exists; export replaces OUT as a whole (pass --overwrite, or give a new path)")
    if submission is not None:
        lines = export_submission(source, out, repo)
        click.echo(f"wrote {out}: {len(lines)} branches; push them with ({out}/upload.sh):")
        click.echo("\n".join(lines))
        return
    if not Path(source).exists() and Path(source).suffix != ".pt":
        raise ExportError(f"{source}: not found (SOURCE is a model directory or a training checkpoint .pt)")
    if Path(source).is_dir():
        model, training = load_model_dir(source), read_training_state(source)
        tokenizer_dir = tokenizer_dir or source
    else:
        model, ckpt = model_from_checkpoint(source)
        tokenizer_dir = tokenizer_dir or ckpt["tokenizer_dir"]
        training = {"step": ckpt["step"], "words_seen": ckpt.get("words_seen")}
    click.echo(f"wrote {export_model(model, tokenizer_dir, out, training)}")


@command("study")
@config_option
@runs_root_option
def study(config_path: str, runs_root: str) -> None:
    """Train the config's study variants over its seeds from one cache; write runs/<name>/study/study.{md,json,png}.

    Finished runs are skipped and interrupted ones resume, so a rerun only writes the report again.
    """
    from kdcache.runtime import init_distributed
    from kdcache.student.budget import check_word_budget, study_models
    from kdcache.study.run import run_study, write_study

    main = init_distributed().main
    cfg = load_run_config(config_path)
    if not cfg.study.variants:
        raise ConfigError(f"{config_path}: the config has no study.variants")
    check_word_budget(cfg, runs_root, study_models(cfg))
    start = time.perf_counter()
    results = run_study(cfg, runs_root, click.echo if main else lambda _: None)
    if main:
        click.echo(f"wrote {write_study(cfg, results, runs_root, time.perf_counter() - start)}")


COMMANDS = [data, teachers, precompute, distill, evaluate, export, study]
