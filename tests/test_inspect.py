"""`kdcache inspect | show | stats | verify | plot` on a small store built from dense teacher logits kept here,
so every probability the commands print can be checked against a dense softmax."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdcache.cache import FORMAT_VERSION
from kdcache.cli import main
from kdcache.cache.manifest import MANIFEST, seal_store, unsealed
from kdcache.cache.schema import CodecSettings
from kdcache.cache.schema import (
    create_store,
    create_teacher_split,
    mark_shard_complete,
    num_shards,
    teacher_array_specs,
    tokenizer_sha256,
    write_tokens,
)

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, PER_SHARD, K, TEMPERATURES = 16, 4, 8, [1.0, 2.0]
SPLIT_SIZES = {"train": 10, "dev": 3}
LINES = [
    "the cat sat on the mat and the dog sat on the log",
    "a small bird sang in the tall tree near the old house",
    "children like to read stories about cats and dogs and birds",
    "the old man walked his dog to the park every morning",
] * 8


@dataclass
class Built:
    store: Path
    tokenizer: Tokenizer
    tokens: dict[str, np.ndarray]  # split -> [N, L]
    dense: dict[str, dict[str, np.ndarray]]  # teacher -> split -> [N, L, V] float32 (float16-exact) logits
    incomplete: tuple[str, str, int]  # (teacher, split, shard) left unmarked


def train_tokenizer(out_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(LINES, trainer)
    out_dir.mkdir(parents=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return tokenizer


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def fill_teacher(group: zarr.Group, dense: np.ndarray, samples: int, hidden: dict[int, int],
                 rng: np.random.Generator) -> None:
    """Write the cached arrays of one teacher split from its dense logits, as the precompute writer does."""
    order = np.argsort(-dense, axis=-1, kind="stable")[..., :K]
    group["topk_ids"][...] = order
    group["topk_logits"][...] = np.take_along_axis(dense, order, -1).astype(np.float16)
    lse = [np.log(np.exp(dense.astype(np.float64) / t).sum(-1)) for t in TEMPERATURES]
    group["lse"][...] = np.stack(lse, -1).astype(np.float32)
    if samples:
        probs = softmax(dense, 2.0).reshape(-1, dense.shape[-1])
        ids = np.zeros((probs.shape[0], samples), np.int64)
        counts = np.zeros_like(ids)
        for row, p in enumerate(probs):
            drawn, n = np.unique(rng.choice(p.size, samples, p=p), return_counts=True)
            first = np.argsort(-n, kind="stable")
            ids[row, : drawn.size], counts[row, : drawn.size] = drawn[first], n[first]
        group["sample_ids"][...] = ids.reshape(*dense.shape[:2], samples)
        group["sample_counts"][...] = counts.reshape(*dense.shape[:2], samples)
    for layer, size in hidden.items():
        group[f"hidden_{layer}"][...] = rng.standard_normal((*dense.shape[:2], size)).astype(np.float16)


def build_store(run_dir: Path) -> Built:
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer(run_dir / "tokenizer")
    vocab = tokenizer.get_vocab_size()
    codec = CodecSettings()
    store = run_dir / "cache.zarr"
    root = create_store(str(store), {"seq_len": SEQ_LEN, "vocab_size": vocab, "special_ids": {"pad": 0, "bos": 1, "eos": 2},
                                     "tokenizer_sha256": tokenizer_sha256(run_dir / "tokenizer")})
    stream = np.concatenate([tokenizer.encode(line).ids + [2] for line in LINES * 2])
    tokens, start = {}, 0
    for split, n in SPLIT_SIZES.items():
        tokens[split] = stream[start : start + n * SEQ_LEN].reshape(n, SEQ_LEN)
        start += n * SEQ_LEN
        write_tokens(root, split, tokens[split], PER_SHARD, codec, vocab)
    dense = {t: {s: (3 * rng.standard_normal((n, SEQ_LEN, vocab))).astype(np.float16).astype(np.float32)
                 for s, n in SPLIT_SIZES.items()} for t in ("alpha", "beta")}
    dense["ensemble"] = {s: ((dense["alpha"][s] + dense["beta"][s]) / 2).astype(np.float16).astype(np.float32)
                         for s in SPLIT_SIZES}
    setups = {  # teacher -> (modes, samples, hidden layer sizes, extra attrs)
        "alpha": (["topk", "sampled", "hidden"], 4, {1: 8}, {}),
        "beta": (["topk"], 0, {}, {}),
        "ensemble": (["topk", "ensemble"], 0, {}, {"ensemble_of": ["alpha", "beta"]}),
    }
    incomplete = ("beta", "train", 2)
    for teacher, (modes, samples, hidden, extra) in setups.items():
        attrs = {"source": f"test/{teacher}", "arch": "llama", "k": K, "temperatures": TEMPERATURES,
                 "hidden_layers": list(hidden), "hidden_dtype": "float16", "samples": samples, "sample_temperature": 2.0,
                 "modes": modes, "tokenizer_sha256": root.attrs["tokenizer_sha256"], **extra}
        specs = teacher_array_specs(K, vocab, len(TEMPERATURES), samples, hidden, "float16")
        for split, n in SPLIT_SIZES.items():
            group = create_teacher_split(root, teacher, split, specs, attrs, PER_SHARD, codec)
            fill_teacher(group, dense[teacher][split], samples, hidden, rng)
            for shard in range(num_shards(n, PER_SHARD)):
                if (teacher, split, shard) != incomplete:
                    mark_shard_complete(group, shard)
    return Built(store, tokenizer, tokens, dense, incomplete)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_store(tmp_path_factory.mktemp("run"))


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def run_json(*args: str) -> dict:
    code, out = run(*args, "--json")
    assert code == 0, out
    return json.loads(out)


def subprocess_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from kdcache.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """What `show` prints for one token: its text, or its vocabulary entry when it is part of a UTF-8 character."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    return tokenizer.id_to_token(int(token_id)) if "\ufffd" in text else text


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_json_summary(built):
    s = run_json("inspect", built.store)
    assert s["format_version"] == FORMAT_VERSION and s["seq_len"] == SEQ_LEN
    assert s["vocab_size"] == built.tokenizer.get_vocab_size()
    assert s["tokenizer_sha256"] == tokenizer_sha256(built.store.parent / "tokenizer")
    assert {k: v["num_sequences"] for k, v in s["splits"].items()} == SPLIT_SIZES
    assert set(s["teachers"]) == {"alpha", "beta", "ensemble"}
    alpha, beta, ens = s["teachers"]["alpha"], s["teachers"]["beta"], s["teachers"]["ensemble"]
    assert (alpha["k"], alpha["temperatures"], alpha["hidden_layers"]) == (K, TEMPERATURES, [1])
    assert alpha["modes"] == ["topk", "sampled", "hidden"]
    assert ens["modes"] == ["topk", "ensemble"] and ens["ensemble_of"] == ["alpha", "beta"]
    assert alpha["source"] == "test/alpha" and alpha["hidden_dtype"] == "float16"
    assert alpha["complete"] and ens["complete"] and not beta["complete"]
    assert beta["shards"] == {"dev": {"complete": 1, "total": 1}, "train": {"complete": 2, "total": 3}}
    # bytes on disk: every file under the teacher's split arrays, as du would count them
    teacher_dir = built.store / "teachers" / "alpha"
    group_meta = sum((teacher_dir / split / "zarr.json").stat().st_size for split in SPLIT_SIZES)
    assert alpha["bytes_on_disk"] == sum(file_bytes(teacher_dir / split) for split in SPLIT_SIZES) - group_meta
    positions = sum(SPLIT_SIZES.values()) * SEQ_LEN
    assert alpha["bytes_per_position"] == pytest.approx(alpha["bytes_on_disk"] / positions)
    logits = alpha["arrays"]["train/topk_logits"]
    assert logits["shape"] == [SPLIT_SIZES["train"], SEQ_LEN, K] and logits["dtype"] == "float16"
    assert logits["raw_bytes"] == SPLIT_SIZES["train"] * SEQ_LEN * K * 2
    on_disk = file_bytes(teacher_dir / "train" / "topk_logits")
    assert logits["bytes_on_disk"] == on_disk and logits["compression_ratio"] == pytest.approx(logits["raw_bytes"] / on_disk)
    assert "train/hidden_1" in alpha["arrays"] and "train/sample_counts" in alpha["arrays"]
    assert logits["codecs"] == "kdcache.sorted_key_delta, blosc lz4hc5 bitshuffle, crc32c"
    assert alpha["arrays"]["train/topk_ids"]["codecs"] == "kdcache.vocab_rank, blosc lz4hc5 bitshuffle, crc32c"
    assert alpha["arrays"]["train/lse"]["codecs"] == "blosc lz4hc5 bitshuffle, crc32c"
    assert alpha["arrays"]["train/sample_ids"]["codecs"] == "blosc lz4hc5 shuffle, crc32c"
    assert alpha["arrays"]["train/hidden_1"]["codecs"] == "crc32c"


def test_inspect_human_tables(built):
    code, out = run("inspect", built.store)
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("teacher "))
    rows = [line for line in lines if line.split()[:1] in (["alpha"], ["beta"], ["ensemble"])]
    assert len(rows) == 3
    # aligned: the k column (right-aligned) ends at the same offset in the header and every row
    end = header.index(" k ") + 2
    assert all(row[end - 1] == "8" and row[end] == " " for row in rows)
    assert "train 2/3" in out and "B/position" in out and "ratio" in out


def test_inspect_never_imports_torch_or_matplotlib():
    code = "import sys, kdcache.cli, kdcache.cache.inspect; assert not {'torch', 'matplotlib'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def test_the_store_package_never_imports_click():
    modules = ", ".join(f"kdcache.cache.{m.stem}" for m in sorted((REPO / "cache").glob("*.py")) if m.stem != "__init__")
    code = f"import sys, {modules}; assert 'click' not in sys.modules, 'click imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def test_inspect_subprocess(built):
    proc = subprocess_cli("inspect", built.store, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["splits"]["train"]["num_sequences"] == SPLIT_SIZES["train"]


# ---------------------------------------------------------------------------------------------------------------
# show


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_show_probabilities_match_dense_softmax(built, temperature):
    seq, pos = 5, 6
    d = run_json("show", built.store, "--seq", seq, "--pos", pos, "-T", temperature, "--top", 5)
    row = built.tokens["train"][seq]
    assert d["context"] == built.tokenizer.decode(row[: pos + 1].tolist(), skip_special_tokens=False)
    assert d["next_token"] == token_text(built.tokenizer, row[pos + 1])
    assert list(d["teachers"]) == ["alpha", "beta", "ensemble"]
    for name, t in d["teachers"].items():
        p = softmax(built.dense[name]["train"][seq, pos], temperature)
        top = np.argsort(-p)[:K]
        assert t["ids"] == top[:5].tolist()
        assert t["tokens"] == [token_text(built.tokenizer, i) for i in top[:5]]
        np.testing.assert_allclose(t["probs"], p[top[:5]], rtol=1e-5, atol=1e-7)
        assert t["tail_mass"] == pytest.approx(1 - p[top].sum(), abs=1e-6)
        assert t["exact"] is True


def test_show_uncached_temperature_is_renormalised(built):
    d = run_json("show", built.store, "--seq", 1, "--pos", 3, "-T", 3.0, "--teacher", "beta", "--top", K)
    t = d["teachers"]["beta"]
    logits = built.dense["beta"]["train"][1, 3]
    top = np.argsort(-logits)[:K]
    np.testing.assert_allclose(t["probs"], softmax(logits[top], 3.0), rtol=1e-5)
    assert t["exact"] is False and t["tail_mass"] is None
    code, out = run("show", built.store, "--seq", 1, "--pos", 3, "-T", 3.0, "--teacher", "beta")
    assert code == 0 and "renormalised" in out and "not cached" in out


def test_show_human_side_by_side(built):
    code, out = run("show", built.store, "--seq", 0, "--pos", 4, "--teacher", "beta", "--teacher", "alpha",
                    "-T", 2, "--top", 3)
    assert code == 0, out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert header.index("beta") < header.index("alpha")  # requested order, side by side
    ranks = [line for line in lines if line[:1].isdigit()]
    assert [line.split()[0] for line in ranks] == ["1", "2", "3"]
    assert any(line.startswith("tail") for line in lines)
    assert repr(token_text(built.tokenizer, built.tokens["train"][0, 5])) in out


def test_show_last_position_next_token_is_next_sequence(built):
    d = run_json("show", built.store, "--seq", 2, "--teacher", "alpha")  # default --pos: the last position
    assert d["pos"] == SEQ_LEN - 1 and d["next_token_id"] == int(built.tokens["train"][3, 0])
    last = run_json("show", built.store, "--seq", SPLIT_SIZES["dev"] - 1, "--split", "dev", "--teacher", "alpha")
    assert last["next_token_id"] is None and last["next_token"] is None


def test_show_without_tokenizer_prints_ids(built, tmp_path):
    bare = tmp_path / "cache.zarr"
    shutil.copytree(built.store, bare)
    d = run_json("show", bare, "--seq", 0, "--pos", 2, "--teacher", "alpha", "--top", 2)
    assert d["context"] == " ".join(f"#{i}" for i in built.tokens["train"][0, :3])
    assert d["teachers"]["alpha"]["tokens"] == [f"#{i}" for i in d["teachers"]["alpha"]["ids"]]
    decoded = run_json("show", bare, "--seq", 0, "--pos", 2, "--tokenizer", built.store.parent / "tokenizer")
    assert decoded["context"] == built.tokenizer.decode(built.tokens["train"][0, :3].tolist())


def test_show_warns_and_prints_ids_beside_another_tokenizer(built, tmp_path):
    store = tmp_path / "cache.zarr"
    shutil.copytree(built.store, store)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")  # not the store's tokenizer: ids instead
    result = CliRunner().invoke(main, ["show", str(store), "--seq", "0", "--pos", "2", "--teacher", "alpha", "--json"])
    assert result.exit_code == 0, result.output
    warning = f"warning: {tmp_path / 'tokenizer' / 'tokenizer.json'}: not the store's tokenizer"
    assert result.stderr.startswith(warning) and result.stderr.rstrip().endswith("; showing token ids")
    assert json.loads(result.stdout)["context"] == " ".join(f"#{i}" for i in built.tokens["train"][0, :3])


# ---------------------------------------------------------------------------------------------------------------
# stats and plot


def jsd_shared_reference(a_ids, a_p, b_ids, b_p) -> float | None:
    shared = sorted(set(a_ids) & set(b_ids))
    if not shared:
        return None
    pa = np.array([a_p[list(a_ids).index(i)] for i in shared])
    pb = np.array([b_p[list(b_ids).index(i)] for i in shared])
    pa, pb = pa / pa.sum(), pb / pb.sum()
    m = (pa + pb) / 2
    return 0.5 * float(np.sum(pa * np.log(pa / m)) + np.sum(pb * np.log(pb / m)))


def test_stats_match_dense_computation(built):
    s = run_json("stats", built.store, "--sample", 1000, "--seed", 3)
    unfinished = built.incomplete[2]  # beta's train shard 2: stats sample only sequences every teacher finished
    complete = [i for i in range(SPLIT_SIZES["train"]) if i // PER_SHARD != unfinished]
    assert s["num_sequences"] == len(complete) and s["positions"] == len(complete) * SEQ_LEN
    for name in ("alpha", "beta"):
        dense = built.dense[name]["train"][complete]
        for temperature in TEMPERATURES:
            p = softmax(dense, temperature)
            top = np.sort(p, -1)[..., ::-1][..., :K]
            mass = top.sum(-1)
            tail = 1 - mass
            h = -(top * np.log(top)).sum(-1) - tail * np.log(tail)
            got = s["teachers"][name][str(temperature)]
            assert got["topk_mass"]["mean"] == pytest.approx(mass.mean(), abs=1e-5)
            assert got["entropy"]["mean"] == pytest.approx(h.mean(), abs=1e-4)
            np.testing.assert_allclose(got["entropy_by_position"], h.mean(0), atol=1e-4)
            assert sum(got["topk_mass"]["histogram"]["counts"]) == mass.size
    pairs = {tuple(a["teachers"]): a for a in s["agreement"]}
    assert set(pairs) == set(combinations(["alpha", "beta", "ensemble"], 2))
    a, b = built.dense["alpha"]["train"][complete], built.dense["beta"]["train"][complete]
    assert pairs["alpha", "beta"]["top1_match"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())
    pa, pb = softmax(a, 2.0), softmax(b, 2.0)
    ia, ib = np.argsort(-pa, -1)[..., :K], np.argsort(-pb, -1)[..., :K]
    ref = [jsd_shared_reference(ia[n, j], pa[n, j][ia[n, j]], ib[n, j], pb[n, j][ib[n, j]])
           for n in range(len(complete)) for j in range(SEQ_LEN)]
    ref = [r for r in ref if r is not None]
    assert pairs["alpha", "beta"]["jsd"]["2.0"]["mean"] == pytest.approx(np.mean(ref), rel=1e-4)


def test_stats_sample_is_seeded_and_human_tables(built):
    one = run_json("stats", built.store, "--sample", 3, "--seed", 7, "--teacher", "alpha")
    assert one == run_json("stats", built.store, "--sample", 3, "--seed", 7, "--teacher", "alpha")
    assert one["num_sequences"] == 3 and one["agreement"] == []
    code, out = run("stats", built.store, "--sample", 4)
    assert code == 0, out
    assert "top-k mass" in out and "top-1 match" in out and "by position" in out
    assert any(line.startswith("alpha vs beta") for line in out.splitlines())


def test_plot_writes_png(built, tmp_path):
    out = tmp_path / "stats.png"
    d = run_json("plot", built.store, "--out", out, "--sample", 5)
    assert d["out"] == str(out) and d["num_sequences"] == 5
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.png"]  # no temporary file left behind


def test_stats_and_plot_subprocess(built, tmp_path):
    proc = subprocess_cli("stats", built.store, "--sample", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_sequences"] == 2
    proc = subprocess_cli("plot", built.store, "--out", tmp_path / "f.png", "--sample", 2)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# verify


@pytest.fixture
def sound_copy(built, tmp_path) -> Path:
    """A copy of the store with its one unfinished shard marked complete."""
    store = tmp_path / "cache.zarr"
    shutil.copytree(built.store, store)
    teacher, split, shard = built.incomplete
    mark_shard_complete(zarr.open_group(str(store), mode="r+")[f"teachers/{teacher}/{split}"], shard)
    seal_store(store)
    return store


def test_verify_passes_a_sound_store(sound_copy):
    assert run_json("verify", sound_copy) == {"store": str(sound_copy), "ok": True, "problems": []}
    proc = subprocess_cli("verify", sound_copy)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_verify_fails_on_planted_corruption(sound_copy):
    (sound_copy / MANIFEST).unlink()  # the checks that hold without a manifest, which names every changed file
    root = zarr.open_group(str(sound_copy), mode="r+")
    logits = root["teachers/alpha/train/topk_logits"]
    shard = logits[:PER_SHARD]
    shard[1, 2, 3] = np.nan
    logits[:PER_SHARD] = shard  # a whole-shard write, as the writer does
    root["teachers/beta/dev/complete"][0] = 0
    index_file = sound_copy / "teachers/ensemble/train/lse/c/1/0/0"
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index (at the end of the file): its crc32c no longer matches
    index_file.write_bytes(bytes(data))

    code, out = run("verify", sound_copy)
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0] == unsealed(str(sound_copy)), out  # one line per planted problem
    assert any("alpha" in line and "topk_logits" in line for line in lines)
    assert any("beta" in line and "dev" in line for line in lines)
    assert any("ensemble" in line and "lse" in line for line in lines)
    code, out = run("verify", sound_copy, "--json")
    assert code == 1 and json.loads(out) == {"store": str(sound_copy), "ok": False, "problems": lines}
    proc = subprocess_cli("verify", sound_copy)
    assert proc.returncode == 1 and proc.stdout.strip().splitlines() == lines and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback


@pytest.fixture(scope="module")
def other_version(built, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("v99") / "cache.zarr"
    shutil.copytree(built.store, store)
    zarr.open_group(str(store), mode="r+").attrs["format_version"] = 99
    return store


def error_cases(built: Built, other_version: Path, empty_dir: Path) -> list[tuple[list, str]]:
    store = built.store
    return [
        (["inspect", empty_dir], "not a kdcache store"),
        (["inspect", empty_dir / "missing.zarr"], "not a kdcache store"),
        (["show", empty_dir, "--seq", 0], "not a kdcache store"),
        (["stats", empty_dir], "not a kdcache store"),
        (["verify", empty_dir], "not a kdcache store"),
        (["inspect", other_version], "format version 99"),
        (["show", store, "--seq", SPLIT_SIZES["train"]], f"--seq {SPLIT_SIZES['train']} is out of range"),
        (["show", store, "--seq", -1], "--seq -1 is out of range"),
        (["show", store, "--seq", 0, "--pos", SEQ_LEN], f"--pos {SEQ_LEN} is out of range"),
        (["show", store, "--seq", 0, "--teacher", "gamma"], "unknown teacher 'gamma'"),
        (["stats", store, "--teacher", "gamma"], "unknown teacher 'gamma'"),
        (["plot", store, "--out", empty_dir / "f.png", "--teacher", "gamma"], "unknown teacher 'gamma'"),
        (["show", store, "--seq", 0, "--split", "test"], "no split 'test'"),
        (["show", store, "--seq", 9, "--teacher", "beta"], "has not finished the shard"),
        (["show", store, "--seq", 0, "--tokenizer", empty_dir], "no tokenizer.json"),
        (["show", store, "--seq", 0, "-T", 0], "must both be positive"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_errors_are_one_line(built, other_version, tmp_path, case):
    args, message = error_cases(built, other_version, tmp_path)[case]
    code, out = run(*args)
    assert code != 0
    assert message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("case", [0, 5, 6, 9])
def test_errors_in_a_subprocess(built, other_version, tmp_path, case):
    args, message = error_cases(built, other_version, tmp_path)[case]
    proc = subprocess_cli(*args)
    assert proc.returncode == 2
    assert proc.stdout == "" and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
