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
    stats = json.loads(kdcache("stats", str(run / "cache.zarr"), "--sample", "4", "--json"))
    assert "smollm2" in json.dumps(stats)
    summary = json.loads(kdcache("inspect", str(run / "cache.zarr"), "--json"))
    assert summary["vocab_size"] == PADDED_VOCAB and summary["teachers"]["smollm2"]["k"] == 64


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



def test_a_large_vocabulary_is_precomputed_in_passes_and_the_loss_in_chunks_without_changing_a_value(monkeypatch):
    """At V = 150,016 a batch goes through the teachers in passes of PASS_LOGITS logits and the student's loss in
    chunks sized to V; with one sequence a pass and three positions a chunk, every value is the same."""
    import kdcache.precompute.targets as targets
    from kdcache.config import CacheConfig
    from kdcache.precompute.teachers import Teacher
    from kdcache.student.kd.engine import TeacherTargets, default_chunk_positions, distillation_loss
    from kdcache.student.kd.form import kd_form
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=PADDED_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    teachers = [Teacher(name, LlamaForCausalLM(config).eval(), {}, []) for name in ("a", "b")]
    ids = torch.randint(FIRST_WORD_ID, TOKENIZER_IDS, (3, 8))
    cache = CacheConfig(k=8, samples=16, ensemble=True)

    def run() -> dict:
        generators = {t.name: torch.Generator().manual_seed(5) for t in teachers}
        with torch.no_grad():
            return targets.batch_targets(teachers, ids, cache, generators, True, ("train", 0))

    whole = run()
    monkeypatch.setattr(targets, "PASS_LOGITS", 8 * PADDED_VOCAB)  # one sequence a pass
    passes = run()
    for group, arrays in whole.items():
        for name, value in arrays.items():
            assert torch.equal(value, passes[group][name]), (group, name)
    assert whole["a"]["topk_ids"].max() > 65_535

    assert default_chunk_positions(PADDED_VOCAB) == 2**26 // PADDED_VOCAB < 4096
    logits = torch.randn(3, 8, PADDED_VOCAB, requires_grad=True)
    group = TeacherTargets("a", 0.5, kd_form("tail"), {key: whole["a"][key] for key in ("topk_logits", "topk_ids")}
                           | {"lse": whole["a"]["lse"][..., 0]})
    grads = []
    for chunk in (None, 3):
        total, terms = distillation_loss(logits, ids, [group], 0.5, 1.0, chunk_positions=chunk)
        grads.append((total.detach(), torch.autograd.grad(total, logits)[0]))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-8)
