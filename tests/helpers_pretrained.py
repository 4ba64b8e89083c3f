"""A pretrained model as a hub repository holds it, built locally: a word-level tokenizer whose words sit at ids
beyond 65,535 and a random-weight tiny Llama whose embedding is padded past the tokenizer's ids."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdcache.precompute.grammar import generate_corpus, generate_minimal_pairs

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TOKENIZER_IDS = 150_000  # ids the tokenizer emits: 0..149,999
PADDED_VOCAB = 150_016  # the model's embedding rows, as GPT-2 and Qwen pad theirs
FIRST_WORD_ID = 100_000  # the corpus words: every one of them is an id above 65,535
REPO = Path(__file__).resolve().parents[1]
SEED, SENTENCES, SEQ = 7, 60, 16  # the demo corpus of the hub config's tests


def demo_words(seed: int, sentences: int) -> list[str]:
    """Every word and punctuation mark of the demo corpus (train, dev) and its minimal pairs, for `seed`."""
    split = pre_tokenizers.Whitespace()
    lines = generate_corpus(sentences, seed) + generate_corpus(sentences, seed + 1)
    lines += [r[key] for records in generate_minimal_pairs(50, seed + 2).values() for r in records
              for key in ("sentence_good", "sentence_bad")]
    return sorted({piece for line in lines for piece, _ in split.pre_tokenize_str(line)})


def save_word_tokenizer(out_dir: Path, words: list[str], ids: int = TOKENIZER_IDS,
                        first_word: int = FIRST_WORD_ID) -> PreTrainedTokenizerFast:
    """A fast tokenizer of `ids` ids: the specials, filler entries, and `words` from id `first_word` on."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<filler{i}>": i for i in range(len(SPECIALS), first_word)})
    vocab.update({word: first_word + i for i, word in enumerate(words)})
    vocab.update({f"<filler{i}>": i for i in range(first_word + len(words), ids)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_random_llama(out_dir: Path, tokenizer: PreTrainedTokenizerFast, vocab_size: int = PADDED_VOCAB,
                      seq_len: int = 64) -> Path:
    """A random-weight tiny Llama beside its tokenizer's files, as a hub model repository holds them."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hub_config(root: Path) -> Path:
    """configs/hub_teacher.yaml on the demo corpus with tiny shapes (the hub id comes from HUB_TEACHER)."""
    cfg = yaml.safe_load((REPO / "configs" / "hub_teacher.yaml").read_text())
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "max_position": SEQ}
    cfg.update(
        seed=SEED,
        corpus={"kind": "demo", "demo_train_sentences": SENTENCES, "demo_dev_sentences": SENTENCES,
                "demo_pairs_per_phenomenon": 2},
        data={"seq_len": SEQ, "sequences_per_shard": 16},
        student={**cfg["student"], **tiny},
        student_train={"lr": 1e-2, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 4,
                       "log_every": 1},
        eval={"minimal_pair_dirs": [str(root / "runs" / "hub_teacher" / "pairs")], "batch_size": 16})
    cfg["cache"].update(batch_size=8, samples=16)
    path = root / "hub_teacher.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
