"""The KD loss of a plan over a `DistillDataset` batch, for the distill recipe and for training loops of your own."""

from __future__ import annotations

from torch import Tensor, nn

from kdcache.student.kd.engine import TeacherTargets, distillation_loss
from kdcache.student.kd.form import kd_form
from kdcache.student.kd.plan import KDPlan


class KDLoss(nn.Module):
    """hard_weight · next-token CE + sum over the plan's groups of weight · mean T^2 · KL, with the plan's form.

    forward(logits [B, L, V], batch) -> (total, {"hard_ce", "kl/<group>": detached means}); the batch is a
    `DistillDataset` batch of the same plan, on the logits' device. The gradient is computed analytically chunk
    by chunk of `chunk_positions` positions (default: fewer the larger V; kd.engine), so no [B·L, V] float32 tensor
    outlives a chunk.
    """

    def __init__(self, plan: KDPlan, chunk_positions: int | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.form = kd_form(plan.form)
        self.chunk_positions = chunk_positions
        self._keys = (*self.form.arrays, *self.form.constants)

    def forward(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        teachers = [TeacherTargets(name, weight, self.form, {a: batch.get(f"{name}/{a}") for a in self._keys})
                    for name, weight in self.plan.weights.items()]
        return distillation_loss(logits, batch["input_ids"], teachers, self.plan.hard_weight, self.plan.temperature,
                                 self.chunk_positions)
