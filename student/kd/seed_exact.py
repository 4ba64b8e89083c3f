"""The seed_exact form: BabyLlama's distillation term, the tail KL to the cached ensemble summed over positions / B.

BabyLlama minimises (1 - alpha) · T^2 · nn.KLDivLoss(reduction="batchmean") on [B, L, V], and "batchmean" divides
by B only: that is a per-position mean KL weighted by L. With the ensemble's top-k == V the tail class is empty
and the tail KL equals that dense formula exactly.
"""

from __future__ import annotations

from kdcache.cache.schema import ENSEMBLE
from kdcache.student.kd.tail import TailForm


class SeedExactForm(TailForm):
    """The tail form on the ensemble group (cache.ensemble), weighted (1 - hard_weight) · L."""

    name = "seed_exact"

    def groups(self, teacher_weights: dict[str, float], hard_weight: float, seq_len: int) -> dict[str, float]:
        return {ENSEMBLE: (1.0 - hard_weight) * seq_len}
