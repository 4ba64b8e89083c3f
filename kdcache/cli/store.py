"""The store's commands: `kdcache inspect | show | stats | verify | plot | upgrade` (no torch is imported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from kdcache.cli.command import command
from kdcache.cache import stats as st
from kdcache.cache import FORMAT_VERSION
from kdcache.cache.inspect import (
    check_split, check_teachers, decode, emit, inspect_text, load_tokenizer, show_text, stats_text, summarize,
    token_text,
)
from kdcache.cache.schema import TOKENS, StoreError, open_store
from kdcache.cache.upgrade import upgrade_store

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")


def sample_options(command: Callable) -> Callable:
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


def soft_target_entry(targets: st.Targets, temperature: float, top: int, tokenizer: Any) -> dict:
    p, tail = st.soft_targets(targets, temperature)
    ids = targets.ids[:top]
    return {
        "k": targets.ids.shape[-1],
        "temperatures": targets.temperatures,
        "exact": tail is not None,
        "ids": ids.tolist(),
        "tokens": [token_text(tokenizer, i) for i in ids],
        "probs": p[:top].tolist(),
        "topk_mass": float(p.sum()),
        "tail_mass": None if tail is None else float(tail),
    }


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
    tokenizer = load_tokenizer(store, tokenizer_dir, root.attrs.get("tokenizer_sha256"))
    row = tokens[seq]
    # position L-1 predicts the first token of the next sequence: sequences are consecutive cuts of one stream
    next_id = int(row[pos + 1]) if pos + 1 < length else (int(tokens[seq + 1, 0]) if seq + 1 < n else None)
    document = {
        "store": store, "split": split, "seq": seq, "pos": pos, "temperature": temperature,
        "context": decode(tokenizer, row[: pos + 1]),
        "context_ids": row[: pos + 1].tolist(),
        "next_token": None if next_id is None else token_text(tokenizer, next_id),
        "next_token_id": next_id,
        "teachers": {
            name: soft_target_entry(st.read_targets(root, name, split, seq).position(pos), temperature, top, tokenizer)
            for name in names
        },
    }
    emit(as_json, document, show_text)


@command()
@click.argument("store")
@sample_options
@json_option
def stats(store: str, sample: int, seed: int, split: str, teachers: tuple[str, ...], as_json: bool) -> None:
    """Top-k mass, entropy and teacher agreement by position over a seeded sample of STORE's sequences."""
    emit(as_json, sampled_stats(store, sample, seed, split, teachers), stats_text)


def sampled_stats(store: str, sample: int, seed: int, split: str, teachers: tuple[str, ...]) -> dict:
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
    """Check every shard of STORE: index checksums, shapes, completeness, NaN/inf, attributes. Exit 1 on any problem."""
    from kdcache.cache.verify import verify_store  # the checks decode every chunk: only load them when asked

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
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
@sample_options
@json_option
def plot(store: str, out: str, sample: int, seed: int, split: str, teachers: tuple[str, ...], as_json: bool) -> None:
    """The `stats` of STORE as a figure: top-k mass histogram, entropy by position, teacher agreement."""
    document = sampled_stats(store, sample, seed, split, teachers)
    if not Path(out).parent.is_dir():
        raise click.ClickException(f"{out}: directory {Path(out).parent} does not exist")
    st.plot_stats(document, Path(out))
    summary = {"store": store, "out": out, "split": split, "num_sequences": document["num_sequences"]}
    emit(as_json, summary, lambda d: f"wrote {d['out']} ({d['num_sequences']} sampled {d['split']} sequences)")


@command("upgrade")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
def upgrade(store: str) -> None:
    """Upgrade a local store of format 2 to the current format in place (no teacher is run)."""
    report = upgrade_store(store)
    if report.from_version == FORMAT_VERSION:
        click.echo(f"{store}: already format {FORMAT_VERSION}")
        return
    click.echo(f"{store}: format {report.from_version} -> {FORMAT_VERSION}; {report.arrays} topk_ids arrays "
               f"re-encoded, {report.bytes_before / 1e6:,.1f} -> {report.bytes_after / 1e6:,.1f} MB, "
               f"in {report.seconds:.1f} s")


COMMANDS = [inspect, show, stats, verify, plot, upgrade]
