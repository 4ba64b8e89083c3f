"""Export: a directory AutoModelForCausalLM / AutoTokenizer load unchanged, from a model or a checkpoint, and clear
errors for a missing or unreadable checkpoint and a tokenizer that does not match the model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers_train import SPECIAL_IDS, TINY_GPT2, TINY_LLAMA, VOCAB, blimp_lines, make_store, make_tokenizer, tiny_train
from kdcache.cli.pipeline import export
from kdcache.student.export import ExportError, export_model
from kdcache.student.model import build_model
from kdcache.student.data import TokenDataset
from kdcache.student.lm import lm_loss
from kdcache.student.loop import train

LINES = blimp_lines(paradigms=6, per_paradigm=30)
TEXT = " The cat saw a dog.\nWho should Derek hug?"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", LINES)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_export_loads_unchanged_with_the_auto_classes(tokenizer_dir, tmp_path, shape):
    model = build_model(shape, VOCAB, SPECIAL_IDS).eval()
    out = export_model(model, tokenizer_dir, tmp_path / "model")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    loaded, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert type(loaded) is type(model)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:16]
    assert tokenizer.decode(ids).startswith(" The cat")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    export_model(model, tokenizer_dir, out)  # replacing an export leaves no temporary directory behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_command_from_a_checkpoint_or_a_model_directory(tokenizer_dir, tmp_path):
    store = make_store(tmp_path / "cache.zarr", tokenizer_dir, LINES)
    torch.manual_seed(0)
    model = build_model(TINY_LLAMA, VOCAB, SPECIAL_IDS)
    train(model, TokenDataset(store, "train"), tiny_train(max_steps=2), tmp_path / "run", lm_loss, seed=0,
          resume=False, fingerprint={"model": dataclasses.asdict(TINY_LLAMA)}, tokenizer_dir=tokenizer_dir)
    ids = [1, 40, 41, 42, 200]
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model"), ids)
    for source in (tmp_path / "run" / "checkpoints" / "latest.pt", tmp_path / "run" / "model"):
        out = tmp_path / f"export-{source.name}"
        result = CliRunner().invoke(export, [str(source), str(out)])
        assert result.exit_code == 0, result.output
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), expected)
        assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"]


def test_export_errors_name_the_file(tokenizer_dir, tmp_path):
    missing = tmp_path / "missing.pt"
    result = CliRunner().invoke(export, [str(missing), str(tmp_path / "out")])
    assert result.exit_code == 2 and f"Error: {missing}: checkpoint not found" in result.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(export, [str(garbage), str(tmp_path / "out")])
    assert result.exit_code == 2 and f"Error: {garbage}: not a readable kdcache checkpoint" in result.output
    result = CliRunner().invoke(export, [str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2 and f"Error: {tmp_path}: no config.json here" in result.output

    other = make_tokenizer(tmp_path / "other", LINES, vocab_size=300)  # a model may pad beyond it, not fall short
    with pytest.raises(ExportError, match=f"{other}: the tokenizer has 300 tokens, the model's vocab_size is 290"):
        export_model(build_model(TINY_LLAMA, 290, SPECIAL_IDS), other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
