"""Model shapes: the seed recipe's parameter counts, tying, GPT-2's FFN width, special ids, seeded init."""

import pytest
import torch

from kdcache.config import ModelConfig
from kdcache.student.model import build_model, count_parameters

SPECIAL = {"pad": 0, "bos": 1, "eos": 2}


@pytest.mark.parametrize("shape, expected", [
    (ModelConfig("llama", 256, 1024, 8, 8, 256, tie_embeddings=False), 16_584_960),  # Llama-16M teacher
    (ModelConfig("gpt2", 768, 3072, 12, 12, 256, tie_embeddings=True), 97_540_608),  # GPT2-97M teacher
    (ModelConfig("llama", 512, 1024, 16, 8, 256, tie_embeddings=False), 58_343_936),  # Llama-58M student
])
def test_seed_shapes_have_the_recipe_parameter_counts(shape, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model(shape, 16000, SPECIAL)
    assert count_parameters(model) == expected


def test_tying_ffn_width_and_special_ids():
    tied = build_model(ModelConfig("gpt2", 32, 48, 2, 4, 16, tie_embeddings=True), 300, SPECIAL)
    untied = build_model(ModelConfig("llama", 32, 48, 2, 4, 16, tie_embeddings=False), 300, SPECIAL)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert tied.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)  # n_inner = intermediate_size
    assert untied.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    for model in (tied, untied):
        assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
        assert model.config.vocab_size == 300 and model.config.max_position_embeddings == 16


def test_init_follows_the_global_seed():
    shape = ModelConfig("llama", 32, 48, 2, 4, 16)
    torch.manual_seed(7)
    a = build_model(shape, 300, SPECIAL)
    torch.manual_seed(7)
    b = build_model(shape, 300, SPECIAL)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
