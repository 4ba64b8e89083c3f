"""Corruption: one flipped byte in any file of the store, a truncated, deleted or foreign shard. `kdcache verify`
names the file and exits 1; `kdcache distill` refuses at start, or at the first read of the file, with the same
line; `kdcache show` on the damaged position says so in one line. No traceback anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import yaml

from faultlib import Run, invoke
from kdcache.cache.manifest import MANIFEST

Damage = Callable[[Path], Path]  # damages a store in place; returns the file it damaged


def flip(path: Path, at: int, bits: int = 0x01) -> Path:
    """XOR one byte of `path` (`at` < 0 counts from the end): a single-bit flip keeps most JSON valid."""
    data = bytearray(path.read_bytes())
    data[at] ^= bits
    path.write_bytes(bytes(data))
    return path


def flip_after(path: Path, marker: bytes, offset: int) -> Path:
    """Flip the byte `offset` bytes after `marker`: a digit or a letter that leaves valid JSON zarr accepts."""
    return flip(path, path.read_bytes().index(marker) + len(marker) + offset)


def flip_chunk(path: Path, chunk: int, per_shard: int = 64) -> Path:
    """Flip the middle byte of inner chunk `chunk` (sequence 64 * shard + chunk), found in the shard index."""
    index = path.read_bytes()[-(per_shard * 16 + 4):-4]
    offset, nbytes = (int.from_bytes(index[16 * chunk + 8 * i:16 * chunk + 8 * i + 8], "little") for i in (0, 1))
    return flip(path, offset + nbytes // 2)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def delete(path: Path) -> Path:
    path.unlink()
    return path


def foreign(path: Path, source: Path) -> Path:
    """Replace a shard with one of the same shape and codecs but other content: every checksum in it is valid."""
    shutil.copyfile(source, path)
    return path


SHARD = "c/3/0/0"  # a full shard of each teacher array (22 train shards of 64 sequences): sequences 192-255
T = "teachers"
DAMAGES: dict[str, Damage] = {
    "root zarr.json, a digit of `created`": lambda s: flip_after(s / "zarr.json", b'"created": "20', 1),
    "array zarr.json, Blosc clevel 5 -> 4": lambda s: flip_after(s / T / "tl/train/topk_logits/zarr.json", b'"clevel": ', 0),
    "group zarr.json, a letter of `source`": lambda s: flip_after(s / T / "tg/zarr.json", b'"source": "', 3),
    "split group zarr.json": lambda s: flip(s / T / "tl/train/zarr.json", 100),
    "token split zarr.json, `vocab_order`": lambda s: flip_after(s / "tokens/train/zarr.json", b'"vocab_order": "', 40),
    "complete record, 1 -> 0": lambda s: flip(s / T / "tg/train/complete/c/5", 0),
    "complete zarr.json": lambda s: flip(s / T / "tl/dev/complete/zarr.json", -3),
    "chunk data, compressed": lambda s: flip_chunk(s / T / f"tl/train/topk_logits/{SHARD}", 8),
    "chunk data, raw float16": lambda s: flip_chunk(s / T / f"tl/train/hidden_1/{SHARD}", 8),
    "chunk data, tokens": lambda s: flip_chunk(s / "tokens/train/c/3/0", 8),
    "first byte of a shard": lambda s: flip(s / T / f"tg/train/sample_ids/{SHARD}", 0),
    "shard index": lambda s: flip(s / T / f"tl/train/lse/{SHARD}", -10),
    "shard index checksum": lambda s: flip(s / T / f"ensemble/train/topk_ids/{SHARD}", -1),
    "truncated shard": lambda s: truncate(s / T / f"tl/train/topk_ids/{SHARD}"),
    "deleted shard": lambda s: delete(s / T / f"tg/train/topk_logits/{SHARD}"),
    "shard from elsewhere": lambda s: foreign(s / T / f"tl/train/lse/{SHARD}", s / T / f"tg/train/lse/{SHARD}"),
    "the manifest": lambda s: flip(s / MANIFEST, 500),
}


def store_copy(run: Run, tmp_path: Path) -> Path:
    store = tmp_path / "cache.zarr"
    shutil.copytree(run.store, store)
    return store


def no_traceback(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        "".join(traceback.format_exception(result.exception))
    assert "Traceback" not in result.output, result.output
    return result.output


def refused(result, *needles: str) -> str:
    """A user error: exit 2, one line `Error: ...` holding every needle (stdout and stderr interleave)."""
    no_traceback(result)
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert all(needle in line for needle in needles), result.output
    return line


def verify_names(store: Path, *files: Path) -> str:
    result = invoke("verify", store)
    output = no_traceback(result)
    assert result.exit_code == 1, output
    assert not [f for f in files if str(f) not in output], output
    return output


def test_the_demo_store_is_sealed(cached_run):
    assert (cached_run.store / MANIFEST).is_file()
    result = invoke("verify", cached_run.store)
    assert result.exit_code == 0 and result.output.strip() == f"{cached_run.store}: ok", result.output


@pytest.mark.parametrize("at", [0, "middle", -1])
def test_a_byte_flipped_in_every_file_is_named_by_verify(cached_run, tmp_path, at):
    """Every file of the demo store but the manifest (tested alone below), one byte each, all at once."""
    store = store_copy(cached_run, tmp_path)
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert len(files) > 400
    for path in files:
        flip(path, path.stat().st_size // 2 if at == "middle" else at, 0xFF)
    verify_names(store, *files)


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_verify_names_the_damaged_file(cached_run, tmp_path, damage):
    store = store_copy(cached_run, tmp_path)
    verify_names(store, damage(store))


def test_a_store_whose_manifest_was_deleted_is_never_ok(fresh_run, tmp_path):
    """Deleting kdcache.manifest does not switch the swap check off: verify says the store is unsealed (exit 1),
    distill refuses it unless distill.allow_unsealed, and `kdcache seal` reseals it only after verifying it."""
    store = fresh_run.store
    (store / MANIFEST).unlink()
    foreign(store / T / f"tl/train/lse/{SHARD}", store / T / f"tg/train/lse/{SHARD}")  # every checksum still valid
    output = verify_names(store, store / MANIFEST)
    assert output.strip() == f"{store}/{MANIFEST}: missing: the store is not sealed (its writer stopped before " \
        "sealing it, or the manifest was deleted), so shards swapped or replaced cannot be detected; rerun the " \
        f"writer (kdcache precompute), or run `kdcache seal {store}`, which verifies every chunk first", output
    refused(invoke("distill", *fresh_run.args()), f"{store}/{MANIFEST}: missing", "distill.allow_unsealed: true")
    flip_chunk(store / T / f"tl/train/topk_logits/{SHARD}", 8)
    refused(invoke("seal", store), f"{store}: not sealed: verify found 1 problems",
            f"{store / T / 'tl/train/topk_logits' / SHARD}: chunk 8 checksum mismatch")
    assert not (store / MANIFEST).exists()
    flip_chunk(store / T / f"tl/train/topk_logits/{SHARD}", 8)  # undone
    result = invoke("seal", store)
    assert result.exit_code == 0 and result.output.startswith(f"{store}: sealed ("), result.output
    assert invoke("verify", store).output.strip() == f"{store}: ok"


def test_verify_names_the_writer_of_an_unsealed_store(fresh_run):
    """While a writer holds the store (here: a lock recorded by another live process), verify says so."""
    store = fresh_run.store
    (store / MANIFEST).unlink()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        output = verify_names(store)
        assert output.strip().startswith(f"{store}: not sealed yet: being written by kdcache precompute (pid "), output
    finally:
        holder.kill()
        holder.wait()


LOCK_AND_WAIT = """
import sys, time
from kdcache.cache.lock import lock_store
lock = lock_store(sys.argv[1], "kdcache precompute")
print("locked", flush=True)
time.sleep(60)
"""


# distill: every shard of one array it reads is damaged, so that its first batch hits one, whatever it draws
def every_shard(array: str, damage: Callable[[Path], object]) -> Damage:
    def apply(store: Path) -> Path:
        for path in sorted((store / T / array / "c").rglob("*")):
            if path.is_file():
                damage(path)
        return store / T / array / "c"
    return apply


DISTILL = {
    "chunk data": (every_shard("tl/train/topk_logits", lambda p: flip_chunk(p, 0)), "chunk 0 checksum mismatch"),
    "shard index": (every_shard("tg/train/topk_ids", lambda p: flip(p, -10)), "index checksum mismatch"),
    "truncated shards": (every_shard("tl/train/hidden_2", truncate), "index checksum mismatch"),
    "deleted shards": (every_shard("tg/train/lse", delete), "shard file missing"),
    "shards from elsewhere": (every_shard("tl/train/lse", lambda p: foreign(
        p, Path(str(p).replace("/tl/", "/tg/")))), "differs from the store's manifest"),
    "a digit of an array's zarr.json": (DAMAGES["array zarr.json, Blosc clevel 5 -> 4"],
                                        "differs from the store's manifest"),
    "a letter of a teacher's attributes": (DAMAGES["group zarr.json, a letter of `source`"],
                                           "differs from the store's manifest"),
    "a complete record": (DAMAGES["complete record, 1 -> 0"], "differs from the store's manifest"),
}


@pytest.mark.parametrize("damage, why", DISTILL.values(), ids=DISTILL.keys())
def test_distill_refuses_a_damaged_store(fresh_run, damage, why):
    where = damage(fresh_run.store)
    refused(invoke("distill", *fresh_run.args()), str(where), why)
    assert not list((fresh_run.runs / "tiny" / "student").rglob("*.safetensors")), "a student was saved"


SHOW = {  # the damage, the sequence `show` is asked for (train shard 3 holds 192-255), the needle
    "chunk data": (DAMAGES["chunk data, compressed"], 200, "chunk 8 checksum mismatch"),
    "raw chunk data": (DAMAGES["chunk data, raw float16"], 200, "chunk 8 checksum mismatch"),
    "shard index": (DAMAGES["shard index"], 200, "index checksum mismatch"),
    "truncated shard": (DAMAGES["truncated shard"], 200, "index checksum mismatch"),
    "deleted shard": (DAMAGES["deleted shard"], 200, "shard file missing"),
    "shard from elsewhere": (DAMAGES["shard from elsewhere"], 200, "differs from the store's manifest"),
    "tokens": (DAMAGES["chunk data, tokens"], 200, "chunk 8 checksum mismatch"),
    # the last position of sequence 191 predicts the first token of 192 (the default --pos is the last)
    "the next sequence's tokens": (lambda s: flip_chunk(s / "tokens/train/c/3/0", 0), 191, "chunk 0 checksum mismatch"),
    "metadata": (DAMAGES["group zarr.json, a letter of `source`"], 0, "differs from the store's manifest"),
}


@pytest.mark.parametrize("damage, seq, why", SHOW.values(), ids=SHOW.keys())
def test_show_says_the_position_is_damaged(cached_run, tmp_path, damage, seq, why):
    store = store_copy(cached_run, tmp_path)
    where = damage(store)
    tokenizer = cached_run.store.parent / "tokenizer"
    refused(invoke("show", store, "--seq", seq, "--tokenizer", tokenizer), str(where), why)
    if why.startswith("chunk"):  # the chunk's checksum fails only the reads of that sequence
        assert invoke("show", store, "--seq", seq + 2, "--tokenizer", tokenizer).exit_code == 0


def test_distill_with_loader_workers_refuses_a_damaged_shard_on_one_line(fresh_run):
    """A DataLoader worker's error reaches the main process with the worker's traceback in its message: the
    line printed is still the original message alone."""
    cfg = yaml.safe_load(fresh_run.config.read_text())
    cfg["student_train"]["num_workers"] = 1
    fresh_run.config.write_text(yaml.safe_dump(cfg))
    damage, why = DISTILL["chunk data"]
    where = damage(fresh_run.store)
    line = refused(invoke("distill", *fresh_run.args()), str(where), why)
    assert "worker" not in line and "File " not in line, line


# stats and plot read the top-k arrays (not the hidden layers) of a sample of sequences
STATS = {name: case for name, case in DISTILL.items() if name != "truncated shards"}


@pytest.mark.parametrize("command", ["stats", "plot"])
@pytest.mark.parametrize("damage, why", STATS.values(), ids=STATS.keys())
def test_stats_and_plot_refuse_a_damaged_store_naming_the_file(cached_run, tmp_path, damage, why, command):
    store = store_copy(cached_run, tmp_path)
    where = damage(store)
    out = ["--out", str(tmp_path / "stats.png")] if command == "plot" else []
    refused(invoke(command, store, *out), str(where), why)
    assert not (tmp_path / "stats.png").exists()
