"""A model as a Hugging Face directory that `AutoModelForCausalLM` and `AutoTokenizer` load unchanged.

config.json (with the bos/eos/pad ids), model.safetensors, generation_config.json and the run's tokenizer files
(tokenizer.json for the fast tokenizer, vocab.json + merges.txt for the slow GPT-2 one the 2023 BabyLM pipeline
loads): what the official BabyLM evaluation pipelines need. A model kdcache trained also gets kdcache_training.json
(the step and words seen of these weights), which the reports and learning curves read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdcache.errors import KdcacheError
from kdcache.files import staged

TRAINING_STATE = "kdcache_training.json"
WORD_CHECKPOINTS = "checkpoints/chck_*"  # student.words names them; one complete HF directory each
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


def read_training_state(model_dir: str | Path) -> dict | None:
    """What kdcache_training.json of a model directory records (step, words_seen, ...); None without one."""
    path = Path(model_dir) / TRAINING_STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def export_model(model: PreTrainedModel, tokenizer_dir: str | Path, out_dir: str | Path,
                 training: dict | None = None) -> Path:
    """Save `model` with the tokenizer of `tokenizer_dir` to `out_dir`, replacing it only once complete; `training`
    (step, words seen) goes to its kdcache_training.json."""
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
        if training is not None:
            (tmp / TRAINING_STATE).write_text(json.dumps(training, indent=2) + "\n")
    return out_dir


def word_checkpoints(training_dir: str | Path) -> list[tuple[dict, Path]]:
    """The chck_* directories a training run saved, with the training state each records, by the count each was
    saved at."""
    found = [(state, directory) for directory in Path(training_dir).glob(WORD_CHECKPOINTS)
             if directory.is_dir() and (state := read_training_state(directory)) is not None]
    return sorted(found, key=lambda item: item[0]["checkpoint_words"])


def submission_branches(run: str | Path) -> tuple[Path, dict[str, Path]]:
    """The training directory of RUN (runs/<name>, whose student it takes, or a training directory itself) and its
    BabyLM branches: `main` = the final model, then chck_<N>M for every checkpoint by words seen."""
    run = Path(run)
    training_dir = run / "student" if (run / "student" / "model").is_dir() else run
    if not (training_dir / "model").is_dir():
        raise ExportError(f"{run}: no trained model here (give runs/<name> or a training directory holding model/)")
    return training_dir, {"main": training_dir / "model",
                          **{directory.name: directory for _, directory in word_checkpoints(training_dir)}}


def export_submission(run: str | Path, out: str | Path, repo: str) -> list[str]:
    """BabyLM's submission layout in `out` (one folder per branch, each a complete HF directory, written atomically)
    and the `huggingface-cli upload` line of each branch, also written to out/upload.sh; returns those lines."""
    _, branches = submission_branches(run)
    out = Path(out)
    lines = [f"huggingface-cli upload {repo} {out / branch} . --revision {branch}" for branch in branches]
    with staged(out) as tmp:
        for branch, source in branches.items():
            shutil.copytree(source, tmp / branch)
        (tmp / "upload.sh").write_text("#!/bin/sh\n# main first: a new branch starts from main's files (all replaced)\n"
                                       "set -e\n" + "".join(line + "\n" for line in lines))
    return lines
