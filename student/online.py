"""The online baseline: the same student distilled from teachers held in memory with a dense KL (what kdcache avoids).

It exists only to be compared against (`kdcache distill --online`, runs/<name>/online); it is the one distill path
that loads teacher weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kdcache.cache.schema import StoreError, tokenizer_sha256
from kdcache.config import Config, run_paths
from kdcache.precompute.teachers import own_tokenizer
from kdcache.runtime import init_distributed
from kdcache.student.lm import next_token_ce
from kdcache.student.loop import LossFn


def dense_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the full vocabulary, per position, plain autograd."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def load_online_teachers(cfg: Config, runs_root: str | Path, vocab_size: int) -> dict[str, nn.Module]:
    """Every teacher in memory, frozen, on the training device."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - the cached path never needs it

    device = init_distributed().device
    paths = run_paths(cfg, runs_root)
    teachers = {}
    run_tokenizer = tokenizer_sha256(paths.tokenizer)
    for t in cfg.teachers:
        source = paths.teacher_model(t)
        if own_tokenizer(source, run_tokenizer) is not None:
            raise StoreError(f"{source}: teacher {t.name!r} has its own tokenizer; online KD compares distributions id "
                             "by id: distil it from the cache with form xtok_chunk or xtok_match")
        model = AutoModelForCausalLM.from_pretrained(source).to(device).eval().requires_grad_(False)
        if model.config.vocab_size != vocab_size:
            raise StoreError(f"{source}: teacher vocab_size {model.config.vocab_size} != store's {vocab_size}")
        teachers[t.name] = model
    return teachers


def make_online_loss(teachers: dict[str, nn.Module], weights: dict[str, float], hard_weight: float,
                     temperature: float) -> LossFn:
    """CE + weighted dense KL to teachers run on every batch."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(input_ids=batch["input_ids"]).logits
        ce = next_token_ce(logits, batch["input_ids"])
        total, terms = hard_weight * ce, {"hard_ce": ce.detach()}
        for name, teacher in teachers.items():
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits
            kl = dense_kl(logits, teacher_logits, temperature).mean()
            total = total + weights.get(name, 0.0) * kl
            terms[f"kl/{name}"] = kl.detach()
        return total, terms

    return loss_fn
