"""The renorm form (DistillKit's "zero"): the cached top-k renormalised, the mass outside it treated as zero."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.student.kd.form import KDForm, Targets, cross_entropy_terms


def renorm_log_p(topk_logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(topk_logits.float() / temperature, dim=-1)


def renormalized_topk_kl(student_logits: Tensor, topk_logits: Tensor, topk_ids: Tensor, temperature: float) -> Tensor:
    """Per-position DistillKit "zero" KL, times T^2.

    Definition: p = softmax(topk_logits/T) over the k ids (mass outside them treated as zero),
    log q_i = log_softmax(student/T)[id_i] over the full vocabulary, NOT renormalised over the ids;
    loss = T^2 · sum_i p_i (log p_i - log q_i). Since sum_i q_i <= 1 this is >= KL(p || q renormalised) >= 0.
    """
    log_q_ids = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_ids.long())
    log_p = renorm_log_p(topk_logits, temperature)
    return cross_entropy_terms(log_p.exp(), log_p, log_q_ids) * temperature**2


class RenormForm(KDForm):
    """p = softmax over the cached top-k only; needs no lse."""

    name = "renorm"
    arrays = ("topk_logits", "topk_ids")

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        log_p = renorm_log_p(arrays["topk_logits"], temperature)
        return Targets(arrays["topk_ids"], log_p.exp(), log_p, None)

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        return renormalized_topk_kl(student_logits, arrays["topk_logits"], arrays["topk_ids"], temperature)
