"""The run's tokenizer as a Hugging Face directory: the BabyLlama BPE trained on the train split, or a pretrained one.

Trained: NFKC normaliser, ByteLevel pre-tokenizer with add_prefix_space (so a line's first word is tokenised
like any other word), specials `<pad>`, `<s>`, `</s>` = ids 0, 1, 2, no unknown token (bytes cover
everything). The directory also carries vocab.json + merges.txt for loaders of the slow GPT-2 tokenizer.
Pretrained (`tokenizer.pretrained`: a directory or hub id, loaded the way transformers loads any): its files
are copied byte for byte, so its tokenizer.json sha256 is the one its model's directory has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import cached_file

from kdcache.files import staged
from kdcache.errors import KdcacheError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2 in this order
# A pretrained tokenizer's files that the run keeps (the fast tokenizer's, its configuration, and those of the
# slow tokenizer for the loaders that want it); tokenizer.json is required.
PRETRAINED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model")


class TokenizerError(KdcacheError):
    """A tokenizer that cannot be trained or loaded; the message names the file."""


def byte_level(model: models.Model) -> Tokenizer:
    """An untrained tokenizer of `model` with the run's normaliser, byte-level pre-tokenizer and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(corpus_file: Path, vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus_file)], trainer)
    got = tokenizer.get_vocab_size()
    if got < vocab_size:
        raise TokenizerError(
            f"{corpus_file}: tokenizer.vocab_size {vocab_size} is larger than this corpus supports: "
            f"BPE with min_frequency {min_frequency} stops at {got} tokens; set tokenizer.vocab_size <= {got}"
        )
    return tokenizer


def train_unigram(corpus_file: Path, vocab_size: int) -> Tokenizer:
    """A byte-level Unigram LM tokenizer (a teacher's own, for cross-tokenizer distillation): the same normaliser,
    pre-tokenizer, specials and byte coverage as `train_bpe`, but Unigram's segmentations instead of BPE's merges."""
    tokenizer = byte_level(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(corpus_file)], trainer)
    return tokenizer


def save_hf_directory(tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.json, merges.txt
    # Written by hand rather than by save_pretrained: transformers 5 names its own backend class there,
    # which transformers 4 (the BabyLM evaluation pipelines) cannot load.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "unk_token": None,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,  # keep " ." as is: decode must invert encode
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", SPECIAL_TOKENS)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def train_tokenizer(corpus_file: Path, vocab_size: int, min_frequency: int, out_dir: Path,
                    model: str = "bpe") -> PreTrainedTokenizerFast:
    """Train on `corpus_file` (BPE, or a Unigram LM) and save to `out_dir` (replaced only once complete)."""
    tokenizer = train_bpe(corpus_file, vocab_size, min_frequency) if model == "bpe" else train_unigram(corpus_file, vocab_size)
    with staged(out_dir) as tmp:
        save_hf_directory(tokenizer, tmp)
    return load_tokenizer(out_dir)


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerFast:
    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json here (run `kdcache data` first)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _hub_file(source: str, name: str) -> str | None:
    """`name` of a directory or hub id, as transformers resolves it (None: not there)."""
    try:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError) as e:  # no such directory, hub id unreachable or malformed
        raise TokenizerError(f"{source}: cannot load tokenizer.pretrained ({str(e).splitlines()[0]})") from None


def load_pretrained(source: str) -> PreTrainedTokenizerFast:
    """A pretrained tokenizer, through transformers' AutoTokenizer (a directory or a hub id alike); fast only."""
    if _hub_file(source, "tokenizer.json") is None:
        raise TokenizerError(f"{source}: no tokenizer.json (kdcache needs a fast tokenizer; a slow-only one can be "
                             "converted with transformers' AutoTokenizer(...).save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{source}: cannot load tokenizer.pretrained ({str(e).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise TokenizerError(f"{source}: AutoTokenizer loads a slow tokenizer; kdcache needs a fast one")
    return tokenizer


def copy_pretrained(source: str, out_dir: Path) -> None:
    """The pretrained tokenizer's files copied to `out_dir` byte for byte (replaced only once complete)."""
    with staged(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name in PRETRAINED_FILES:
            if (path := _hub_file(source, name)) is not None:
                shutil.copyfile(path, tmp / name)


def token_id_count(tokenizer: PreTrainedTokenizerFast) -> int:
    """1 + the largest id the tokenizer can emit (added tokens included)."""
    return 1 + max(tokenizer.get_vocab().values())


def model_vocab_size(source: str) -> int | None:
    """The vocab_size of the model config.json beside a pretrained tokenizer, if there is one: the embedding size,
    which GPT-2 and Qwen pad beyond the tokenizer's ids."""
    path = _hub_file(source, "config.json")
    if path is None:
        return None
    value = json.loads(Path(path).read_text(encoding="utf-8")).get("vocab_size")
    return value if isinstance(value, int) else None
