"""The KD form interface and its registry: how a teacher's cached arrays become the target of its KL term.

Conventions shared by every form:
  * p is the teacher, q the student, both at the distillation temperature T; each KL is multiplied by T^2
    (Hinton et al.) so its gradient scale does not shrink with T.
  * KL terms use every position 0..L-1 (the teacher's prediction at position j is for token j+1, as is the
    student's); the hard cross-entropy uses L-1 positions (the last one has no label).
  * Cached top-k ids are unique per position (they come from torch.topk); sampled ids are unique except for
    padding entries, which have count 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kdcache.errors import KdcacheError

# Floor for the student's tail mass: keeps log(q_tail) finite when every token outside the top-k underflows.
TINY = torch.finfo(torch.float32).tiny


class Targets(NamedTuple):
    """A teacher's distribution at T over some token ids of each position, [..., k] (no gradient flows here)."""

    ids: Tensor
    p: Tensor
    log_p: Tensor
    p_tail: Tensor | None  # [...]: the mass outside the ids, as one more class (the tail form); else None
    # [V]: where each student token's probability counts (a class id, the same id space as `ids`), when the ids are
    # classes of student tokens rather than student tokens (cross-tokenizer projection); a class the ids do not
    # list, at a position, belongs to its tail
    classes: Tensor | None = None


class KDForm(ABC):
    """One way to distil from cached targets; the chunked engine (kd.engine) computes every form's KL term.

    A form declares the arrays it reads of each teacher group (`arrays`), which groups it distils from with which
    weights (`groups`), turns a batch's arrays into `Targets` (`targets`), and defines its per-position KL with
    plain autograd (`kl`): the definition the engine's analytic gradient reproduces, and what tests compare it to.
    """

    name: ClassVar[str]  # the config's distill.form
    arrays: ClassVar[tuple[str, ...]]  # read of each group, as "<group>/<array>" batch keys
    # group attributes the dataset hands over as "<group>/<name>" tensors (cross-tokenizer: the vocab_map)
    constants: ClassVar[tuple[str, ...]] = ()
    # whether `targets` may list an id twice in a row (with p = 0 at the repeats): the engine then counts it once
    repeats_ids: ClassVar[bool] = False

    def groups(self, teacher_weights: dict[str, float], hard_weight: float, seq_len: int) -> dict[str, float]:
        """Store group -> KL weight: every teacher with a non-zero weight."""
        return {name: weight for name, weight in teacher_weights.items() if weight}

    def class_count(self, arrays: dict[str, Tensor]) -> int:
        """How many classes `Targets.classes` maps the student's tokens into (0: the ids are student tokens)."""
        return 0

    def refuse(self, group_attrs: dict, temperature: float) -> str | None:
        """Why a cached group cannot serve this form at `temperature` (None: it can)."""
        return None

    @abstractmethod
    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        """The teacher side of the KL from one group's arrays ([B, L, ...], lse at the distillation temperature)."""

    @abstractmethod
    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        """T^2 · KL per position, plain autograd: student logits [..., V] and the arrays [..., k] -> [...]."""


class LabelForm(KDForm):
    """A form whose term depends on the student only through its log-probabilities of the actual next tokens at T
    (`s` [B, L], 0 at the last position): the engine computes them, takes the term's gradient in `s` by autograd,
    and carries it to the logits analytically (d s_j / d x_j = (onehot(label_j) - q_j) / T)."""

    @abstractmethod
    def label_loss(self, s: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        """The term per position [B, L] (T^2-scaled), differentiable in `s`."""

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        raise NotImplementedError(f"{self.name}: a label form has no per-position target distribution")

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        """Plain autograd: `arrays` also holds "input_ids" [B, L] (the labels are input_ids shifted left)."""
        ids = arrays["input_ids"].long()
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        s = torch.cat([log_q[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], torch.zeros_like(log_q[:, :1, 0])], 1)
        return self.label_loss(s, arrays, temperature)


_FORMS: dict[str, type[KDForm]] = {}


def register_kd_form(cls: type[KDForm]) -> type[KDForm]:
    """Make `cls` the form named `cls.name` (kd/__init__.py registers the built-in ones)."""
    _FORMS[cls.name] = cls
    return cls


def known_forms() -> list[str]:
    """The names `distill.form` may take."""
    return sorted(_FORMS)


def kd_form(name: str) -> KDForm:
    """The registered form called `name`."""
    if name not in _FORMS:
        raise KdcacheError(f"unknown distillation form {name!r} (known: {', '.join(sorted(_FORMS))})")
    return _FORMS[name]()


def plogp(p: Tensor, log_p: Tensor) -> Tensor:
    # 0 · log 0 = 0 (padding, -inf logits, underflow)
    return torch.where(p > 0, p * log_p, torch.zeros_like(p))


def cross_entropy_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim."""
    return (plogp(p, log_p) - p * log_q).sum(-1)
