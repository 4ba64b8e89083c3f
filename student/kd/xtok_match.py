"""The token-matching cross-tokenizer form: at each shared byte boundary, the teacher's top-k tokens whose bytes
are a run token, as those run tokens, and all of the teacher's other mass as one tail class.

At a run position j whose token ends where teacher token i ends (the store's `align`), both models predict the
token that starts at the same byte. The teacher's top-k ids at i are mapped to run ids through the group's
`vocab_map` (the run token with the same bytes); p_m = exp(logit_m / T - lse_T) for each matched id, and
p_tail = 1 - sum p_m is the mass of unmatched top-k tokens and everything outside the top-k. The term is T^2 ·
KL(p || q) over the matched run ids plus one tail class holding the student's mass on every other run token, as
the same-tokenizer tail form (kd.tail) does; 0 at positions with no shared boundary. Unmatched slots repeat the
row's first matched id with p = 0 (no class of their own); a boundary where no top-k token matches has the tail
class alone, whose KL is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.student.kd.form import TINY, KDForm, Targets, cross_entropy_terms, plogp


def aligned_topk(arrays: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The alignment [B, L] and, at each run position, the teacher's top-k logits and ids [B, L, k] and lse [B, L]
    at the teacher token ending there (that of token 0 where none does: masked by the callers)."""
    align = arrays["align"].long()
    at = align.clamp_min(0)
    k = arrays["t_topk_ids"].shape[-1]
    logits = arrays["t_topk_logits"].float().gather(1, at.unsqueeze(-1).expand(-1, -1, k))
    teacher_ids = arrays["t_topk_ids"].long().gather(1, at.unsqueeze(-1).expand(-1, -1, k))
    return align, logits, teacher_ids, arrays["t_lse"].float().gather(1, at)


def matched_targets(arrays: dict[str, Tensor], temperature: float) -> Targets:
    """The teacher's distribution over matched run ids + tail at every run position [B, L, k] (0 where unaligned)."""
    align, logits, teacher_ids, lse = aligned_topk(arrays)
    run_ids = arrays["vocab_map"].long()[teacher_ids]
    matched = run_ids >= 0
    log_p = torch.where(matched, logits / temperature - lse.unsqueeze(-1), -torch.inf)
    log_mass = torch.logsumexp(log_p, dim=-1)
    log_p = log_p - log_mass.clamp_min(0).unsqueeze(-1)  # float16 logits can overshoot a mass of 1 by rounding
    aligned = (align >= 0) & matched.any(-1)
    p = torch.where(aligned.unsqueeze(-1), log_p.exp(), 0)
    p_tail = torch.where(aligned, (-torch.expm1(log_mass)).clamp_min(0), 0)
    first = run_ids.gather(-1, matched.int().argmax(-1, keepdim=True)).clamp_min(0)
    return Targets(torch.where(matched, run_ids, first), p, log_p, p_tail)


class TokenMatchForm(KDForm):
    """KL over the teacher's top-k tokens that are run tokens, plus one class for the rest, at shared boundaries."""

    name = "xtok_match"
    arrays = ("align", "t_topk_logits", "t_topk_ids", "t_lse")
    repeats_ids = True  # unmatched slots repeat the row's first matched id
    constants = ("vocab_map",)

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        return matched_targets(arrays, temperature)

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        ids, p, log_p, p_tail, _ = matched_targets(arrays, temperature)
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        listed = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, ids, True)
        q_tail = torch.where(listed, 0, log_q.exp()).sum(-1)
        tail = plogp(p_tail, torch.log(p_tail)) - p_tail * q_tail.clamp_min(TINY).log()
        return (cross_entropy_terms(p, log_p, log_q.gather(-1, ids)) + tail) * temperature**2
