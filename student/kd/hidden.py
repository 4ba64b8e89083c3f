"""The hidden form: projected student hidden states aligned with cached teacher ones (deeply-supervised KD).

Unlike the logit forms it is not the config's `distill.form`: it is added to any of them when
`distill.hidden.weight` > 0, and brings trainable student->teacher projections that train and checkpoint with the
student (the trainer's extra modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class HiddenPair:
    """One aligned pair: a student layer and a cached teacher layer (HF output_hidden_states indexing)."""

    student_layer: int
    teacher: str
    teacher_layer: int
    teacher_dim: int
    quantized: bool  # int8 with a per-position scale

    def arrays(self) -> list[str]:
        """What it reads of the teacher's group."""
        name = f"hidden_{self.teacher_layer}"
        return [name, f"{name}_scale"] if self.quantized else [name]


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
    raise KdcacheError(f"unknown hidden alignment kind {kind!r}")


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


class HiddenAlignment:
    """The hidden term over a batch: mean over the pairs of `hidden_alignment_loss`, with its own projections."""

    def __init__(self, pairs: Sequence[HiddenPair], kind: Literal["mse", "cosine"], student_dim: int) -> None:
        self.pairs, self.kind = tuple(pairs), kind
        self.projections = HiddenProjections(
            student_dim, [(p.student_layer, p.teacher, p.teacher_layer, p.teacher_dim) for p in self.pairs])

    @staticmethod
    def target(batch: dict[str, Tensor], pair: HiddenPair) -> Tensor:
        """The cached teacher hidden states of a pair, as float16 values (int8 ones times their scale)."""
        key = f"{pair.teacher}/hidden_{pair.teacher_layer}"
        if not pair.quantized:
            return batch[key]
        return (batch[key].float() * batch[f"{key}_scale"].float().unsqueeze(-1)).half()

    def __call__(self, hidden_states: Sequence[Tensor], batch: dict[str, Tensor]) -> Tensor:
        return torch.stack([
            hidden_alignment_loss(hidden_states[p.student_layer], self.target(batch, p),
                                  self.projections[HiddenProjections.key(p.student_layer, p.teacher, p.teacher_layer)],
                                  self.kind)
            for p in self.pairs
        ]).mean()
