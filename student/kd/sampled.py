"""The sampled form (random-sampling KD): the teacher's distribution estimated from N cached draws per position."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.student.kd.form import KDForm, Targets, cross_entropy_terms


def sampled_p(sample_counts: Tensor) -> Tensor:
    counts = sample_counts.float()
    # clamp: a position with no draws gets p̂ = 0 (no loss) rather than NaN
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def sampled_kl(student_logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, temperature: float) -> Tensor:
    """Per-position random-sampling KD (Anshumann et al. 2025), times T^2.

    p̂ = counts / sum(counts) from N draws of the teacher at T (pad entries have count 0 and contribute nothing);
    loss = T^2 · sum_i p̂_i (log p̂_i - log q_i) with q = softmax(student/T) over the full vocabulary.
    E[p̂] = p, so the gradient T·(q - p̂) is an unbiased estimate of the dense KL's gradient T·(q - p).
    """
    log_q_ids = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, sample_ids.long())
    p = sampled_p(sample_counts)
    return cross_entropy_terms(p, p.log(), log_q_ids) * temperature**2


class SampledForm(KDForm):
    """p̂ = draw counts / draws at the ids drawn (cache.samples draws at cache.sample_temperature)."""

    name = "sampled"
    arrays = ("sample_ids", "sample_counts")

    def refuse(self, group_attrs: dict, temperature: float) -> str | None:
        # draws at one temperature estimate the teacher at that temperature only
        drawn = group_attrs.get("sample_temperature")
        if not group_attrs.get("samples"):
            return "holds no samples (cache.samples was 0)"
        if drawn != temperature:
            return (f"holds samples drawn at T={drawn} (the store's sample_temperature), but distill.temperature "
                    f"is {temperature}: set distill.temperature to {drawn}, or cache samples at {temperature}")
        return None

    def targets(self, arrays: dict[str, Tensor], vocab_size: int, temperature: float) -> Targets:
        p = sampled_p(arrays["sample_counts"])
        return Targets(arrays["sample_ids"], p, p.log(), None)

    def kl(self, student_logits: Tensor, arrays: dict[str, Tensor], temperature: float) -> Tensor:
        return sampled_kl(student_logits, arrays["sample_ids"], arrays["sample_counts"], temperature)
