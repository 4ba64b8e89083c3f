"""Language models from the config's shapes: Hugging Face `LlamaForCausalLM` or `GPT2LMHeadModel`, freshly initialised."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from kdcache.config import ModelConfig


def hf_config(model_cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int]) -> PretrainedConfig:
    """The Hugging Face config of a model shape; the special ids travel with it so exports load unchanged."""
    ids = {"bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"], "pad_token_id": special_ids["pad"]}
    if model_cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size,
            num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads,
            num_key_value_heads=model_cfg.num_heads,
            max_position_embeddings=model_cfg.max_position,
            tie_word_embeddings=model_cfg.tie_embeddings,
            **ids,
        )
    # GPT-2 keeps its default dropout (0.1), as BabyLlama's GPT-2 teacher did.
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=model_cfg.hidden_size,
        n_inner=model_cfg.intermediate_size,
        n_layer=model_cfg.num_layers,
        n_head=model_cfg.num_heads,
        n_positions=model_cfg.max_position,
        tie_word_embeddings=model_cfg.tie_embeddings,
        **ids,
    )


def build_model(
    model_cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int], attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A randomly initialised causal LM (seed the global torch RNG first for a reproducible init)."""
    config = hf_config(model_cfg, vocab_size, special_ids)
    config._attn_implementation = attn_implementation
    cls = LlamaForCausalLM if model_cfg.arch == "llama" else GPT2LMHeadModel
    return cls(config)


def count_parameters(model: PreTrainedModel) -> int:
    """Distinct parameters: a tied embedding and LM head count once."""
    return sum(p.numel() for p in model.parameters())
