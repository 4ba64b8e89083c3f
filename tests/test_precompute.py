"""Teacher-target precompute: the cached targets against the dense teachers, resume and multi-rank byte
identity, and refusal of mismatched teachers and changed settings. Tiny random teachers, a tiny tokenizer."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

import kdcache.precompute.writer
from kdcache.cache.schema import CodecSettings
from kdcache.config import (
    CacheConfig, Config, DataConfig, ModelConfig, TeacherConfig, TokenizerConfig, run_paths,
)
from kdcache.cache.reader import ShardedArrayReader
from kdcache.cache.schema import (
    COMPLETE, StoreError, completed_shards, create_store, open_store, read_tokens, tokenizer_sha256, write_tokens,
)
from kdcache.precompute.run import precompute_targets
from kdcache.precompute.targets import logsumexps, logsumexps_by_rows, sample_counts

REPO = Path(__file__).resolve().parents[1]
SEQ, PER_SHARD = 16, 4
SPLIT_SIZES = {"train": 10, "dev": 6}  # 3 shards (the last one short) and 2
WORDS = "the a cat dog sees likes runs small big red blue bird house tree near under over with and".split()


def make_tokenizer(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def save_teacher(path: Path, arch: str, vocab: int, tokdir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=SEQ, initializer_range=0.2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
                                           bos_token_id=1, eos_token_id=2, initializer_range=0.2))
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(tokdir).save_pretrained(path)
    return path


def make_store(path: Path, vocab: int, tokdir: Path) -> str:
    root = create_store(str(path), {"seq_len": SEQ, "vocab_size": vocab, "tokenizer_sha256": tokenizer_sha256(tokdir)})
    rng = np.random.default_rng(0)
    for split, n in SPLIT_SIZES.items():
        write_tokens(root, split, rng.integers(3, vocab, (n, SEQ)), PER_SHARD, CodecSettings(), vocab)
    return str(path)


@dataclasses.dataclass
class World:
    tmp: Path
    runs: Path
    cfg: Config
    tokdir: Path
    vocab: int
    full: str  # store made in one uninterrupted run with cfg

    def store(self, name: str) -> str:
        return make_store(self.tmp / name, self.vocab, self.tokdir)

    def teacher(self, name: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(run_paths(self.cfg, self.runs).teacher(name) / "model",
                                                    dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("precompute")
    tokdir = make_tokenizer(tmp / "tokenizer", seed=0)
    vocab = len(PreTrainedTokenizerFast.from_pretrained(tokdir))
    cfg = Config(
        name="t",
        seed=7,
        tokenizer=TokenizerConfig(vocab_size=vocab),
        data=DataConfig(seq_len=SEQ, sequences_per_shard=PER_SHARD),
        teachers=[TeacherConfig("llama", ModelConfig(max_position=SEQ)),
                  TeacherConfig("gpt2", ModelConfig(arch="gpt2", max_position=SEQ))],
        # batch 3 in shards of 4: a short batch inside every shard
        cache=CacheConfig(k=8, temperatures=[1.0, 2.0], hidden_layers={"llama": [0, 2]}, samples=16,
                          sample_temperature=2.0, ensemble=True, batch_size=3),
    )
    runs = tmp / "runs"
    for i, (name, arch) in enumerate([("llama", "llama"), ("gpt2", "gpt2")]):
        save_teacher(run_paths(cfg, runs).teacher(name) / "model", arch, vocab, tokdir, seed=i)
    w = World(tmp, runs, cfg, tokdir, vocab, "")
    w.full = w.store("full.zarr")
    stats = precompute_targets(cfg, runs, store=w.full, device="cpu")
    assert (stats.shards_written, stats.positions) == (5, sum(SPLIT_SIZES.values()) * SEQ)
    assert stats.tokens_per_s > 0
    return w


def dense(model: torch.nn.Module, tokens: np.ndarray, hidden: bool = False):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64)), output_hidden_states=hidden)


def arrays(store: str, group: str) -> dict[str, torch.Tensor]:
    g = open_store(store)[group]
    return {name: torch.from_numpy(g[name][...].astype(np.float32 if g[name].dtype.kind == "f" else np.int64))
            for name in g.array_keys()}


def tree(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_logsumexps_by_rows_equal_the_dense_formula():
    logits = torch.randn(3, 50, 37, generator=torch.Generator().manual_seed(0)) * 4  # 150 rows: 9 full chunks + 6
    logits[0, 0, :2] = logits[0, 0].max() + 1  # a tied maximum
    temperatures = [1.0, 2.0, 0.5]
    by_rows = logsumexps_by_rows(logits, temperatures, logits.argmax(-1), rows=16)
    assert by_rows.shape == (3, 50, 3)
    exact = torch.stack([torch.logsumexp(logits.double() / t, -1) for t in temperatures], -1)
    assert torch.allclose(by_rows.double(), exact, rtol=0, atol=1e-5)
    assert torch.allclose(by_rows, logsumexps(logits, temperatures), atol=1e-5)


@pytest.mark.parametrize("teacher", ["llama", "gpt2"])
def test_topk_probabilities_and_tail_mass_match_dense_teacher(world, teacher):
    model = world.teacher(teacher)
    for split in SPLIT_SIZES:
        logits = dense(model, read_tokens(open_store(world.full), split)).logits
        cached = arrays(world.full, f"teachers/{teacher}/{split}")
        k = world.cfg.cache.k
        assert torch.allclose(cached["topk_logits"], logits.topk(k).values, rtol=1e-3, atol=1e-3)
        assert torch.allclose(logits.gather(-1, cached["topk_ids"]), cached["topk_logits"], rtol=1e-3, atol=1e-3)
        for i, t in enumerate(world.cfg.cache.temperatures):
            p_dense = torch.softmax(logits / t, dim=-1)
            p_cached = torch.exp(cached["topk_logits"] / t - cached["lse"][..., i : i + 1])
            assert torch.allclose(cached["lse"][..., i], torch.logsumexp(logits / t, -1), atol=1e-5)
            assert torch.allclose(p_cached, p_dense.gather(-1, cached["topk_ids"]), rtol=2e-3, atol=1e-5)
            tail_dense = 1 - p_dense.topk(k).values.sum(-1)
            assert torch.allclose(1 - p_cached.sum(-1), tail_dense, atol=1e-3)
            assert tail_dense.min() > 0.05  # the tail is a real part of the target, not a rounding residue


def test_ensemble_is_topk_of_mean_logits(world):
    root = open_store(world.full)
    assert root["teachers/ensemble"].attrs["ensemble_of"] == ["llama", "gpt2"]
    models = [world.teacher(name) for name in ("llama", "gpt2")]
    for split in SPLIT_SIZES:
        tokens = read_tokens(root, split)
        mean = torch.stack([dense(m, tokens).logits for m in models]).mean(0)
        cached = arrays(world.full, f"teachers/ensemble/{split}")
        assert set(cached) == {"topk_logits", "topk_ids", "lse", "complete"}
        assert torch.allclose(cached["topk_logits"], mean.topk(world.cfg.cache.k).values, rtol=1e-3, atol=1e-3)
        assert torch.allclose(mean.gather(-1, cached["topk_ids"]), cached["topk_logits"], rtol=1e-3, atol=1e-3)
        assert torch.allclose(cached["lse"][..., 1], torch.logsumexp(mean / 2.0, -1), atol=1e-5)


def test_hidden_states_float16_and_int8(world):
    model = world.teacher("llama")
    tokens = read_tokens(open_store(world.full), "train")
    hidden = dense(model, tokens, hidden=True).hidden_states
    cached = arrays(world.full, "teachers/llama/train")
    for layer in (0, 2):
        assert torch.allclose(cached[f"hidden_{layer}"], hidden[layer], rtol=1e-3, atol=1e-4)

    cfg = dataclasses.replace(world.cfg, cache=dataclasses.replace(world.cfg.cache, hidden_dtype="int8", ensemble=False,
                                                                   samples=0))
    store = world.store("int8.zarr")
    precompute_targets(cfg, world.runs, teachers=["llama"], store=store, device="cpu")
    cached = arrays(store, "teachers/llama/train")
    assert open_store(store)["teachers/llama/train/hidden_2"].dtype == np.int8
    for layer in (0, 2):
        scale = cached[f"hidden_{layer}_scale"]
        absmax = hidden[layer].abs().amax(-1)
        assert torch.allclose(scale, absmax / 127, rtol=1e-3)
        err = (cached[f"hidden_{layer}"] * scale.unsqueeze(-1) - hidden[layer]).abs().amax(-1)
        assert (err <= 0.5 * scale * 1.01 + 1e-6).all()


def test_sampled_targets_are_unbiased(world):
    model = world.teacher("gpt2")
    logits = dense(model, read_tokens(open_store(world.full), "dev")[:1]).logits[0, 5]
    n, t = 20000, 2.0
    ids, counts = sample_counts(logits, n, t, torch.Generator().manual_seed(0))
    assert counts.sum() == n and (counts[:-1] >= counts[1:]).all()
    freq = torch.zeros(world.vocab).index_add_(0, ids, counts.float()) / n
    p = torch.softmax(logits / t, -1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()

    cached = arrays(world.full, "teachers/gpt2/dev")
    counts, ids = cached["sample_counts"], cached["sample_ids"]
    assert (counts.sum(-1) == world.cfg.cache.samples).all()
    assert (counts[..., :-1] >= counts[..., 1:]).all()
    assert (ids[counts == 0] == 0).all()
    rows, row_counts = ids.reshape(-1, ids.shape[-1]), counts.reshape(-1, ids.shape[-1])
    assert all(len(set(row[c > 0].tolist())) == int((c > 0).sum()) for row, c in zip(rows, row_counts))  # unique ids


def test_shard_files_are_what_zarr_writes_and_read_directly(world, tmp_path):
    """Every shard file precompute wrote is byte for byte the one zarr-python writes for the same values into
    the same array, and the direct reader reads what zarr-python reads."""
    root, checked = open_store(world.full), 0
    for teacher in ("llama", "gpt2", "ensemble"):
        for split, n in SPLIT_SIZES.items():
            group = root[f"teachers/{teacher}/{split}"]
            for name in sorted(set(group.array_keys()) - {COMPLETE}):
                written = Path(world.full) / group.path / name
                values = group[name][...]
                twin = tmp_path / group.path / name
                twin.mkdir(parents=True)
                (twin / "zarr.json").write_bytes((written / "zarr.json").read_bytes())
                with zarr.config.set({"array.write_empty_chunks": True}):  # the schema's setting
                    zarr.open_array(str(twin), mode="r+")[...] = values
                assert tree(str(twin)) == tree(str(written)), written
                assert np.array_equal(ShardedArrayReader(written).read_sequences(range(n)), values), written
                checked += 1
    assert checked == 2 * (7 + 5 + 3)  # per split: llama top-k, lse, samples, 2 hidden; gpt2 no hidden; ensemble


def test_kill_and_resume_gives_identical_store(world, monkeypatch):
    store = world.store("resumed.zarr")
    calls = []
    mark = kdcache.precompute.writer.mark_shard_complete

    def dying_mark(group, shard):
        calls.append(shard)
        if len(calls) == 8:  # third shard: llama marked, gpt2 written but not marked, ensemble not written
            raise RuntimeError("simulated kill")
        mark(group, shard)

    monkeypatch.setattr(kdcache.precompute.writer, "mark_shard_complete", dying_mark)
    with pytest.raises(RuntimeError, match="simulated kill"):
        precompute_targets(world.cfg, world.runs, store=store, device="cpu")
    root = open_store(store)
    assert completed_shards(root["teachers/llama/train"]).tolist() == [True, True, True]
    assert completed_shards(root["teachers/gpt2/train"]).tolist() == [True, True, False]
    monkeypatch.setattr(kdcache.precompute.writer, "mark_shard_complete", mark)

    # The rerun compresses on two threads: same bytes as the one thread of the uninterrupted run.
    stats = precompute_targets(world.cfg, world.runs, store=store, device="cpu", writers=2)
    assert (stats.shards_written, stats.shards_skipped) == (3, 2)
    assert tree(store) == tree(world.full)


def test_two_ranks_match_one_rank(world):
    config = world.tmp / "config.yaml"
    config.write_text(yaml.safe_dump(world.cfg.to_dict()))
    store = world.store("ranks.zarr")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdcache.cli", "precompute", "--config", str(config), "--runs-root", str(world.runs),
           "--store", store, "--device", "cpu"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: 2 shards written" in result.stdout
    assert tree(store) == tree(world.full)


def test_teacher_with_other_tokenizer_needs_the_run_tokenizer_or_vocab_is_refused(world):
    # another tokenizer is cached across tokenizers (tests/test_cross_tokenizer.py), from the tokens' bytes: the
    # run's tokenizer must be where the run keeps it
    other_tok = make_tokenizer(world.tmp / "other_tokenizer", seed=1)
    other = save_teacher(world.tmp / "other", "llama", world.vocab, other_tok, seed=3)
    cfg = dataclasses.replace(world.cfg, teachers=[TeacherConfig("other", pretrained=str(other))],
                              cache=CacheConfig(k=8))
    store = world.store("refused.zarr")
    with pytest.raises(StoreError, match="a cross-tokenizer teacher needs the tokenizer") as e:
        precompute_targets(cfg, world.runs, store=store, device="cpu")
    assert tokenizer_sha256(world.tokdir) in str(e.value) and str(run_paths(cfg, world.runs).tokenizer) in str(e.value)

    wide = save_teacher(world.tmp / "wide", "gpt2", world.vocab + 8, world.tokdir, seed=4)
    cfg = dataclasses.replace(cfg, teachers=[TeacherConfig("wide", pretrained=str(wide))])
    with pytest.raises(StoreError, match=f"vocab_size {world.vocab + 8}.*vocab_size {world.vocab}"):
        precompute_targets(cfg, world.runs, store=store, device="cpu")
    assert "teachers" not in open_store(store)


def test_changed_settings_refused_unless_overwrite(world):
    cfg = dataclasses.replace(world.cfg, cache=CacheConfig(k=8, batch_size=4))
    store = world.store("changed.zarr")
    precompute_targets(cfg, world.runs, teachers=["llama"], store=store, device="cpu")
    again = precompute_targets(cfg, world.runs, teachers=["llama"], store=store, device="cpu")
    assert (again.shards_written, again.shards_skipped, again.positions) == (0, 5, 0)

    smaller = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, k=4))
    with pytest.raises(StoreError, match=r"'llama' computed with other settings \(.*k: 8 -> 4.*--overwrite"):
        precompute_targets(smaller, world.runs, teachers=["llama"], store=store, device="cpu")
    assert open_store(store)["teachers/llama/train/topk_logits"].shape[-1] == 8

    stats = precompute_targets(smaller, world.runs, teachers=["llama"], overwrite=True, store=store, device="cpu")
    group = open_store(store)["teachers/llama"]
    assert stats.shards_written == 5 and group.attrs["k"] == 4
    assert group["train/topk_logits"].shape[-1] == 4 and completed_shards(group["dev"]).all()



def test_store_given_as_fsspec_url(world):
    """An in-memory fsspec store, written through zarr's store API, gets the same arrays as a local one."""
    root = create_store("memory://kdcache-test.zarr", dict(open_store(world.full).attrs))
    for split in SPLIT_SIZES:
        write_tokens(root, split, read_tokens(open_store(world.full), split), PER_SHARD, CodecSettings(), world.vocab)
    cfg = dataclasses.replace(world.cfg, cache=dataclasses.replace(world.cfg.cache, ensemble=False, samples=0,
                                                                   hidden_layers={}))
    stats = precompute_targets(cfg, world.runs, teachers=["gpt2"], store="memory://kdcache-test.zarr", device="cpu")
    assert stats.shards_written == 5
    for name in ("topk_logits", "topk_ids", "lse"):
        for split in SPLIT_SIZES:
            got = open_store("memory://kdcache-test.zarr")[f"teachers/gpt2/{split}/{name}"][...]
            np.testing.assert_array_equal(got, open_store(world.full)[f"teachers/gpt2/{split}/{name}"][...])
