"""Evaluation: the batched minimal-pair scorer against a one-sentence-at-a-time reference on real BLiMP lines,
ties, malformed jsonl, the dev loss, the side-by-side table and the `kdcache eval` command."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from kdcache.config import TeacherConfig, run_paths
from helpers_train import BLIMP, SPECIAL_IDS, TINY_GPT2, TINY_LLAMA, VOCAB, blimp_lines, make_run, make_store, make_tokenizer
from kdcache.cli.pipeline import evaluate
from kdcache.student.evaluate import (
    EvalError, compare, dev_loss, encode_sentences, evaluate_model, load_model, minimal_pair_accuracy, read_pair_dir,
    score_sequences,
)
from kdcache.student.export import export_model
from kdcache.student.model import build_model
from kdcache.student.data import TokenDataset
from kdcache.student.lm import next_token_ce

LINES = blimp_lines(paradigms=20, per_paradigm=40)
LONG = 128  # BLiMP sentences need more than the store's 16 positions
NEWLINE_PAIR = {"sentence_good": "A: Do you like it?\nB: Yes, I do.", "sentence_bad": "A: Do you like it?\nB: Yes, I does."}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", LINES)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A few dozen real BLiMP lines (first lines of 5 paradigms) and a pair with newlines, as in the supplement."""
    directory = tmp_path_factory.mktemp("pairs")
    for path in sorted(BLIMP.glob("*.jsonl"))[20:25]:
        (directory / path.name).write_text("\n".join(path.read_text().splitlines()[:8]) + "\n")
    (directory / "turn_taking.jsonl").write_text(json.dumps(NEWLINE_PAIR) + "\n")
    return directory


def model_dir(tokenizer_dir: Path, out: Path, shape=TINY_LLAMA, seed=0) -> Path:
    torch.manual_seed(seed)
    return export_model(build_model(dataclasses.replace(shape, max_position=LONG), VOCAB, SPECIAL_IDS), tokenizer_dir, out)


def reference_score(model, tokenizer, sentence: str) -> float:
    """One sentence alone, no padding: sum over its tokens of log p(token | <s> and the tokens before)."""
    ids = [tokenizer.bos_token_id] + tokenizer(" " + sentence, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_batched_scores_equal_one_sentence_at_a_time(tokenizer_dir, pairs, tmp_path, shape):
    model, tokenizer = load_model(model_dir(tokenizer_dir, tmp_path / "model", shape))
    paradigms = read_pair_dir(pairs)
    sentences = [s for ps in paradigms.values() for pair in ps for s in pair]
    assert len(sentences) == 2 * (5 * 8 + 1)
    batched = score_sequences(model, encode_sentences(tokenizer, sentences), batch_size=7, pad_id=0)
    reference = [reference_score(model, tokenizer, s) for s in sentences]
    assert batched == pytest.approx(reference, abs=1e-3)

    result = minimal_pair_accuracy(model, tokenizer, pairs, batch_size=7)
    scores = iter(reference)
    expected = {name: sum(next(scores) >= next(scores) for _ in ps) / len(ps) for name, ps in paradigms.items()}
    assert result["paradigms"] == expected
    assert result["mean"] == pytest.approx(sum(expected.values()) / len(expected))

    # eval.pairs_per_paradigm: the first N pairs of each paradigm, scored exactly as in the full run
    first3 = read_pair_dir(pairs, limit=3)
    assert first3 == {name: ps[:3] for name, ps in paradigms.items()}
    capped = minimal_pair_accuracy(model, tokenizer, pairs, batch_size=7, limit=3)
    scores = iter(reference)
    full_pairs = {name: [(next(scores), next(scores)) for _ in ps] for name, ps in paradigms.items()}
    assert capped["pairs"] == sum(len(ps) for ps in first3.values())
    assert capped["paradigms"] == {name: sum(g >= b for g, b in sc[:3]) / len(first3[name])
                                   for name, sc in full_pairs.items()}
    assert result["pairs"] == 41 and result["pairs_per_s"] > 0


def test_newlines_stay_text_and_ties_count_as_right(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    (ids,) = encode_sentences(tokenizer, [NEWLINE_PAIR["sentence_good"]])
    assert ids[0] == 1 and tokenizer.decode(ids[1:]) == " " + NEWLINE_PAIR["sentence_good"]
    directory = tmp_path / "ties"
    directory.mkdir()
    (directory / "same.jsonl").write_text(json.dumps({"sentence_good": "The cat.", "sentence_bad": "The cat."}) + "\n")
    model, tokenizer = load_model(model_dir(tokenizer_dir, tmp_path / "model"))
    assert minimal_pair_accuracy(model, tokenizer, directory, batch_size=4)["mean"] == 1.0


@pytest.mark.parametrize("line, problem", [
    ("", "empty line"),
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"sentence_good": "The cat."}', "'sentence_bad' missing or not a non-empty string"),
    ('{"sentence_good": "The cat.", "sentence_bad": 3}', "'sentence_bad' missing or not a non-empty string"),
])
def test_malformed_pair_lines_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"sentence_good": "A b.", "sentence_bad": "B a."}) + "\n" + line + "\n")
    with pytest.raises(EvalError, match=f"^{path}:2: {problem}"):
        read_pair_dir(tmp_path)


def test_unusable_pair_directories_and_long_sentences(tokenizer_dir, pairs, tmp_path):
    with pytest.raises(EvalError, match=f"{tmp_path / 'nope'}: minimal-pair directory not found"):
        read_pair_dir(tmp_path / "nope")
    with pytest.raises(EvalError, match=f"{tmp_path}: no \\*.jsonl files"):
        read_pair_dir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EvalError, match=f"{tmp_path / 'empty.jsonl'}: no minimal pairs"):
        read_pair_dir(tmp_path)
    torch.manual_seed(0)
    short = export_model(build_model(TINY_LLAMA, VOCAB, SPECIAL_IDS), tokenizer_dir, tmp_path / "short")
    model, tokenizer = load_model(short)
    first = sorted(pairs.glob("*.jsonl"))[0]
    with pytest.raises(EvalError, match=rf"{first}:1: \d+ tokens with BOS, more than the model's 16 positions"):
        minimal_pair_accuracy(model, tokenizer, pairs, batch_size=4)


def test_dev_loss_is_the_mean_next_token_cross_entropy(tokenizer_dir, tmp_path):
    store = make_store(tmp_path / "cache.zarr", tokenizer_dir, LINES, dev_fraction=0.05)
    model, _ = load_model(model_dir(tokenizer_dir, tmp_path / "model"))
    dataset = TokenDataset(store, "dev")
    result = dev_loss(model, dataset, batch_size=5)
    ids = torch.from_numpy(dataset.tokens.astype("int64"))
    with torch.no_grad():
        expected = next_token_ce(model(input_ids=ids).logits, ids).item()
    assert result["ce"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens"] == ids.shape[0] * (ids.shape[1] - 1)


def test_compare_aligns_models_side_by_side():
    report = {"parameters": 41_120, "dev": {"ce": 4.5, "perplexity": 90.0, "tokens": 10},
              "minimal_pairs": {"blimp": {"mean": 0.6, "paradigms": {"a": 0.5, "b": 0.7}, "pairs": 4, "pairs_per_s": 1.0}}}
    no_dev = {"parameters": 2_000_000, "minimal_pairs": {"blimp": {"mean": 0.55, "paradigms": {"a": 0.55},
                                                                   "pairs": 2, "pairs_per_s": 1.0}}}
    table = compare({"teacher-one": report, "student": no_dev}).splitlines()
    assert [line.split() for line in table] == [
        ["teacher-one", "student"],
        ["parameters", "0.04M", "2.00M"],
        ["dev", "ce", "4.5000", "-"],
        ["dev", "perplexity", "90.00", "-"],
        ["blimp", "mean", "0.6000", "0.5500"],
        ["a", "0.5000", "0.5500"],
        ["b", "0.7000", "-"],
    ]
    ends = {len(line) for line in table}
    assert len(ends) == 1  # every row ends in the same column: right-aligned numbers


def test_eval_command_reports_every_model_of_a_run(tokenizer_dir, pairs, tmp_path):
    teacher = TeacherConfig("llama", dataclasses.replace(TINY_LLAMA, max_position=LONG))
    cfg = make_run(tmp_path, [teacher], LINES)
    paths = run_paths(cfg, tmp_path / "runs")
    model_dir(paths.tokenizer, paths.teacher("llama") / "model", seed=1)
    model_dir(paths.tokenizer, paths.student / "model", TINY_GPT2, seed=2)
    args = ["--config", cfg.source_path, "--runs-root", str(tmp_path / "runs"), "--pairs", str(pairs)]
    result = CliRunner().invoke(evaluate, args)
    assert result.exit_code == 0, result.output
    assert f"baseline: no model at {paths.baseline / 'model'}, skipped" in result.output
    table = result.output[result.output.index("llama  student") - 20 :]
    assert "dev perplexity" in table and f"{pairs} mean" in table and "turn_taking" in table
    reports = {name: json.loads((paths.eval / f"{name}.json").read_text()) for name in ("llama", "student")}
    assert reports["llama"]["dev"]["ce"] > 0 and reports["student"]["minimal_pairs"][str(pairs)]["pairs"] == 41
    direct = evaluate_model(paths.student / "model", store=paths.store, pair_dirs=[str(pairs)])
    assert direct["dev"] == pytest.approx(reports["student"]["dev"], rel=1e-6)  # other batch size: other rounding
    assert direct["minimal_pairs"][str(pairs)]["paradigms"] == reports["student"]["minimal_pairs"][str(pairs)]["paradigms"]

    out = tmp_path / "one.json"
    result = CliRunner().invoke(evaluate, [str(paths.student / "model"), "--pairs", str(pairs), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["minimal_pairs"][str(pairs)]["paradigms"] == \
        reports["student"]["minimal_pairs"][str(pairs)]["paradigms"]

    other = make_tokenizer(tmp_path / "other", [line.upper() for line in LINES])  # same size, another vocabulary
    foreign = model_dir(other, tmp_path / "foreign")
    result = CliRunner().invoke(evaluate, [str(foreign), "--store", str(paths.store)])
    assert result.exit_code == 2
    assert f"Error: {foreign}: the model's tokenizer is not the one the tokens of {paths.store} were made with" in result.output
    result = CliRunner().invoke(evaluate, [str(tmp_path / "nope")])
    assert result.exit_code == 2 and f"Error: {tmp_path / 'nope'}: model directory not found" in result.output
