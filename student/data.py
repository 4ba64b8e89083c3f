"""What the trainer reads: a store's token split, and the seeded order in which each step's sequences reach each rank.

One optimizer step reads `cfg.batch_size` sequences = world_size x grad_accum x micro-batch. The order is a seeded
permutation per epoch shared by every rank: step s reads the next `batch_size` sequences of its epoch's permutation
and rank r takes the strided slice r::world_size of them, so the data position is a function of the step alone and
a resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PretrainedConfig

from kdcache.cache import schema
from kdcache.cache.schema import StoreError
from kdcache.config import TrainConfig
from kdcache.runtime import Dist


class TokenDataset(Dataset):
    """`tokens/<split>` of a store, held in memory; item i is {"input_ids": LongTensor[seq_len]}."""

    def __init__(self, store_path: str | Path, split: str):
        root = schema.open_store(str(store_path))
        self.store = str(store_path)
        self.split = split
        self.attrs = dict(root.attrs)
        self.tokens = schema.read_tokens(root, split)
        self.digest = root[f"{schema.TOKENS}/{split}"].attrs.get("digest")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": torch.from_numpy(self.tokens[i].astype(np.int64))}

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def check_model(self, config: PretrainedConfig) -> None:
        """Refuse a model whose vocabulary or context does not fit these tokens."""
        problems = []
        if config.vocab_size != self.attrs["vocab_size"]:
            problems.append(f"the model's vocab_size is {config.vocab_size}, the store's {self.attrs['vocab_size']}")
        if config.max_position_embeddings < self.seq_len:
            problems.append(f"the model's max_position {config.max_position_embeddings} < seq_len {self.seq_len}")
        if problems:
            raise StoreError(f"{self.store}: tokens/{self.split} do not fit the model: " + "; ".join(problems))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """[steps per epoch, batch_size]: the sequences each optimizer step of `epoch` reads, over all ranks (the
    remainder of the epoch's order is dropped)."""
    per_epoch = n // batch_size
    return epoch_order(seed, epoch, n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)


def cumulative_words(words: np.ndarray, batch_size: int, seed: int, total: int) -> np.ndarray:
    """Words seen after each optimizer step (int64 [total + 1], 0 first): the words of the sequences every step reads
    in StepBatches' order, summed over all ranks and micro-batches. A function of the step, like the order, so a
    resumed run counts exactly what the uninterrupted one would."""
    per_epoch = len(words) // batch_size
    per_step = [np.zeros(0, np.int64)]
    for epoch in range(-(-total // per_epoch)):
        per_step.append(words[epoch_batches(seed, epoch, len(words), batch_size)].sum(1))
    return np.concatenate([[0], np.cumsum(np.concatenate(per_step)[:total])]).astype(np.int64)


class StepBatches(Sampler[list[int]]):
    """The micro-batches (lists of sequence indices) this rank reads for optimizer steps start..total-1."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, d: Dist, seed: int, start: int, total: int):
        self.n, self.batch_size, self.grad_accum, self.d = n, batch_size, grad_accum, d
        self.seed, self.start, self.total = seed, start, total

    def __len__(self) -> int:
        return (self.total - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch_size
        batches, batches_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, offset = divmod(step, per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = epoch_batches(self.seed, epoch, self.n, self.batch_size), epoch
            batch = batches[offset]
            for micro in np.array_split(batch[self.d.rank :: self.d.world], self.grad_accum):
                yield micro.tolist()


def step_loader(dataset: Dataset, cfg: TrainConfig, d: Dist, seed: int, start: int, total: int,
                collate_fn: Callable | None = None) -> DataLoader:
    """This rank's micro-batches for steps start..total-1, in order."""
    return DataLoader(
        dataset,
        batch_sampler=StepBatches(len(dataset), cfg.batch_size, cfg.grad_accum, d, seed, start, total),
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # its worker seeds must not draw from the global RNG
    )
