"""The chunk-likelihood cross-tokenizer form (after ALM, Minixhofer et al. 2025): text chunks between shared byte
boundaries, the student's and the teacher's likelihood of each chunk matched as two Bernoulli distributions.

A boundary is a run position j whose token ends at the same byte as a teacher token (the store's `align`). Between
consecutive boundaries j' < j, the chunk is the bytes of run tokens j'+1..j; the student's log-likelihood of it is
b = sum_{t=j'}^{j-1} log q_T(x_{t+1}) and the teacher's a = sum_{i=align[j']}^{align[j]-1} log p_T(y_{i+1}) (its own
tokens, from the cached logit of its actual next token and its lse at T). The term at j is T^2 times the binary KL
    KL(Bern(e^a) || Bern(e^b)) = e^a (a - b) + (1 - e^a)(log(1 - e^a) - log(1 - e^b)),
and 0 at positions that end no chunk. Only the teacher's log-probability of its own next tokens is read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcache.student.kd.form import LabelForm

EPS = 1e-6  # a chunk log-likelihood is at most -EPS: log(1 - e^0) is -inf


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(Bern(e^a) || Bern(e^b)) from log-probabilities a (target) and b."""
    a, b = a.clamp_max(-EPS), b.clamp_max(-EPS)
    return a.exp() * (a - b) + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))


def chunk_pairs(align: Tensor) -> tuple[Tensor, Tensor]:
    """For each run position j [B, L]: the previous boundary j' (-1: none) and whether j ends a chunk."""
    aligned = align >= 0
    positions = torch.arange(align.shape[-1], device=align.device).expand_as(align)
    last = torch.where(aligned, positions, -1).cummax(dim=-1).values  # the latest boundary at or before j
    previous = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    return previous, aligned & (previous >= 0)


def exclusive_cumsum(x: Tensor) -> Tensor:
    """[B, n] -> [B, n + 1]: out[:, j] = sum of x[:, :j], in float64 (differences of long sums stay exact)."""
    return torch.cat([torch.zeros_like(x[:, :1], dtype=torch.float64), x.double().cumsum(-1)], dim=1)


def teacher_log_probs(arrays: dict[str, Tensor], temperature: float) -> Tensor:
    """log p_T of the teacher's actual next token at each teacher position [B, Lt] (padding and a sequence's last
    token hold no next token: chunks never reach them)."""
    return arrays["t_next_logit"].float() / temperature - arrays["t_lse"].float()


def chunk_loglik(s: Tensor, arrays: dict[str, Tensor], temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(teacher a, student b) chunk log-likelihoods at each run position [B, L], and where a chunk ends."""
    align = arrays["align"].long()
    previous, ends = chunk_pairs(align)
    j_prev = previous.clamp_min(0)
    student = exclusive_cumsum(s)
    b = student.gather(-1, torch.arange(s.shape[1], device=s.device).expand_as(s)) - student.gather(-1, j_prev)
    teacher = exclusive_cumsum(teacher_log_probs(arrays, temperature))
    i_now, i_prev = align.clamp_min(0), align.gather(-1, j_prev).clamp_min(0)
    a = teacher.gather(-1, i_now) - teacher.gather(-1, i_prev)
    return a.float(), b.float(), ends


class ChunkLikelihoodForm(LabelForm):
    """Binarised KL between the teacher's and the student's likelihoods of the chunks between shared boundaries."""

    name = "xtok_chunk"
    arrays = ("align", "t_next_logit", "t_lse")

    def label_loss(self, s: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        a, b, ends = chunk_loglik(s, arrays, temperature)
        return torch.where(ends, binary_kl(a, b), 0) * temperature**2
