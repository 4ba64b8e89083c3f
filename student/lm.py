"""The plain language-modelling objective: next-token cross-entropy, for teachers, baselines and evaluation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def next_token_ce(logits: Tensor, input_ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of each position's prediction of the next token (L-1 positions per sequence), in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The trainer's loss for plain language modelling (a `LossFn`): next-token cross-entropy."""
    ids = batch["input_ids"]
    loss = next_token_ce(model(input_ids=ids, use_cache=False).logits, ids)
    return loss, {"ce": loss.detach()}
