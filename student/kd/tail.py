"""The tail form: KL over the k cached ids plus one class for the rest of the vocabulary, p exact through the lse."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.student.kd.form import TINY, KDForm, Targets, cross_entropy_terms, plogp


def tail_targets(topk_logits: Tensor, lse: Tensor, temperature: float, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Teacher log-probabilities of the cached ids at T and the tail mass outside them, in float32.

    The top-k logits are float16 while the lse came from the full-precision logits, so the cached mass can
    overshoot 1 by rounding when the tail is tiny; it is then renormalised so p stays a distribution.
    """
    log_p = topk_logits.float() / temperature - lse.float().unsqueeze(-1)
    log_mass = torch.logsumexp(log_p, dim=-1)
    log_p = log_p - log_mass.clamp_min(0).unsqueeze(-1)
    p_tail = (-torch.expm1(log_mass)).clamp_min(0)
    if topk_logits.shape[-1] >= vocab_size:
        p_tail = torch.zeros_like(p_tail)  # no tail class exists; any residue is rounding
    return log_p, p_tail


def tail_bucket_kl(
    student_logits: Tensor, topk_logits: Tensor, topk_ids: Tensor, teacher_lse: Tensor, temperature: float
) -> Tensor:
    """Per-position T^2 · KL(p || q) over k+1 classes: the k cached ids plus one tail class (every other token).

    p is exact: p_i = exp(topk_i/T - lse_T), p_tail = 1 - sum p_i. q = softmax(student/T) gathered at the ids;
    q_tail is summed directly over the non-cached tokens (instead of 1 - sum q_i) so it has full relative
    precision even when the student puts almost all its mass on the top-k. Shapes: [..., V], [..., k], [..., k],
    [...] -> [...].
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk_ids.long()
    log_q_ids = log_q.gather(-1, ids)
    q_tail = log_q.exp().scatter(-1, ids, 0.0).sum(-1)
    log_p, p_tail = tail_targets(topk_logits, teacher_lse, temperature, student_logits.shape[-1])
    tail = plogp(p_tail, torch.log(p_tail)) - p_tail * q_tail.clamp_min(TINY).log()
    return (cross_entropy_terms(log_p.exp(), log_p, log_q_ids) + tail) * temperature**2


class TailForm(KDForm):
    """The cached top-k, exact p through the full-vocabulary lse, and the rest of the vocabulary as one class."""

    name = "tail"
    arrays = ("topk_logits", "topk_ids", "lse")

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        log_p, p_tail = tail_targets(arrays["topk_logits"], arrays["lse"], temperature, vocab_size)
        return Targets(arrays["topk_ids"], log_p.exp(), log_p, p_tail)

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        return tail_bucket_kl(student_logits, arrays["topk_logits"], arrays["topk_ids"], arrays["lse"], temperature)
