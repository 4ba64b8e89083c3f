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


class KDForm(ABC):
    """One way to distil from cached targets; the chunked engine (kd.engine) computes every form's KL term.

    A form declares the arrays it reads of each teacher group (`arrays`), which groups it distils from with which
    weights (`groups`), turns a batch's arrays into `Targets` (`targets`), and defines its per-position KL with
    plain autograd (`kl`): the definition the engine's analytic gradient reproduces, and what tests compare it to.
    """

    name: ClassVar[str]  # the config's distill.form
    arrays: ClassVar[tuple[str, ...]]  # read of each group, as "<group>/<array>" batch keys

    def groups(self, teacher_weights: dict[str, float], hard_weight: float, seq_len: int) -> dict[str, float]:
        """Store group -> KL weight: every teacher with a non-zero weight."""
        return {name: weight for name, weight in teacher_weights.items() if weight}

    def refuse(self, group_attrs: dict, temperature: float) -> str | None:
        """Why a cached group cannot serve this form at `temperature` (None: it can)."""
        return None

    @abstractmethod
    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        """The teacher side of the KL from one group's arrays ([B, L, ...], lse at the distillation temperature)."""

    @abstractmethod
    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        """T^2 · KL per position, plain autograd: student logits [..., V] and the arrays [..., k] -> [...]."""


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
