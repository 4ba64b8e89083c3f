"""Checkpoints by words seen (BabyLM's submission rule): the official schedule, the branch names, and which counts a
run saves at which step.

BabyLM asks for a checkpoint every 1M words for the first 10M words seen, every 10M up to 100M, every 100M up to
1000M (not for strict-small, whose run stops at 100M), each pushed as the branch `chck_<N>M` of a Hugging Face
repository. Words are counted in total (an epoch's words count again in the next), as `words/<split>` records them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.config import TrainConfig
from kdcache.student.checkpoint import TrainError
from kdcache.student.data import cumulative_words

MILLION = 1_000_000
BABYLM_SCHEDULE = tuple(m * MILLION for m in [*range(1, 10), *range(10, 100, 10), *range(100, 1001, 100)])
CHECKPOINT_PREFIX = "chck_"  # BabyLM's branch names (kdcache.student.export lists such directories)


def checkpoint_name(count: int) -> str:
    """The branch name of the checkpoint at `count` words: chck_7M, chck_500K below a million, chck_<count> else."""
    if count % MILLION == 0:
        return f"{CHECKPOINT_PREFIX}{count // MILLION}M"
    if count % 1000 == 0:
        return f"{CHECKPOINT_PREFIX}{count // 1000}K"
    return f"{CHECKPOINT_PREFIX}{count}"


def word_schedule(setting: str | list[int] | None, total_words: int) -> list[int]:
    """The counts to save at: `babylm` = the official schedule up to the run's total; a list as it is."""
    if setting is None:
        return []
    if setting == "babylm":
        return [count for count in BABYLM_SCHEDULE if count <= total_words]
    return list(setting)


@dataclass(frozen=True)
class WordPlan:
    """A run's words seen after each step (`seen[s]`, 0 first) and the counts it saves a checkpoint at."""

    seen: np.ndarray
    schedule: list[int]

    @property
    def total(self) -> int:
        return int(self.seen[-1])

    def due(self, done: int) -> list[int]:
        """The counts first reached by optimizer step `done` (several when one step passes more than one)."""
        return [c for c in self.schedule if self.seen[done - 1] < c <= self.seen[done]]

    def saved_before(self, step: int) -> list[int]:
        """The counts reached within the first `step` steps: a run resumed at `step` saved them already."""
        return [c for c in self.schedule if c <= self.seen[step]]


def plan_words(cfg: TrainConfig, words: np.ndarray | None, seed: int, total: int, where: str) -> WordPlan | None:
    """The run's WordPlan (None when the store records no words); a schedule the run cannot follow is refused
    before step 1, naming `where` (the config's training section)."""
    if words is None:
        if cfg.save_at_words is not None:
            raise TrainError(f"{where}.save_at_words: the store has no words per sequence (written by an older "
                             f"kdcache): run `kdcache upgrade` on it first")
        return None
    seen = cumulative_words(words, cfg.batch_size, seed, total)
    schedule = word_schedule(cfg.save_at_words, int(seen[-1]))
    if schedule and schedule[0] < seen[1]:
        raise TrainError(f"{where}.save_at_words: {schedule[0]:,} words is below one batch's {int(seen[1]):,} (the "
                         f"first step already sees more): start the schedule at {int(seen[1]):,} or more")
    return WordPlan(seen, schedule)
