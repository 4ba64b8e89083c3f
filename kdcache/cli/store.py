"""The store's commands: `kdcache inspect | show | stats | verify | seal | plot | upgrade` (no torch is imported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click

from kdcache.cache import FORMAT_VERSION
from kdcache.cache import stats as st
from kdcache.cache.inspect import (
    check_split, check_teachers, inspect_text, load_tokenizer, position_document, show_text, stats_text, summarize,
)
from kdcache.cache.manifest import checked_manifest
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import TOKENS, StoreError, open_store
from kdcache.cache.upgrade import upgrade_store
from kdcache.cli.command import command
from kdcache.config import METRICS_FILE

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")


def emit(as_json: bool, document: dict, human: Callable[[dict], str]) -> None:
    """Print `document` as JSON (--json) or as `human` lays it out."""
    click.echo(json.dumps(document, indent=2) if as_json else human(document))


def sample_options(command: Callable) -> Callable:
    """The options `stats` and `plot` share: which sequences and teachers to sample."""
    for option in reversed([
        click.option("--sample", default=200, show_default=True, help="Sequences to read (seeded random sample)."),
        click.option("--seed", default=0, show_default=True),
        click.option("--split", default="train", show_default=True),
        click.option("--teacher", "teachers", multiple=True, help="Teacher group (repeatable; default: all)."),
    ]):
        command = option(command)
    return command


@command()
@click.argument("store")
@json_option
def inspect(store: str, as_json: bool) -> None:
    """Summary of STORE from metadata only: splits, teachers, completion, bytes on disk."""
    emit(as_json, summarize(open_store(store), store), inspect_text)


@command()
@click.argument("store")
@click.option("--seq", type=int, required=True, help="Sequence index.")
@click.option("--pos", type=int, default=None, help="Position (default: the last); its target predicts token pos+1.")
@click.option("--teacher", "teachers", multiple=True, help="Teacher group (repeatable; default: all).")
@click.option("-T", "--temperature", type=float, default=1.0, show_default=True)
@click.option("--top", type=int, default=10, show_default=True, help="How many of the top-k to list.")
@click.option("--split", default="train", show_default=True)
@click.option("--tokenizer", "tokenizer_dir", help="Tokenizer dir (default: the run's tokenizer/ beside STORE).")
@json_option
def show(store: str, seq: int, pos: int | None, teachers: tuple[str, ...], temperature: float, top: int,
         split: str, tokenizer_dir: str | None, as_json: bool) -> None:
    """The context at one position of STORE, its true next token, and each teacher's soft targets."""
    checked_manifest(store, split, list(teachers) or None)  # a damaged document is named before zarr reads it
    root = open_store(store)
    check_split(root, split)
    names = check_teachers(root, teachers)
    tokens = root[f"{TOKENS}/{split}"]
    n, length = tokens.shape
    pos = length - 1 if pos is None else pos
    if not 0 <= seq < n:
        raise click.ClickException(f"{store}: --seq {seq} is out of range: split {split!r} has sequences 0..{n - 1}")
    if not 0 <= pos < length:
        raise click.ClickException(f"{store}: --pos {pos} is out of range: sequences have positions 0..{length - 1}")
    if temperature <= 0 or top <= 0:
        raise click.ClickException(f"-T {temperature} and --top {top} must both be positive")
    for name in names:
        if not st.complete_sequences(root, name, split)[seq]:
            raise StoreError(f"{store}: teacher {name!r} has not finished the shard holding {split} sequence {seq}")
    check_position(store, split, seq, n, names)
    tokenizer, warning = load_tokenizer(store, tokenizer_dir, root.attrs.get("tokenizer_sha256"))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    document = position_document(root, store, split, seq, pos, names, temperature, top, tokenizer)
    emit(as_json, document, show_text)


def check_position(store: str, split: str, seq: int, n: int, teachers: list[str]) -> None:
    """Read what `show` reads of sequence `seq` (and the next one's tokens) through the direct reader first: a
    damaged file is then named (zarr's errors do not name it) and checked against the store's manifest."""
    reader = StoreReader(store, teachers=teachers, split=split, require_complete=False)
    reader.batch([seq])
    reader.readers["input_ids"].read_sequences(range(seq, min(seq + 2, n)))


@command()
@click.argument("store")
@sample_options
@json_option
def stats(store: str, sample: int, seed: int, split: str, teachers: tuple[str, ...], as_json: bool) -> None:
    """Top-k mass, entropy and teacher agreement by position over a seeded sample of STORE's sequences."""
    emit(as_json, sampled_stats(store, sample, seed, split, teachers), stats_text)


def sampled_stats(store: str, sample: int, seed: int, split: str, teachers: tuple[str, ...]) -> dict:
    """The `stats` document of STORE, once its options are checked."""
    root = open_store(store)
    check_split(root, split)
    if sample <= 0:
        raise click.ClickException(f"--sample {sample} must be positive")
    return {"store": store, **st.compute_stats(root, split, check_teachers(root, teachers), sample, seed)}


@command()
@click.argument("store")
@json_option
@click.pass_context
def verify(ctx: click.Context, store: str, as_json: bool) -> None:
    """Check every file of STORE against its manifest, and every shard: checksums, shapes, completeness, NaN/inf,
    attributes. Exit 1 on any problem, one line each, naming the file."""
    from kdcache.cache.verify import verify_store  # the checks decode every chunk: load them if asked

    try:
        problems = verify_store(store)
    except StoreError as e:
        problems = [str(e)]
    if as_json:
        click.echo(json.dumps({"store": store, "ok": not problems, "problems": problems}, indent=2))
    else:
        click.echo("\n".join(problems) if problems else f"{store}: ok")
    if problems:
        ctx.exit(1)


@command()
@click.argument("store")
def seal(store: str) -> None:
    """Verify every chunk of STORE, then record its manifest: for a store whose writer stopped before sealing it
    (or whose kdcache.manifest was deleted). Refused, naming the problems, when verify finds any but the seal."""
    from kdcache.cache.verify import seal_verified

    click.echo(f"{store}: sealed ({seal_verified(store)} files listed in its manifest)")


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


@command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
@sample_options
@json_option
def plot(paths: tuple[str, ...], out: str, sample: int, seed: int, split: str, teachers: tuple[str, ...],
         as_json: bool) -> None:
    """A figure of one STORE's `stats` (top-k mass, entropy by position, teacher agreement), of the dev
    cross-entropy learning curves of one or more training run directories (each holding a metrics.jsonl), or of the
    learning curves by words seen of one or more runs (runs/<name>, or the curves.json `kdcache eval` wrote there)."""
    if not Path(out).parent.is_dir():
        raise click.ClickException(f"{out}: directory {Path(out).parent} does not exist")
    if Path(out).suffix.lower() not in FIGURE_SUFFIXES:
        raise click.ClickException(f"{out}: a figure is written as {', '.join(FIGURE_SUFFIXES)}")
    curve_files = [curves_file(Path(p)) for p in paths]
    if all(curve_files):
        emit(as_json, plot_word_curves_of(curve_files, Path(out)), lambda d: f"wrote {d['out']} ({len(d['runs'])} runs)")
        return
    runs = [Path(p) for p in paths if (Path(p) / METRICS_FILE).is_file()]
    if runs:
        emit(as_json, plot_run_curves(paths, Path(out)), lambda d: f"wrote {d['out']} ({len(d['runs'])} runs)")
        return
    if len(paths) > 1:
        raise click.ClickException(f"{', '.join(paths)}: give one store, or run directories that hold metrics.jsonl")
    store = paths[0]
    document = sampled_stats(store, sample, seed, split, teachers)
    st.plot_stats(document, Path(out))
    summary = {"store": store, "out": out, "split": split, "num_sequences": document["num_sequences"]}
    emit(as_json, summary, lambda d: f"wrote {d['out']} ({d['num_sequences']} sampled {d['split']} sequences)")


def plot_run_curves(paths: tuple[str, ...], out: Path) -> dict:
    """The dev CE curves of run directories on one figure, one line per directory."""
    from kdcache.study.figure import plot_curves, read_metrics

    curves = {}
    for path in paths:
        curve = [(r["step"], r["dev_ce"]) for r in read_metrics(Path(path)) if "dev_ce" in r]
        if not curve:
            raise click.ClickException(f"{path}/metrics.jsonl: no dev_ce records (set student_train.eval_every)")
        curves[path] = [curve]
    plot_curves(curves, out, "dev cross-entropy while training")
    return {"out": str(out), "runs": list(paths)}


def curves_file(path: Path) -> Path | None:
    """The curves.json `kdcache eval` wrote: `path` itself, or runs/<name>/eval/curves.json for a run directory."""
    for candidate in (path, path / "eval" / "curves.json"):
        if candidate.is_file() and candidate.name == "curves.json":
            return candidate
    return None


def plot_word_curves_of(files: list[Path], out: Path) -> dict:
    """Several runs' learning curves by words seen on one figure, one line per run and model."""
    from kdcache.study.figure import plot_word_curves

    curves = {}
    for path in files:
        try:
            document = json.loads(path.read_text())
            curves |= {f"{document['name']}/{model}": points for model, points in document["curves"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise click.ClickException(f"{path}: not a curves.json of `kdcache eval` ({e.__class__.__name__}: {e})")
    plot_word_curves(curves, out, "learning curves by words seen")
    return {"out": str(out), "runs": [str(p) for p in files]}


@command("upgrade")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
def upgrade(store: str) -> None:
    """Upgrade a local store of format 2 to the current format in place (no teacher is run), and add the words per
    sequence a store of an older kdcache lacks (from the cleaned text and tokenizer `kdcache data` left beside it)."""
    from kdcache.precompute.words import upgrade_word_counts  # tokenizers, no torch

    report = upgrade_store(store)
    if report.from_version == FORMAT_VERSION:
        click.echo(f"{store}: already format {FORMAT_VERSION}")
    else:
        click.echo(f"{store}: format {report.from_version} -> {FORMAT_VERSION}; {report.arrays} topk_ids arrays "
                   f"re-encoded, {report.bytes_before / 1e6:,.1f} -> {report.bytes_after / 1e6:,.1f} MB, "
                   f"in {report.seconds:.1f} s")
    click.echo(upgrade_word_counts(store))


COMMANDS = [inspect, show, stats, verify, seal, plot, upgrade]
