"""Cross-tokenizer caching end to end: a teacher with its own tokenizer (another BPE, another vocabulary size)
cached beside a same-tokenizer teacher in one store, its bytes and alignment checked, `verify` / `show` / `stats` /
`inspect` on the store, a student distilled with each cross-tokenizer form, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from tokenizers import Tokenizer, normalizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers_train import TINY_LLAMA, blimp_lines, make_run, make_tokenizer, tiny_train
from kdcache.cache.schema import open_store, sha256_file
from kdcache.cache.verify import verify_store
from kdcache.cache.xtok import decode_vocab_map, ragged_problem
from kdcache.cache.xtok_inspect import bits_per_byte
from kdcache.cli import main
from kdcache.config import CacheConfig, DistillConfig, TeacherConfig, TeacherTokenizerConfig, load_config, run_paths
from kdcache.precompute.cross_tokenizer import prefix_map, token_bytes
from kdcache.precompute.tokenizer import save_hf_directory, train_unigram
from kdcache.precompute.teacher_training import train_teacher
from kdcache.study.run import dev_bits_per_byte

OWN_VOCAB = 400  # the run's tokenizer has helpers_train.VOCAB = 320
UNIGRAM_VOCAB = 350  # a third tokenizer: byte-level Unigram, other segmentations


def save_teacher(path: Path, tokenizer_dir: Path, vocab: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def kdcache(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    lines = blimp_lines(paradigms=10, per_paradigm=40)
    own = make_tokenizer(root / "own_tokenizer", lines, vocab_size=OWN_VOCAB)
    unigram = root / "unigram_tokenizer"
    unigram.mkdir()
    text = root / "text.txt"
    text.write_text("".join(line + "\n" for line in lines))
    save_hf_directory(train_unigram(text, UNIGRAM_VOCAB), unigram / "hf")
    teachers = [TeacherConfig("same", pretrained=str(root / "same")), TeacherConfig("other", pretrained=str(root / "other")),
                TeacherConfig("uni", pretrained=str(root / "uni"))]
    cfg = make_run(root, teachers, lines, cache=CacheConfig(k=8, batch_size=16), student=TINY_LLAMA,
                   student_train=tiny_train(max_steps=3), distill=DistillConfig(temperature=1.0))
    paths = run_paths(cfg, root / "runs")
    save_teacher(root / "same", paths.tokenizer, 320, seed=0)
    save_teacher(root / "other", own, OWN_VOCAB, seed=1)
    save_teacher(root / "uni", unigram / "hf", len(PreTrainedTokenizerFast.from_pretrained(unigram / "hf")), seed=4)
    kdcache("precompute", "--config", cfg.source_path, "--runs-root", str(root / "runs"))
    return cfg, root


@pytest.mark.parametrize("teacher", ["other", "uni"])
def test_teacher_tokens_are_the_sequence_bytes_and_align_on_shared_ends(run, teacher):
    cfg, root = run
    store = open_store(str(run_paths(cfg, root / "runs").store))
    group = store[f"teachers/{teacher}/train"]
    attrs = store[f"teachers/{teacher}"].attrs
    assert attrs["kind"] == "cross_tokenizer" and attrs["roundtrip_failed"] == {"train": 0, "dev": 0}
    run_bytes = token_bytes(Tokenizer.from_file(str(run_paths(cfg, root / "runs").tokenizer / "tokenizer.json")))
    own_bytes = token_bytes(Tokenizer.from_file(str(root / teacher / "tokenizer.json")))
    tokens, own, ends, align = (group[name][...] if name != "tokens" else store["tokens/train"][...]
                                for name in ("tokens", "t_tokens", "t_byte_end", "align"))
    for row in range(len(tokens)):
        n = int((ends[row] > 0).sum())
        text = b"".join(run_bytes[i] for i in tokens[row])
        theirs = b"".join(own_bytes[i] for i in own[row, :n])
        assert theirs in (text, b" " + text)  # the teacher's pre-tokenizer may add the leading space
        run_ends = np.cumsum([len(run_bytes[i]) for i in tokens[row]])
        shared = np.isin(run_ends, ends[row, :n])
        assert ((align[row] >= 0) == shared).all()
        assert (ends[row, align[row][shared]] == run_ends[shared]).all()
    assert ragged_problem(ends, align) is None
    assert 0.5 < (align >= 0).mean() < 1  # word starts are shared; some run tokens end inside a teacher token


def test_cached_logits_are_the_teachers_on_its_own_tokens(run):
    cfg, root = run
    group = open_store(str(run_paths(cfg, root / "runs").store))["teachers/other/dev"]
    ids, ends = group["t_tokens"][0].astype(np.int64), group["t_byte_end"][0]
    n = int((ends > 0).sum())
    model = AutoModelForCausalLM.from_pretrained(root / "other", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids[None, :n])).logits[0]
    values, top = logits.topk(8, dim=-1)
    torch.testing.assert_close(torch.from_numpy(group["t_topk_logits"][0, :n].astype(np.float32)), values.half().float())
    assert (group["t_topk_ids"][0, :n] == top.numpy()).all()
    torch.testing.assert_close(torch.from_numpy(group["t_lse"][0, :n, 0]), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    following = logits[:-1].gather(-1, torch.from_numpy(ids[1:n, None]))[:, 0]
    torch.testing.assert_close(torch.from_numpy(group["t_next_logit"][0, :n - 1]), following)
    assert group["t_next_logit"][0, n - 1:].tolist() == [0] * (len(ids) - n + 1)


def test_verify_show_stats_inspect(run):
    cfg, root = run
    store = str(run_paths(cfg, root / "runs").store)
    assert verify_store(store) == []
    kdcache("verify", store)
    align = open_store(store)["teachers/other/train/align"][2]
    aligned, unaligned = int(np.flatnonzero(align >= 0)[-2]), int(np.flatnonzero(align < 0)[0])
    shown = json.loads(kdcache("show", store, "--seq", "2", "--pos", str(aligned), "--json"))["teachers"]
    assert shown["other"]["aligned"] and shown["other"]["teacher_position"] == align[aligned]
    assert len(shown["other"]["teacher_tokens"]) == align[aligned] + 1 and shown["other"]["probs"]
    assert "probs" in shown["same"]
    text = kdcache("show", store, "--seq", "2", "--pos", str(unaligned))
    assert "none of its tokens ends where this run token ends" in text and "other (own tokenizer)" in text
    stats = json.loads(kdcache("stats", store, "--sample", "8", "--json"))
    assert 0.5 < stats["cross_tokenizer"]["other"]["alignment_rate"] < 1 and list(stats["teachers"]) == ["same"]
    assert 0.3 < stats["cross_tokenizer"]["uni"]["alignment_rate"] < 1
    assert "cross-tokenizer teachers" in kdcache("stats", store, "--sample", "8")
    summary = json.loads(kdcache("inspect", store, "--json"))
    assert set(summary["teachers"]) == {"same", "other", "uni"}
    kdcache("inspect", store)


def linked_config(run, name: str, **distill) -> str:
    """Another run sharing the store and tokenizer, with other distill settings."""
    cfg, root = run
    base = run_paths(cfg, root / "runs")
    other = root / "runs" / name
    other.mkdir(exist_ok=True)
    for part in ("cache.zarr", "tokenizer"):
        if not (other / part).exists():
            (other / part).symlink_to(base.root / part)
    data = dataclasses.replace(cfg, name=name, distill=dataclasses.replace(cfg.distill, **distill)).to_dict()
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("form", ["xtok_chunk", "xtok_match", "xtok_project"])
def test_each_cross_tokenizer_form_distils_from_the_store(run, form):
    config = linked_config(run, f"d-{form}", form=form, teacher_weights={"other": 0.5})
    kdcache("distill", "--config", config, "--runs-root", str(run[1] / "runs"))
    steps = [json.loads(line) for line in (run_paths(load_config(config), run[1] / "runs").student
                                            / "metrics.jsonl").read_text().splitlines() if '"kl/other"' in line]
    assert steps and all(np.isfinite(s["kl/other"]) and s["kl/other"] > 0 for s in steps)


def test_each_run_token_counts_for_the_longest_teacher_token_it_begins_with(run):
    run_bytes = [b"", b" the", b" theory", b"ory", b"x", b" th"]
    teacher_bytes = [b"", b" th", b" the", b"or", b" theor", b"zz"]
    assert prefix_map(run_bytes, teacher_bytes).tolist() == [-1, 2, 4, 3, -1, 1]
    cfg, root = run  # in the store: one entry per run token, each a teacher id or -1
    group = open_store(str(run_paths(cfg, root / "runs").store))["teachers/uni"].attrs
    stored = decode_vocab_map(group["prefix_map"])
    assert len(stored) == 320 and stored.min() >= -1 and stored.max() < group["teacher_vocab_size"]
    assert (stored >= 0).mean() > 0.9


def test_a_form_that_needs_arrays_the_group_lacks_is_refused_before_training(run):
    config = linked_config(run, "d-refused", form="tail", teacher_weights={"same": 0.3, "other": 0.5})
    out = kdcache("distill", "--config", config, "--runs-root", str(run[1] / "runs"), code=2)
    assert "'other'" in out and "topk_logits, topk_ids, lse" in out and "cross-tokenizer group" in out
    config = linked_config(run, "d-refused2", form="xtok_chunk", teacher_weights={"same": 0.5})
    out = kdcache("distill", "--config", config, "--runs-root", str(run[1] / "runs"), code=2)
    assert "'same'" in out and "align, t_next_logit, t_lse" in out
    assert not (run[1] / "runs" / "d-refused" / "student").exists()


def test_a_tokenizer_that_changes_the_text_is_refused_with_the_share(run, tmp_path):
    cfg, root = run
    lowercase = tmp_path / "lowercase"
    tok = Tokenizer.from_file(str(root / "own_tokenizer" / "tokenizer.json"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    lowercase.mkdir()
    tok.save(str(lowercase / "tokenizer.json"))
    teacher = save_teacher(tmp_path / "lower_teacher", root / "own_tokenizer", OWN_VOCAB, seed=2)
    tok.save(str(teacher / "tokenizer.json"))
    data = dataclasses.replace(cfg, teachers=[TeacherConfig("lower", pretrained=str(teacher))]).to_dict()
    path = root / "tiny-lower.yaml"
    path.write_text(yaml.safe_dump(data))
    out = kdcache("precompute", "--config", str(path), "--runs-root", str(root / "runs"), "--teacher", "lower", code=2)
    assert "does not reproduce the bytes of" in out and "% of the train sequences" in out and "at most 1%" in out
    assert "lower" not in open_store(str(run_paths(cfg, root / "runs").store))["teachers"]


def test_a_teacher_trained_on_its_own_unigram_tokenizer_is_cached_across_tokenizers(tmp_path):
    lines = blimp_lines(paradigms=4, per_paradigm=30)
    own = TeacherConfig("own", model=dataclasses.replace(TINY_LLAMA, max_position=48), train=tiny_train(max_steps=2),
                        tokenizer=TeacherTokenizerConfig(vocab_size=300, model="unigram"))
    cfg = make_run(tmp_path, [own], lines, cache=CacheConfig(k=4, batch_size=16))
    paths = run_paths(cfg, tmp_path / "runs")
    paths.corpus.mkdir(parents=True)
    n_dev = int(len(lines) * 0.1)  # make_run's split (helpers_train.make_store)
    for split, part in (("train", lines[n_dev:]), ("dev", lines[:n_dev])):
        (paths.corpus / f"{split}.txt").write_text("".join(line + "\n" for line in part))
    out = kdcache("teachers", "--config", cfg.source_path, "--runs-root", str(tmp_path / "runs"))
    model_dir = paths.teacher("own") / "model"
    # the budget was planned on its own token store: the words it announced are those its training counted
    seen = json.loads((model_dir / "kdcache_training.json").read_text())["words_seen"]
    assert seen > 0 and f"teacher own will see {seen:,} words" in out
    assert sha256_file(model_dir / "tokenizer.json") != open_store(str(paths.store)).attrs["tokenizer_sha256"]
    assert "Unigram" in (model_dir / "tokenizer.json").read_text()
    assert train_teacher(cfg, own, tmp_path / "runs", resume=True) == model_dir  # its token store is reused
    kdcache("precompute", "--config", cfg.source_path, "--runs-root", str(tmp_path / "runs"))
    assert open_store(str(paths.store))["teachers/own"].attrs["kind"] == "cross_tokenizer"
    assert verify_store(paths.store) == []
    group = open_store(str(paths.store))["teachers/own"].attrs.asdict()
    out = kdcache("upgrade", str(paths.store))  # adds the words per sequence, leaves the cross-tokenizer group be
    assert "words per sequence added" in out
    assert open_store(str(paths.store))["teachers/own"].attrs.asdict() == group
    assert verify_store(paths.store) == []


def test_bits_per_byte_is_the_teachers_own_cross_entropy_per_byte(run):
    cfg, root = run
    store = open_store(str(run_paths(cfg, root / "runs").store))
    group = store["teachers/other/dev"]
    model = AutoModelForCausalLM.from_pretrained(root / "other", dtype=torch.float32).eval()
    nats, covered = 0.0, 0
    for row in range(3):
        ends = group["t_byte_end"][row]
        n = int((ends > 0).sum())
        ids = torch.from_numpy(group["t_tokens"][row, :n].astype(np.int64))
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
        nats -= log_p[:-1].gather(-1, ids[1:, None]).sum().item()
        covered += int(ends[n - 1] - ends[0])
    want = nats / covered / np.log(2)
    got = bits_per_byte(group["t_byte_end"][:3], group["t_next_logit"][:3], group["t_lse"][:3, :, 0])
    assert got == pytest.approx(want, rel=1e-5)


def test_ragged_layout_breaks_are_named():
    ends, align = np.array([[2, 4, 6, 0], [3, 5, 0, 0]]), np.array([[0, -1, 1, 2], [-1, 0, 1, -1]])
    assert ragged_problem(ends, align) is None
    assert "padding (0) before" in ragged_problem(np.array([[2, 0, 6, 0], [3, 5, 0, 0]]), align)
    assert "do not rise" in ragged_problem(np.array([[2, 2, 6, 0], [3, 5, 0, 0]]), align)
    assert "outside" in ragged_problem(ends, np.array([[0, -1, 1, 3], [-1, 0, 1, -1]]))
    assert "not strictly rising" in ragged_problem(ends, np.array([[1, -1, 0, 2], [-1, 0, 1, -1]]))


def test_a_teacher_whose_context_is_shorter_than_its_tokens_is_refused(run, tmp_path):
    cfg, root = run
    short = tmp_path / "short"
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=OWN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8)).save_pretrained(short)
    PreTrainedTokenizerFast.from_pretrained(root / "own_tokenizer").save_pretrained(short)
    data = dataclasses.replace(cfg, teachers=[TeacherConfig("short", pretrained=str(short))]).to_dict()
    path = root / "tiny-short.yaml"
    path.write_text(yaml.safe_dump(data))
    out = kdcache("precompute", "--config", str(path), "--runs-root", str(root / "runs"), code=2)
    assert "more than the teacher's 8 positions" in out


def test_online_kd_refuses_a_teacher_with_its_own_tokenizer(run):
    config = linked_config(run, "d-online")
    out = kdcache("distill", "--config", config, "--runs-root", str(run[1] / "runs"), "--online", code=2)
    assert "teacher 'other' has its own tokenizer" in out


def test_a_teachers_dev_bits_per_byte_counts_the_bytes_of_its_dev_tokens(run):
    cfg, root = run
    paths = run_paths(cfg, root / "runs")
    tokens = open_store(str(paths.store))["tokens/dev"][...]
    tok = Tokenizer.from_file(str(paths.tokenizer / "tokenizer.json"))
    text_bytes = sum(len(tok.decode(row.tolist()).encode()) for row in tokens)  # each row's text, decoded apart
    want = 2.0 / (text_bytes / tokens.size) / np.log(2)
    assert dev_bits_per_byte(2.0, paths.store, str(paths.tokenizer)) == pytest.approx(want, rel=0.02)
