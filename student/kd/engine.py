"""The chunked distillation engine: the CE and every teacher's KL term, with their analytic gradient, chunk by chunk.

`distillation_loss` walks the [N, V] logits in chunks of positions and computes each chunk's loss value and
analytic gradient at once, so no [N, V] float32 tensor outlives a chunk: besides the logits, the one [N, V]
tensor is their gradient (in their dtype; the backward of any loss needs it), and a chunk holds at most
CHUNK_ELEMENTS positions x vocabulary (fewer positions the larger the vocabulary: 4096 up to 16,384 ids, 441 at
151,936, 256 at 262,144), so its float32 buffers stay under 1 GiB whatever V. Each teacher's form (kd.form) supplies
its targets; the forms' `kl` methods are the plain-autograd definitions of the same terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.student.kd.form import TINY, KDForm, LabelForm, plogp

MAX_CHUNK_POSITIONS = 4096
CHUNK_ELEMENTS = 2**26  # positions x vocabulary per chunk: 256 MiB per float32 buffer, three at most


def default_chunk_positions(vocab_size: int) -> int:
    """Positions per chunk: MAX_CHUNK_POSITIONS, fewer where the vocabulary would make a chunk's buffers large."""
    return max(1, min(MAX_CHUNK_POSITIONS, CHUNK_ELEMENTS // vocab_size))


@dataclass
class TeacherTargets:
    """One teacher group's batch for the loss: its form's arrays, [B, L, k] (lse [B, L] at the distillation T)."""

    name: str
    weight: float
    form: KDForm
    arrays: dict[str, Tensor | None]


class _Rows(NamedTuple):
    """One teacher's targets for the chunked path, flattened over positions: p at the ids (and the tail)."""

    coef: float  # gradient scale of weight · mean(T^2 · KL): weight / N · T
    ids: Tensor  # [N, k] int64
    p: Tensor  # [N, k]
    neg_entropy: Tensor  # [N]: sum p log p, tail class included
    p_tail: Tensor | None  # [N] for the tail form, else None
    mass: Tensor | None = None  # [N] with p_tail: sum p + p_tail (1, or 0 where a cross-tokenizer form has no target)
    first: Tensor | None = None  # [N, k] where the form repeats ids: 1 at an id's first listing in its row, 0 at a repeat
    value: Tensor | None = None  # [N]: a label form's term per row / T^2 (its p is the gradient's pseudo-target)
    classes: Tensor | None = None  # [V]: each student token's class, where the ids are classes (not per row)
    class_count: int = 0

    def rows(self, sl: slice) -> _Rows:
        return _Rows(self.coef, *(None if x is None else x[sl] for x in self[1:-2]), self.classes, self.class_count)


def _prepare(teacher: TeacherTargets, flat: Tensor, labels: Tensor, shape: tuple[int, int], temperature: float,
             chunk_positions: int) -> _Rows:
    """Teacher-side work for all N positions at once ([N, k] is small), so the chunk loop only touches the student."""
    form, (n, vocab) = teacher.form, flat.shape
    if any(teacher.arrays.get(name) is None for name in (*form.arrays, *form.constants)):
        raise KdcacheError(f"teacher {teacher.name!r} ({form.name}) needs {', '.join(form.arrays + form.constants)}")
    coef = teacher.weight / n * temperature
    if isinstance(form, LabelForm):
        return _label_rows(form, teacher.arrays, flat, labels, shape, temperature, chunk_positions, coef)
    ids, p, log_p, p_tail, classes = form.targets(teacher.arrays, vocab, temperature)
    neg_entropy = plogp(p, log_p).sum(-1)
    mass = first = None
    if p_tail is not None:
        neg_entropy = neg_entropy + plogp(p_tail, p_tail.log())
        mass, p_tail = (p.sum(-1) + p_tail).reshape(n), p_tail.reshape(n)
        first = _first_listings(ids.reshape(n, -1)) if form.repeats_ids else None  # an argsort spared the rest
    return _Rows(coef, ids.reshape(n, -1).long(), p.reshape(n, -1), neg_entropy.reshape(n), p_tail, mass, first,
                 classes=classes, class_count=form.class_count(teacher.arrays))


def _first_listings(ids: Tensor) -> Tensor:
    """[N, k]: 1 where an id is listed for the first time in its row (the token-matching form repeats an id, with
    p = 0, in the slots of unmatched teacher tokens), else 0."""
    order = ids.argsort(dim=-1, stable=True)
    ranked = ids.gather(-1, order)
    repeat = torch.zeros_like(ranked, dtype=torch.bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    return torch.ones(ids.shape, device=ids.device).scatter_(-1, order, (~repeat).float())


def _label_rows(form: LabelForm, arrays: dict[str, Tensor], flat: Tensor, labels: Tensor, shape: tuple[int, int],
                temperature: float, chunk_positions: int, coef: float) -> _Rows:
    """A label form's rows: its term per position, and the pseudo-target p = -(d term / d s) / T^2 at the label,
    which the chunk loop turns into coef·T·p·(q - onehot(label)) = weight/N · (d term/d s)·(onehot - q)/T."""
    s = torch.zeros(flat.shape[0], device=flat.device)
    for start in range(0, flat.shape[0], chunk_positions):
        rows = slice(start, start + chunk_positions)
        log_q = torch.log_softmax(flat[rows].float() / temperature, dim=-1)
        s[rows] = log_q.gather(-1, labels[rows].clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels[rows] >= 0)
    s = s.view(shape).requires_grad_()
    with torch.enable_grad():
        value = form.label_loss(s, arrays, temperature)
        (grad,) = torch.autograd.grad(value.sum(), s)
    p = (-grad / temperature**2).reshape(-1, 1)
    ids = labels.clamp_min(0).unsqueeze(-1)
    # the chunk loop multiplies every term by T^2, which label_loss has already done
    return _Rows(coef, ids, p, torch.zeros_like(s).reshape(-1), None, value=value.detach().reshape(-1) / temperature**2)


def _chunk_loss_and_grad(
    x: Tensor,
    labels: Tensor,
    ce_coef: float,
    targets: list[_Rows],
    temperature: float,
    grad_out: Tensor | None,
) -> Tensor:
    """Loss sums for one chunk of logits x [c, V] (read only); writes d(total)/dx into grad_out when given.

    Returns [CE sum, T^2 · KL sum per teacher]. With q = softmax(x/T), the gradients are
      CE:             softmax(x) - onehot(label), times hard_weight / #labels
      renorm/sampled: T·((sum p)·q - p scattered at the ids), times weight / N  (T^2 · 1/T from the chain rule)
      tail:           T·(m·q_j - p_j) on the ids, T·q_j·(m - p_tail/q_tail) elsewhere, times weight / N
                      (the tail's target mass is spread in proportion to q inside the tail; m = sum p + p_tail is
                      1, or 0 where a cross-tokenizer form has no target; an id listed twice counts once)
      label forms:    as renorm/sampled with p = -(d term / d s) / T^2 at the label (kd.form.LabelForm).
      class forms:    T·q_v·(m - p_c/Q_c) with c the class of token v (Q_c: q summed over the class; the tail
                      class outside the ids), times weight / N (kd.xtok_project).
    All math is float32; at most three [c, V] float32 buffers live at once, and for a class form one [c, V] and one
    [c, classes] more (the chunk is sized by the larger of V and the class count).
    """
    log_q1 = torch.log_softmax(x, dim=-1, dtype=torch.float32)
    valid = labels >= 0
    safe = labels.clamp_min(0).unsqueeze(-1)
    sums = [-(log_q1.gather(-1, safe).squeeze(-1) * valid).sum()]
    ce_rows = valid.float() * ce_coef
    row_coef = torch.zeros(x.shape[0], device=x.device)  # multiplies q in the gradient
    sparse = [(safe, -ce_rows.unsqueeze(-1))]  # (ids, values) added to the gradient at the ids
    if temperature != 1:
        log_q = torch.log_softmax(x.to(torch.float32, copy=True).div_(temperature), dim=-1)
    else:
        log_q = log_q1
    log_q_ids = [None if t.classes is not None else log_q.gather(-1, t.ids) for t in targets]  # classes: not q's ids
    q = log_q.exp_()  # at T == 1 this is also softmax(x) for the CE gradient

    factor = None  # [c, V], where a form's ids are classes: its per-token part of the gradient's q multiplier
    for t, lq_ids in zip(targets, log_q_ids):
        if t.classes is not None:
            kl, ratio = _class_kl_and_ratio(q, t)
            row_coef += t.coef * t.mass
            factor = (0 if factor is None else factor) - t.coef * ratio.index_select(-1, t.classes)
        elif t.p_tail is None:
            kl = t.neg_entropy - (t.p * lq_ids).sum(-1) if t.value is None else t.value
            row_coef += t.coef * t.p.sum(-1)
            sparse.append((t.ids, -t.coef * t.p))
        else:
            q_ids = lq_ids.exp()
            q_tail = q.scatter_(-1, t.ids, 0.0).sum(-1).clamp_min(TINY)  # direct tail sum: no 1 - sum cancellation
            q.scatter_(-1, t.ids, q_ids)
            kl = t.neg_entropy - (t.p * lq_ids).sum(-1) - t.p_tail * q_tail.log()
            ratio = t.p_tail / q_tail
            row_coef += t.coef * (t.mass - ratio)
            spread = ratio.unsqueeze(-1) if t.first is None else ratio.unsqueeze(-1) * t.first
            sparse.append((t.ids, t.coef * (q_ids * spread - t.p)))
        sums.append(kl.sum() * temperature**2)

    if grad_out is not None:
        if temperature == 1:
            row_coef += ce_rows
        grad = q.mul_(row_coef.unsqueeze(-1) if factor is None else factor.add_(row_coef.unsqueeze(-1)))
        for ids, values in sparse:
            grad.scatter_add_(-1, ids, values)
        if temperature != 1:  # add the CE's softmax(x) term while casting to the output
            torch.addcmul(grad, log_q1.exp_(), ce_rows.unsqueeze(-1), out=grad_out)
        else:
            grad_out.copy_(grad)
    return torch.stack(sums)


def _class_kl_and_ratio(q: Tensor, t: _Rows) -> tuple[Tensor, Tensor]:
    """KL(p || Q) per row where the ids are classes of student tokens (Q: q summed by class), and p / Q per class
    [c, class_count] (p_tail / Q_tail outside the ids): the gradient in x_v is T·q_v·(m - ratio[class(v)])."""
    mass = q.new_zeros(q.shape[0], t.class_count).index_add_(-1, t.classes, q)
    q_ids = mass.gather(-1, t.ids).clamp_min(TINY)
    q_tail = mass.scatter_(-1, t.ids, 0.0).sum(-1).clamp_min(TINY)  # direct tail sum: no 1 - sum cancellation
    kl = t.neg_entropy - (t.p * q_ids.log()).sum(-1) - t.p_tail * q_tail.log()
    ratio = mass.copy_((t.p_tail / q_tail).unsqueeze(-1).expand_as(mass)).scatter_(-1, t.ids, t.p / q_ids)
    return kl, ratio


class _ChunkedDistillation(torch.autograd.Function):
    """total = hard_weight · CE + sum_t weight_t · mean-over-positions KL_t, with the gradient written in forward.

    Forward walks the positions in chunks and stores d(total)/d(logits) in the logits' dtype (nothing is stored
    when no gradient is needed, e.g. under no_grad); backward only scales it. Returns (total, per-term means), the
    latter non-differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        input_ids: Tensor,
        hard_weight: float,
        teachers: list[TeacherTargets],
        temperature: float,
        chunk_positions: int,
    ) -> tuple[Tensor, Tensor]:
        batch, length, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        n = flat.shape[0]
        labels = _next_token_labels(input_ids)
        n_labels = batch * (length - 1)
        targets = [_prepare(t, flat, labels, (batch, length), temperature, chunk_positions) for t in teachers]
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        sums = torch.zeros(1 + len(teachers), device=flat.device)
        for start in range(0, n, chunk_positions):
            rows = slice(start, start + chunk_positions)
            sums += _chunk_loss_and_grad(
                flat[rows],
                labels[rows],
                hard_weight / n_labels,
                [t.rows(rows) for t in targets],
                temperature,
                None if grad is None else grad[rows],
            )
        counts = [n_labels] + [n] * len(teachers)
        weights = [hard_weight] + [t.weight for t in teachers]
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
    chunk_positions: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """hard_weight · next_token_ce + sum_t weight_t · mean over all B·L positions of the teacher's KL term.

    logits [B, L, V] (bf16 under autocast, or float32); teacher arrays [B, L, ...]. Each term equals its autograd
    definition (`student.lm.next_token_ce`, each form's `kl`); the gradient is computed analytically chunk by
    chunk (`chunk_positions` per chunk; default: `default_chunk_positions` of V). Returns the total and detached
    per-term values: "hard_ce", "kl/<name>".
    """
    widest = max([logits.shape[-1]] + [t.form.class_count(t.arrays) for t in teachers])
    chunk_positions = chunk_positions or default_chunk_positions(widest)
    total, means = _ChunkedDistillation.apply(logits, input_ids, hard_weight, teachers, temperature, chunk_positions)
    names = ["hard_ce"] + [f"kl/{t.name}" for t in teachers]
    return total, dict(zip(names, means.detach().unbind()))
