"""Distillation losses against the cached teacher targets.

Conventions shared by every KL here:
  * p is the teacher, q the student, both at the distillation temperature T; each KL is multiplied by T^2
    (Hinton et al.) so its gradient scale does not shrink with T.
  * KL terms use every position 0..L-1 (the teacher's prediction at position j is for token j+1, as is the
    student's); the hard cross-entropy uses L-1 positions (the last one has no label).
  * Cached top-k ids are unique per position (they come from torch.topk); sampled ids are unique except for
    padding entries, which have count 0.

`distillation_loss` is the trainer's entry point: it walks the [N, V] logits in chunks of positions and computes
each chunk's loss value and analytic gradient at once, so no [N, V] float32 tensor outlives a chunk. The per-form
functions (`tail_bucket_kl`, ...) are the plain-autograd definitions of the same terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Floor for the student's tail mass: keeps log(q_tail) finite when every token outside the top-k underflows.
_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------------------
# Teacher-side targets (no gradient flows through these).


def _tail_targets(topk_logits: Tensor, lse: Tensor, temperature: float, vocab_size: int) -> tuple[Tensor, Tensor]:
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


def _renorm_targets(topk_logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(topk_logits.float() / temperature, dim=-1)


def _sampled_targets(sample_counts: Tensor) -> Tensor:
    counts = sample_counts.float()
    # clamp: a position with no draws gets p̂ = 0 (no loss) rather than NaN
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def _plogp(p: Tensor, log_p: Tensor) -> Tensor:
    # 0 · log 0 = 0 (padding, -inf logits, underflow)
    return torch.where(p > 0, p * log_p, torch.zeros_like(p))


def _cross_entropy_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim."""
    return (_plogp(p, log_p) - p * log_q).sum(-1)


def _tail_term(p_tail: Tensor, log_q_tail: Tensor) -> Tensor:
    return _plogp(p_tail, torch.log(p_tail)) - p_tail * log_q_tail


# ---------------------------------------------------------------------------------------------------------------
# Plain-autograd definitions (per position; the caller reduces).


def hard_cross_entropy(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token cross-entropy: logits[:, :-1] against input_ids[:, 1:], mean over tokens, float32 math."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1).long())


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
    log_p, p_tail = _tail_targets(topk_logits, teacher_lse, temperature, student_logits.shape[-1])
    kl = _cross_entropy_terms(log_p.exp(), log_p, log_q_ids) + _tail_term(p_tail, q_tail.clamp_min(_TINY).log())
    return kl * temperature**2


def renormalized_topk_kl(student_logits: Tensor, topk_logits: Tensor, topk_ids: Tensor, temperature: float) -> Tensor:
    """Per-position DistillKit "zero" KL, times T^2.

    Definition: p = softmax(topk_logits/T) over the k ids (mass outside them treated as zero),
    log q_i = log_softmax(student/T)[id_i] over the full vocabulary, NOT renormalised over the ids;
    loss = T^2 · sum_i p_i (log p_i - log q_i). Since sum_i q_i <= 1 this is >= KL(p || q renormalised) >= 0.
    """
    log_q_ids = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_ids.long())
    log_p = _renorm_targets(topk_logits, temperature)
    return _cross_entropy_terms(log_p.exp(), log_p, log_q_ids) * temperature**2


def sampled_kl(student_logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, temperature: float) -> Tensor:
    """Per-position random-sampling KD (Anshumann et al. 2025), times T^2.

    p̂ = counts / sum(counts) from N draws of the teacher at T (pad entries have count 0 and contribute nothing);
    loss = T^2 · sum_i p̂_i (log p̂_i - log q_i) with q = softmax(student/T) over the full vocabulary.
    E[p̂] = p, so the gradient T·(q - p̂) is an unbiased estimate of the dense KL's gradient T·(q - p).
    """
    log_q_ids = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, sample_ids.long())
    p = _sampled_targets(sample_counts)
    return _cross_entropy_terms(p, p.log(), log_q_ids) * temperature**2


def dense_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the full vocabulary, per position: the online
    baseline's loss (teachers in memory), plain autograd."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def hidden_alignment_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, projection: nn.Module, kind: Literal["mse", "cosine"]
) -> Tensor:
    """Align projected student hidden states [..., Ds] with cached teacher ones [..., Dt] (float16 -> float32).

    mse: mean squared error over all elements; cosine: mean over positions of 1 - cos(projected, teacher).
    """
    pred = projection(student_hidden).float()
    target = teacher_hidden.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown hidden alignment kind {kind!r}")


class HiddenProjections(nn.Module):
    """Trainable student->teacher hidden-size projections, one bias-free Linear per (student layer, teacher layer).

    Built from (student_layer, teacher_name, teacher_layer, teacher_dim) tuples; attach it to the student as a
    submodule so it trains, is saved and resumes with it.
    """

    def __init__(self, student_dim: int, pairs: list[tuple[int, str, int, int]]) -> None:
        super().__init__()
        self.proj = nn.ModuleDict(
            {self.key(s, t, l): nn.Linear(student_dim, dim, bias=False) for s, t, l, dim in pairs}
        )

    @staticmethod
    def key(student_layer: int, teacher: str, teacher_layer: int) -> str:
        # ModuleDict keys may not contain "." (it separates state_dict paths)
        return f"s{student_layer}_{teacher.replace('.', '-')}_{teacher_layer}"

    def __getitem__(self, key: str) -> nn.Linear:
        return self.proj[key]


def uniform_layer_mapping(
    num_student_layers: int, teacher_layers: list[int], num_teacher_layers: int
) -> list[tuple[int, int]]:
    """Map each cached teacher layer l to the student layer at the same relative depth: [(student, teacher)].

    Layers use HF output_hidden_states indexing (0 = embeddings, n = last block). Student layer =
    round(l * S / n) with halves rounded up (integer arithmetic, so no float or banker's-rounding surprises).
    """
    return [((2 * l * num_student_layers + num_teacher_layers) // (2 * num_teacher_layers), l) for l in teacher_layers]


# ---------------------------------------------------------------------------------------------------------------
# Chunked loss with an analytic gradient (the trainer's path).


@dataclass
class TeacherTargets:
    """One cached teacher's batch, already on the device. Arrays are [B, L, k] (ids/logits/counts), lse [B, L]."""

    name: str
    weight: float
    form: Literal["tail", "renorm", "sampled"]
    topk_logits: Tensor | None = None
    topk_ids: Tensor | None = None
    lse: Tensor | None = None  # log-sum-exp of logits/T at the distillation temperature
    sample_ids: Tensor | None = None
    sample_counts: Tensor | None = None


_REQUIRED_ARRAYS = {
    "tail": ("topk_logits", "topk_ids", "lse"),
    "renorm": ("topk_logits", "topk_ids"),
    "sampled": ("sample_ids", "sample_counts"),
}


class _Targets(NamedTuple):
    """One teacher's targets for the chunked path, flattened over positions: p at the ids (and the tail)."""

    coef: float  # gradient scale of weight · mean(T^2 · KL): weight / N · T
    ids: Tensor  # [N, k] int64
    p: Tensor  # [N, k]
    neg_entropy: Tensor  # [N]: sum p log p, tail class included
    p_tail: Tensor | None  # [N] for the tail form, else None

    def rows(self, sl: slice) -> _Targets:
        p_tail = None if self.p_tail is None else self.p_tail[sl]
        return _Targets(self.coef, self.ids[sl], self.p[sl], self.neg_entropy[sl], p_tail)


def _prepare(teacher: TeacherTargets, n: int, vocab: int, temperature: float) -> _Targets:
    """Teacher-side work for all N positions at once ([N, k] is small), so the chunk loop only touches the student."""
    needed = _REQUIRED_ARRAYS.get(teacher.form)
    if needed is None:
        raise ValueError(f"unknown teacher target form {teacher.form!r}")
    if any(getattr(teacher, f) is None for f in needed):
        raise ValueError(f"teacher {teacher.name!r} ({teacher.form}) needs {', '.join(needed)}")
    p_tail = None
    if teacher.form == "sampled":
        ids, p = teacher.sample_ids, _sampled_targets(teacher.sample_counts)
        log_p = p.log()
    else:
        ids = teacher.topk_ids
        if teacher.form == "tail":
            log_p, p_tail = _tail_targets(teacher.topk_logits, teacher.lse, temperature, vocab)
        else:
            log_p = _renorm_targets(teacher.topk_logits, temperature)
        p = log_p.exp()
    neg_entropy = _plogp(p, log_p).sum(-1)
    if p_tail is not None:
        neg_entropy = neg_entropy + _plogp(p_tail, p_tail.log())
        p_tail = p_tail.reshape(n)
    coef = teacher.weight / n * temperature
    return _Targets(coef, ids.reshape(n, -1).long(), p.reshape(n, -1), neg_entropy.reshape(n), p_tail)


def _chunk_loss_and_grad(
    x: Tensor,
    labels: Tensor | None,
    ce_coef: float,
    targets: list[_Targets],
    temperature: float,
    grad_out: Tensor | None,
) -> Tensor:
    """Loss sums for one chunk of logits x [c, V] (read only); writes d(total)/dx into grad_out when given.

    Returns [CE sum (if labels), T^2 · KL sum per teacher]. With q = softmax(x/T), the gradients are
      CE:             softmax(x) - onehot(label), times hard_weight / #labels
      renorm/sampled: T·((sum p)·q - p scattered at the ids), times weight / N  (T^2 · 1/T from the chain rule)
      tail:           T·(q_j - p_j) on the ids, T·q_j·(1 - p_tail/q_tail) elsewhere, times weight / N
                      (the tail's target mass is spread in proportion to q inside the tail).
    All math is float32; at most three [c, V] float32 buffers live at once.
    """
    sums: list[Tensor] = []
    row_coef = torch.zeros(x.shape[0], device=x.device)  # multiplies q in the gradient
    sparse: list[tuple[Tensor, Tensor]] = []  # (ids, values) added to the gradient at the ids

    if labels is not None:
        log_q1 = torch.log_softmax(x, dim=-1, dtype=torch.float32)
        valid = labels >= 0
        safe = labels.clamp_min(0).unsqueeze(-1)
        sums.append(-(log_q1.gather(-1, safe).squeeze(-1) * valid).sum())
        ce_rows = valid.float() * ce_coef
        sparse.append((safe, -ce_rows.unsqueeze(-1)))
    if temperature != 1:
        log_q = torch.log_softmax(x.to(torch.float32, copy=True).div_(temperature), dim=-1)
    else:
        log_q = log_q1 if labels is not None else torch.log_softmax(x, dim=-1, dtype=torch.float32)
    log_q_ids = [log_q.gather(-1, t.ids) for t in targets]
    q = log_q.exp_()  # at T == 1 this is also softmax(x) for the CE gradient

    for t, lq_ids in zip(targets, log_q_ids):
        kl = t.neg_entropy - (t.p * lq_ids).sum(-1)
        if t.p_tail is None:
            row_coef += t.coef * t.p.sum(-1)
            sparse.append((t.ids, -t.coef * t.p))
        else:
            q_ids = lq_ids.exp()
            q_tail = q.scatter_(-1, t.ids, 0.0).sum(-1).clamp_min(_TINY)  # direct tail sum: no 1 - sum cancellation
            q.scatter_(-1, t.ids, q_ids)
            kl = kl - t.p_tail * q_tail.log()
            ratio = t.p_tail / q_tail
            row_coef += t.coef * (1 - ratio)
            sparse.append((t.ids, t.coef * (q_ids * ratio.unsqueeze(-1) - t.p)))
        sums.append(kl.sum() * temperature**2)

    if grad_out is not None:
        if labels is not None and temperature == 1:
            row_coef += ce_rows
        grad = q.mul_(row_coef.unsqueeze(-1))
        for ids, values in sparse:
            grad.scatter_add_(-1, ids, values)
        if labels is not None and temperature != 1:  # add the CE's softmax(x) term while casting to the output
            torch.addcmul(grad, log_q1.exp_(), ce_rows.unsqueeze(-1), out=grad_out)
        else:
            grad_out.copy_(grad)
    return torch.stack(sums)


class _ChunkedDistillation(torch.autograd.Function):
    """total = hard_weight · CE + sum_t weight_t · mean-over-positions KL_t, with the gradient written in forward.

    Forward walks the positions in chunks and stores d(total)/d(logits) in the logits' dtype (nothing is stored
    when no gradient is needed, e.g. under no_grad); backward only scales it. Returns (total, per-term means), the
    latter non-differentiable. input_ids=None leaves out the CE term.
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        input_ids: Tensor | None,
        hard_weight: float,
        teachers: list[TeacherTargets],
        temperature: float,
        chunk_positions: int,
    ) -> tuple[Tensor, Tensor]:
        batch, length, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        n = flat.shape[0]
        labels = None if input_ids is None else _next_token_labels(input_ids)
        n_labels = batch * (length - 1)
        targets = [_prepare(t, n, vocab, temperature) for t in teachers]
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        sums = torch.zeros(len(teachers) + (labels is not None), device=flat.device)
        for start in range(0, n, chunk_positions):
            rows = slice(start, start + chunk_positions)
            sums += _chunk_loss_and_grad(
                flat[rows],
                None if labels is None else labels[rows],
                hard_weight / n_labels,
                [t.rows(rows) for t in targets],
                temperature,
                None if grad is None else grad[rows],
            )
        counts = [n_labels] * (labels is not None) + [n] * len(teachers)
        weights = [hard_weight] * (labels is not None) + [t.weight for t in teachers]
        means = torch.stack([s / c for s, c in zip(sums.unbind(), counts)])
        total = sum(w * m for w, m in zip(weights, means.unbind()))
        ctx.grad = None if grad is None else grad.view_as(logits)
        ctx.mark_non_differentiable(means)
        return total, means

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_means: Tensor) -> tuple[Tensor | None, ...]:
        grad, ctx.grad = ctx.grad, None  # scaled in place: the stored gradient is used once
        return grad.mul_(grad_total), None, None, None, None, None


def _next_token_labels(input_ids: Tensor) -> Tensor:
    """Labels for every logit position, flattened: input_ids shifted left, -1 (ignored) at the last position."""
    pad = torch.full_like(input_ids[:, :1], -1)
    return torch.cat([input_ids[:, 1:], pad], dim=1).reshape(-1).long()


def distillation_loss(
    logits: Tensor,
    input_ids: Tensor,
    teachers: list[TeacherTargets],
    hard_weight: float,
    temperature: float,
    chunk_positions: int = 4096,
) -> tuple[Tensor, dict[str, Tensor]]:
    """hard_weight · hard_cross_entropy + sum_t weight_t · mean over all B·L positions of the teacher's KL term.

    logits [B, L, V] (bf16 under autocast, or float32); teacher arrays [B, L, ...]. Each term equals its autograd
    definition (`hard_cross_entropy`, `tail_bucket_kl`, `renormalized_topk_kl`, `sampled_kl`); the gradient is
    computed analytically chunk by chunk. Returns the total and detached per-term values: "hard_ce", "kl/<name>".
    """
    total, means = _ChunkedDistillation.apply(logits, input_ids, hard_weight, teachers, temperature, chunk_positions)
    names = ["hard_ce"] + [f"kl/{t.name}" for t in teachers]
    return total, dict(zip(names, means.detach().unbind()))


def seed_exact_kd(
    student_logits: Tensor,
    topk_logits: Tensor,
    topk_ids: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    chunk_positions: int = 4096,
) -> Tensor:
    """BabyLlama's distillation term from the cached ensemble: the tail-bucket KL summed over positions / B.

    Reproduces T^2 · nn.KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(ensemble/T)) on [B, L, V]
    ("batchmean" divides by B only); with k == V the tail class is empty and it equals the dense formula exactly.
    Computed by the chunked path: a tail KL with weight L, averaged over the B·L positions, is the sum / B.
    """
    length = student_logits.shape[1]
    ensemble = TeacherTargets("ensemble", float(length), "tail", topk_logits, topk_ids, teacher_lse)
    total, _ = _ChunkedDistillation.apply(student_logits, None, 0.0, [ensemble], temperature, chunk_positions)
    return total
