"""A model as a Hugging Face directory that `AutoModelForCausalLM` and `AutoTokenizer` load unchanged.

config.json (with the bos/eos/pad ids), model.safetensors, generation_config.json and the run's tokenizer files
(tokenizer.json for the fast tokenizer, vocab.json + merges.txt for the slow GPT-2 one the 2023 BabyLM pipeline
loads): what the official BabyLM evaluation pipelines need.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdcache.errors import KdcacheError
from kdcache.files import staged

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


class ExportError(KdcacheError):
    """A model and tokenizer that cannot be exported together; the message names the directory."""


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"{path}: no tokenizer.json here")
    return AutoTokenizer.from_pretrained(str(path))


def load_model_dir(model_dir: str | Path) -> PreTrainedModel:
    """A Hugging Face model directory, in float32."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ExportError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: no config.json here (not a Hugging Face model directory)")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, where: str | Path) -> None:
    """Refuse a model without an embedding for every id of the tokenizer (one padded beyond them is fine)."""
    if len(tokenizer) > vocab_size:
        raise ExportError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}")


def export_model(model: PreTrainedModel, tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """Save `model` with the tokenizer of `tokenizer_dir` to `out_dir`, replacing it only once complete."""
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, model.config.vocab_size, tokenizer_dir)
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    with staged(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    return out_dir
