"""A Hugging Face model as the run's tokenizer and teacher: configs/hub_teacher.yaml with the hub id replaced by a
local directory (a 150,000-id tokenizer, a random-weight Llama padded to 150,016 rows), data -> precompute ->
distill -> eval from the CLI; ids above 65,535 through store, reader, loss, `show`, `verify` and the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers_pretrained import (
    FIRST_WORD_ID, PADDED_VOCAB, SEED, SENTENCES, TOKENIZER_IDS, demo_words, hub_config, save_random_llama,
    save_word_tokenizer,
)
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import open_store, read_tokens
from kdcache.cache.verify import verify_store
from kdcache.config import load_config, run_paths
from test_distill import kdcache

@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path]:
    """The local 'hub' model directory and a run of the hub config through data -> precompute -> distill -> eval."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = save_random_llama(root / "SmolLM-like", save_word_tokenizer(root / "tok", demo_words(SEED, SENTENCES)))
    config = hub_config(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HUB_TEACHER", str(model_dir))
        common = ("--config", str(config), "--runs-root", str(root / "runs"))
        for step in (("data",), ("teachers",), ("precompute", "--device", "cpu"), ("distill",), ("eval",)):
            kdcache(*step, *common)
    return model_dir, run_paths(load_config(config), root / "runs").root


def test_store_holds_the_pretrained_tokenizers_ids_beyond_uint16(hub):
    model_dir, run = hub
    root = open_store(str(run / "cache.zarr"))
    assert root.attrs["vocab_size"] == PADDED_VOCAB  # the model's embedding size, past the tokenizer's ids
    assert root.attrs["tokenizer_source"] == str(model_dir)
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    tokens = read_tokens(root, "train")
    assert tokens.dtype == np.uint32 and tokens.max() >= FIRST_WORD_ID and tokens.max() < TOKENIZER_IDS
    group = root["teachers/smollm2/train"]
    assert group["topk_ids"].dtype == np.uint32 and group["sample_ids"].dtype == np.uint32
    reader = StoreReader(run / "cache.zarr", teachers=["smollm2"], arrays={"smollm2": ["topk_ids"]})
    batch = reader.batch([0, 1])
    ids = batch["smollm2/topk_ids"]
    assert ids.dtype == np.uint32 and ids.max() > 65_535 and ids.max() < PADDED_VOCAB
    # The cached top-k is the teacher's own, ids above 65,535 included.
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(tokens[:2].astype(np.int64))).logits
    assert np.array_equal(ids[..., :4], logits.topk(4, dim=-1).indices.numpy())
    assert verify_store(run / "cache.zarr") == []
    kdcache("verify", str(run / "cache.zarr"))  # exit 0


def test_show_decodes_ids_above_65535(hub):
    _, run = hub
    tokens = read_tokens(open_store(str(run / "cache.zarr")), "train")
    shown = json.loads(kdcache("show", str(run / "cache.zarr"), "--seq", "0", "--pos", "3", "--json"))
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    word = tokenizer.convert_ids_to_tokens(int(tokens[0, 4]))
    assert tokens[0, 4] > 65_535 and shown["next_token"] == word
    entry = shown["teachers"]["smollm2"]
    for token_id, text in zip(entry["ids"], entry["tokens"]):
        expected = tokenizer.convert_ids_to_tokens(token_id) if token_id < TOKENIZER_IDS else f"<unused #{token_id}>"
        assert text == expected


def test_the_student_distils_and_exports_with_the_pretrained_tokenizer(hub):
    model_dir, run = hub
    rows = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["kl/smollm2"]) for r in rows)
    exported = run / "student" / "model"
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert model.config.vocab_size == PADDED_VOCAB and len(tokenizer) == TOKENIZER_IDS
    assert (exported / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (run / "eval" / "student.json").is_file()

