"""Evaluation: held-out cross-entropy on a store's tokens/dev, and minimal-pair accuracy on BLiMP-format jsonl files.

Minimal pairs follow the 2024 BabyLM pipeline: a sentence's score is the sum of its token log-probabilities
given the BOS token, the continuation being " " + sentence encoded without special tokens (no length
normalisation); a pair is right when score(good) >= score(bad) -- a tie counts as right, as the 2024 pipeline's
argmax takes the first (good) option. Accuracy is per paradigm (file), then the plain mean over paradigms.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdcache.cache.schema import StoreError, tokenizer_sha256
from kdcache.config import Config, run_paths
from kdcache.errors import KdcacheError
from kdcache.runtime import resolve_device
from kdcache.student.data import TokenDataset
from kdcache.student.export import check_vocab, load_model_dir, load_tokenizer, read_training_state
from kdcache.student.lm import next_token_ce
from kdcache.student.model import count_parameters

CONVENTION = "2024: prefix [bos], continuation ' ' + sentence, sum of log-probs, tie = right, mean over paradigms"
Pair = tuple[str, str]


class EvalError(KdcacheError):
    """A model or pair file that cannot be evaluated; the message names the file (and line)."""


def load_model(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model directory with its own tokenizer, in float32 and eval mode on the best device."""
    model = load_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_vocab(tokenizer, model.config.vocab_size, model_dir)
    return model.to(resolve_device()).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Held-out loss.


@torch.no_grad()
def dev_loss(model: PreTrainedModel, dataset: TokenDataset, batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) over every predicted position of the split, and its perplexity."""
    dataset.check_model(model.config)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids = torch.from_numpy(dataset.tokens[start : start + batch_size].astype("int64")).to(model.device)
        total += next_token_ce(model(input_ids=ids, use_cache=False).logits, ids, reduction="sum").item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    ce = total / count
    return {"ce": ce, "perplexity": math.exp(ce), "tokens": count}


# ---------------------------------------------------------------------------------------------------------------
# Minimal pairs.


def read_pairs(path: Path) -> list[Pair]:
    """(good, bad) sentences of one BLiMP-format jsonl file; any empty or malformed line is an error."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{number}"
        if not line.strip():
            raise EvalError(f"{where}: empty line")
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(item).__name__}")
        for key in ("sentence_good", "sentence_bad"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise EvalError(f"{where}: {key!r} missing or not a non-empty string")
        pairs.append((item["sentence_good"], item["sentence_bad"]))
    if not pairs:
        raise EvalError(f"{path}: no minimal pairs (empty file)")
    return pairs


def read_pair_dir(directory: str | Path, limit: int = 0) -> dict[str, list[Pair]]:
    """Paradigm (file stem) -> pairs, for every *.jsonl file of a directory (the first `limit` of each, if > 0)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalError(f"{directory}: minimal-pair directory not found")
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise EvalError(f"{directory}: no *.jsonl files")
    return {f.stem: read_pairs(f)[:limit or None] for f in files}


def encode_sentences(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> list[list[int]]:
    """[bos] (eos where the tokenizer has no bos) + the tokens of " " + sentence ("\\n" inside a sentence stays text:
    byte-level BPE encodes it)."""
    encoded = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [[prefix, *ids] for ids in encoded]


@torch.no_grad()
def score_sequences(model: PreTrainedModel, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """Sum of log p(token_t | tokens_<t) over t >= 1 of each sequence, in batches of similar lengths
    (right-padded, masked)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(sequences[chunk[0]])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        # log-softmax at the targets only: no [B, L, V] log-probability tensor
        logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
        sums = (logp * mask[:, 1:]).sum(1).double().tolist()
        for row, i in enumerate(chunk):
            scores[i] = sums[row]
    return scores


def check_lengths(directory: Path, paradigms: dict[str, list[Pair]], sequences: list[list[int]], limit: int) -> None:
    """Refuse a sentence longer than the model's context, naming its file and line."""
    lines = [(name, number) for name, pairs in paradigms.items() for number in range(1, len(pairs) + 1)]
    for i, seq in enumerate(sequences):
        if len(seq) > limit:
            name, number = lines[i // 2]
            raise EvalError(f"{directory / name}.jsonl:{number}: {len(seq)} tokens with BOS, "
                            f"more than the model's {limit} positions")


def minimal_pair_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path, batch_size: int, limit: int = 0
) -> dict[str, Any]:
    """Accuracy per paradigm and the plain mean over paradigms of one directory of jsonl files (the first `limit`
    pairs of each paradigm, if > 0)."""
    paradigms = read_pair_dir(directory, limit)
    sentences = [s for pairs in paradigms.values() for pair in pairs for s in pair]
    sequences = encode_sentences(tokenizer, sentences)
    check_lengths(Path(directory), paradigms, sequences, model.config.max_position_embeddings)
    started = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked: any id serves
    scores = iter(score_sequences(model, sequences, batch_size, pad_id))
    seconds = time.perf_counter() - started
    accuracy = {}
    for name, pairs in paradigms.items():
        right = sum(good >= bad for good, bad in ((next(scores), next(scores)) for _ in pairs))
        accuracy[name] = right / len(pairs)
    n_pairs = len(sentences) // 2
    return {"mean": sum(accuracy.values()) / len(accuracy), "paradigms": accuracy, "pairs": n_pairs,
            "pairs_per_s": n_pairs / seconds}


# ---------------------------------------------------------------------------------------------------------------
# Reports.


def evaluate_model(
    source: str | Path, *, store: str | Path | None = None, pair_dirs: Iterable[str | Path] = (), batch_size: int = 64,
    pairs_per_paradigm: int = 0,
) -> dict[str, Any]:
    """One model's report: parameters, dev loss on the store (if given), minimal-pair accuracy per directory (the
    first `pairs_per_paradigm` pairs of each paradigm, if > 0)."""
    model, tokenizer = load_model(source)
    training = read_training_state(source) or {}  # a model kdcache trained: the words it saw (BabyLM's budget)
    report: dict[str, Any] = {"source": str(source), "parameters": count_parameters(model), "convention": CONVENTION,
                              "step": training.get("step"), "words_seen": training.get("words_seen")}
    if store is not None:
        dataset = TokenDataset(store, "dev")
        if tokenizer_sha256(source) != dataset.attrs["tokenizer_sha256"]:
            raise StoreError(f"{source}: the model's tokenizer is not the one the tokens of {store} were made with")
        report["dev"] = dev_loss(model, dataset, batch_size)
    report["minimal_pairs"] = {str(d): minimal_pair_accuracy(model, tokenizer, d, batch_size, pairs_per_paradigm)
                               for d in pair_dirs}
    return report


def compare(reports: Mapping[str, Mapping[str, Any]], paradigms: bool = True) -> str:
    """The reports side by side: one column per model, one row per metric, aligned."""
    rows: list[tuple[str, list[str]]] = [("parameters", [f"{r['parameters'] / 1e6:.2f}M" for r in reports.values()])]
    if any(r.get("words_seen") is not None for r in reports.values()):
        rows.append(("words seen", [f"{r['words_seen']:,}" if r.get("words_seen") is not None else "-"
                                    for r in reports.values()]))
    if any("dev" in r for r in reports.values()):
        rows.append(("dev ce", [f"{r['dev']['ce']:.4f}" if "dev" in r else "-" for r in reports.values()]))
        rows.append(("dev perplexity", [f"{r['dev']['perplexity']:.2f}" if "dev" in r else "-" for r in reports.values()]))
    directories = list(dict.fromkeys(d for r in reports.values() for d in r["minimal_pairs"]))
    for directory in directories:
        results = [r["minimal_pairs"].get(directory) for r in reports.values()]
        rows.append((f"{directory} mean", [f"{x['mean']:.4f}" if x else "-" for x in results]))
        if paradigms:
            names = list(dict.fromkeys(p for x in results if x for p in x["paradigms"]))
            for name in names:
                rows.append((f"  {name}", [f"{x['paradigms'][name]:.4f}" if x and name in x["paradigms"] else "-"
                                           for x in results]))
    header = ("", list(reports))
    label_width = max(len(label) for label, _ in [header, *rows])
    widths = [max(len(cells[i]) for _, cells in [header, *rows]) for i in range(len(reports))]
    lines = [f"{label:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
             for label, cells in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def model_name(model_dir: str | Path, run: Mapping[str, str] | None = None) -> str:
    """The name of a model's column and report: runs/x/teachers/llama/model -> llama, any other directory -> its own.

    With `run` (a run's models, `run_models`), whose reports share runs/<name>/eval/, one of the run's models keeps
    its name there and any other directory gets a digest of its path as well (other/student/model ->
    student-1a2b3c4d), so that its report cannot replace the run's own."""
    path = Path(model_dir).resolve()
    name = path.parent.name if path.name == "model" else path.name
    if run is None:
        return name
    own = [key for key, source in run.items() if Path(source).resolve() == path]
    return own[0] if own else f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def run_models(cfg: Config, runs_root: str | Path = "runs") -> dict[str, str]:
    """Every teacher and student model a run can have, trained or not: name -> directory (or hub id)."""
    paths = run_paths(cfg, runs_root)
    models = {t.name: paths.teacher_model(t) for t in cfg.teachers}
    return models | {"student": str(paths.student / "model"), "baseline": str(paths.baseline / "model"),
                     "online": str(paths.online / "model")}
