"""The projection cross-tokenizer form: at each shared byte boundary, the student's next-token distribution carried
into the teacher's vocabulary (each run token counts for the teacher token its bytes begin with) and compared there
with the teacher's, over its top-k plus one tail class.

Both models predict the token that starts at the same byte, but the two tokenizers cut the text differently: where
the teacher's tokenizer is finer, its next token ` th` stands for every continuation it cuts that way (` the`,
` theory`, ...), and matching it to the run token ` th` (kd.xtok_match) asks the student for an event its own
tokenizer rarely produces. Here the event is the teacher's: the student's probability of teacher token u is
Q_u = sum of q_v over the run tokens v whose bytes begin with u (u is the longest teacher token v's bytes begin with:
the group's `prefix_map`). The term is T^2 · KL(p || Q) over the teacher's top-k ids that some run token counts for,
plus a tail class (the teacher's other mass; the student's mass on every other teacher token), 0 at positions with
no shared boundary. p_u = exp(logit_u / T - lse_T) is exact, as in the tail form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.student.kd.form import TINY, KDForm, Targets, cross_entropy_terms, plogp
from kdcache.student.kd.xtok_match import aligned_topk


def projected_targets(arrays: dict[str, Tensor], temperature: float) -> Targets:
    """The teacher's distribution over its top-k ids + tail at every run position [B, L, k] (0 where unaligned),
    and each run token's class: its prefix_map teacher id, or the last column (no teacher token: always tail)."""
    align, logits, teacher_ids, lse = aligned_topk(arrays)
    prefix, none = arrays["prefix_map"].long(), len(arrays["vocab_map"])
    classes = torch.where(prefix >= 0, prefix, none)
    counted = torch.zeros(none + 1, dtype=torch.bool, device=prefix.device).index_fill_(0, classes, True)
    counted[none] = False
    has = counted[teacher_ids]  # a teacher token no run token counts for: its mass joins the tail
    log_p = torch.where(has, logits / temperature - lse.unsqueeze(-1), -torch.inf)
    log_mass = torch.logsumexp(log_p, dim=-1)
    log_p = log_p - log_mass.clamp_min(0).unsqueeze(-1)  # float16 logits can overshoot a mass of 1 by rounding
    aligned = align >= 0
    p = torch.where(aligned.unsqueeze(-1), log_p.exp(), 0)
    p_tail = torch.where(aligned, (-torch.expm1(log_mass)).clamp_min(0), 0)
    return Targets(teacher_ids, p, log_p, p_tail, classes)


class ProjectionForm(KDForm):
    """KL in the teacher's vocabulary: its top-k plus a tail against the student's mass gathered by token prefix."""

    name = "xtok_project"
    arrays = ("align", "t_topk_logits", "t_topk_ids", "t_lse")
    constants = ("vocab_map", "prefix_map")

    def class_count(self, arrays: dict[str, Tensor]) -> int:
        vocab_map = arrays.get("vocab_map")  # one entry per teacher id; a missing one is refused by the engine
        return 0 if vocab_map is None else len(vocab_map) + 1  # and a column for run tokens that begin with none

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        return projected_targets(arrays, temperature)

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        ids, p, log_p, p_tail, classes = projected_targets(arrays, temperature)
        q = torch.softmax(student_logits.float() / temperature, dim=-1)
        mass = q.new_zeros(*q.shape[:-1], self.class_count(arrays)).index_add(-1, classes, q)
        q_ids = mass.gather(-1, ids).clamp_min(TINY)
        q_tail = mass.scatter(-1, ids, 0.0).sum(-1).clamp_min(TINY)
        tail = plogp(p_tail, torch.log(p_tail)) - p_tail * q_tail.log()
        return (cross_entropy_terms(p, log_p, q_ids.log()) + tail) * temperature**2
