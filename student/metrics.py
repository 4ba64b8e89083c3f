"""What a run reports as it trains: per-term loss sums, their means across ranks, metrics.jsonl and a progress bar."""

from __future__ import annotations

import json
import math
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdcache.config import METRICS_FILE
from kdcache.files import atomic_write
from kdcache.progress import progress
from kdcache.runtime import Dist, barrier
from kdcache.student.data import TokenDataset
from kdcache.student.evaluate import dev_loss


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step (rank 0 only), and TensorBoard events when installed.

    On resume the records past the checkpoint's step (steps that will be redone) are dropped first, so the file
    reads like one uninterrupted run.
    """

    def __init__(self, out_dir: Path, keep_until: int):
        path = out_dir / METRICS_FILE
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= keep_until] if path.exists() else []
        atomic_write(path, "".join(line + "\n" for line in kept))  # a kill here must not lose the history
        self.file = path.open("a")
        self.tensorboard = None
        if find_spec("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=keep_until + 1)

    def write(self, record: dict[str, float]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash


class MetricSums:
    """Per-term sums over the micro-steps since the last log; averaged across ranks when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.micro_steps = 0
        self.tokens = 0

    def add(self, loss: Tensor, terms: dict[str, float | Tensor], tokens: int) -> None:
        for key, value in {"loss": loss.detach(), **terms}.items():
            value = torch.as_tensor(value, device=self.device).float()
            self.sums[key] = self.sums.get(key, 0) + value
        self.micro_steps += 1
        self.tokens += tokens

    def reduce(self, d: Dist) -> tuple[dict[str, float], int]:
        """Means over every rank's micro-steps and the tokens all ranks read; then reset."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.tokens), device=self.device)])
        if d.world > 1:
            dist.all_reduce(values)
        values = values.tolist()
        means = {k: v / (self.micro_steps * d.world) for k, v in zip(keys, values)}
        tokens = int(values[-1])
        self.sums, self.micro_steps, self.tokens = {}, 0, 0
        return means, tokens


class RunReport:
    """One run's reporting: `sums` collects each micro-step's terms; `step` advances the progress bar and, on a
    logged step, writes the means across ranks with the learning rate, gradient norm and throughput."""

    def __init__(self, out_dir: Path, d: Dist, start: int, total: int, steps_per_epoch: int,
                 words_seen: np.ndarray | None = None):
        self.d, self.steps_per_epoch, self.words_seen = d, steps_per_epoch, words_seen
        self.log = MetricsLog(out_dir, keep_until=start) if d.main else None
        self.sums = MetricSums(d.device)
        self.progress = progress(total, initial=start, desc=f"{out_dir.parent.name}/{out_dir.name}", unit="step",
                                 disable=not d.main)
        self.window_start = time.perf_counter()
        self.postfix: dict[str, str] = {}

    def words(self, done: int) -> dict[str, int]:
        """The words seen after step `done` (all ranks, all micro-batches), when the store records words."""
        return {} if self.words_seen is None else {"words_seen": int(self.words_seen[done])}

    def step(self, done: int, lr: float, grad_norm: Tensor, logged: bool) -> None:
        """Called after optimizer step `done`; `logged` on every rank alike (the means are a collective)."""
        self.progress.update()
        if not logged:
            return
        means, tokens = self.sums.reduce(self.d)
        tokens_per_s = tokens / (time.perf_counter() - self.window_start)
        self.window_start = time.perf_counter()
        if self.log:
            self.log.write({"step": done, "epoch": done / self.steps_per_epoch, **self.words(done), "lr": lr,
                            **means, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s})
        self.postfix = {"loss": f"{means['loss']:.4f}", "tok_s": f"{tokens_per_s:,.0f}"}
        self.progress.set_postfix(**self.postfix)

    def evaluate(self, done: int, model: nn.Module, dev: TokenDataset, batch_size: int) -> None:
        """The dev cross-entropy after optimizer step `done`, measured on rank 0 while the others wait (its time is
        left out of the next window's tokens/s)."""
        start = time.perf_counter()
        if self.log:
            dev_ce = dev_loss(model.eval(), dev, batch_size)["ce"]
            self.log.write({"step": done, **self.words(done), "dev_ce": dev_ce})
            self.progress.set_postfix(**self.postfix, dev_ce=f"{dev_ce:.4f}")
        barrier(self.d)
        self.window_start += time.perf_counter() - start

    def close(self) -> None:
        self.progress.close()
        if self.log:
            self.log.close()
