"""The dataset over the cache: token ids plus what a KD plan reads of each teacher group, as tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import TEACHERS, open_store
from kdcache.cache.xtok import decode_vocab_map
from kdcache.student.kd.form import kd_form
from kdcache.student.kd.plan import KDPlan


def plan_constants(store: str, plan: KDPlan) -> dict[str, Tensor]:
    """"<group>/<name>" -> the group attribute the plan's form reads as a tensor (the vocab_map of kdcache.cache.xtok)."""
    names = kd_form(plan.form).constants
    if not names:
        return {}
    root = open_store(store)
    return {f"{group}/{name}": torch.from_numpy(decode_vocab_map(root[f"{TEACHERS}/{group}"].attrs[name]))
            for group in plan.weights for name in names}


class DistillDataset(Dataset):
    """One split of a store as {"input_ids", "<group>/<array>"} tensors: the arrays `plan` names, in their stored
    dtypes except ids and counts (int32: torch has few uint kernels) and lse (its column at the plan's temperature).

    `expect` ({"tokenizer_sha", "vocab_size", "seq_len"}) is checked against the store before anything is read.
    Give a DataLoader `collate_fn=dataset.collate`: batches are fetched whole (see `__getitems__`).
    """

    def __init__(self, store_path: str | Path, split: str, plan: KDPlan, expect: dict[str, Any] | None = None):
        self.plan = plan
        self.reader = StoreReader(store_path, teachers=list(plan.arrays()), arrays=plan.arrays(), split=split,
                                  expect=expect)
        self.constants = plan_constants(self.reader.store, plan)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: value[0] for key, value in self.__getitems__([i]).items()}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        """The DataLoader's batched fetch: one reader call decodes the whole batch's chunks, and the batch stays
        one tensor per array (`collate` passes it on) instead of being split into items and stacked again."""
        batch = {key: self._convert(key, value) for key, value in self.reader.batch(idx).items()}
        return {**batch, **self.constants}

    @staticmethod
    def collate(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch

    def _convert(self, key: str, value: np.ndarray) -> Tensor:
        if key.endswith(("/lse", "/t_lse")):
            value = value[..., self.plan.temperature_index[key.split("/")[0]]]
        elif value.dtype in (np.uint16, np.uint32):  # few unsigned kernels in torch; ids (< 2**31), counts fit int32
            value = value.astype(np.int32)
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor.long() if key == "input_ids" else tensor
