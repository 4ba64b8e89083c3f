"""The training loop shared by teachers (next-token cross-entropy) and students (distillation against the store).

A plain PyTorch loop over a Hugging Face model: AdamW, linear warm-up then cosine decay, gradient accumulation,
clipping, bf16 autocast on CUDA (fp32 on CPU), optional torch.compile, DDP under torchrun. The data order is
`student.data`'s, checkpoints and exact resume `student.checkpoint`'s, the reporting `student.metrics`', the words
seen and the checkpoints saved at word counts `student.words`'.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from kdcache.config import TrainConfig
from kdcache.runtime import Dist, barrier, init_distributed
from kdcache.student.checkpoint import CHECKPOINT, TrainError, TrainState, checkpoint, run_fingerprint, start_step
from kdcache.student.data import TokenDataset, step_loader
from kdcache.student.export import export_model
from kdcache.student.lm import lm_loss
from kdcache.student.metrics import MetricSums, RunReport
from kdcache.student.model import count_parameters
from kdcache.student.words import WordPlan, checkpoint_name, plan_words

# loss_fn(model, batch) -> (loss to minimise, per-term metrics); metric values may stay tensors (no sync per step).
LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float | Tensor]]]


class LossModule(nn.Module):
    """Model, extra trainable modules and loss as one module: DDP then syncs every parameter, and the loss
    (which may call the extra modules by closure) runs inside DDP's forward."""

    def __init__(self, model: nn.Module, extra: nn.Module | None, loss_fn: LossFn, compile: bool):
        super().__init__()
        self.model = torch.compile(model) if compile else model
        self.extra = extra
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float | Tensor]]:
        return self.loss_fn(self.model, batch)


def total_steps(cfg: TrainConfig, num_sequences: int) -> int:
    per_epoch = num_sequences // cfg.batch_size  # a final partial batch is dropped: every step sees a full batch
    if per_epoch == 0:
        raise TrainError(f"the training split has {num_sequences} sequences, fewer than one batch of {cfg.batch_size}")
    return cfg.max_steps or math.ceil(cfg.epochs * per_epoch)


def check_batch_split(cfg: TrainConfig, world: int) -> None:
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(
            f"batch_size {cfg.batch_size} is not divisible by world_size {world} x grad_accum {cfg.grad_accum}"
        )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps (the first step already moves), then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases, norms and embeddings (a tied LM head too) are not decayed."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in module.parameters() if p.requires_grad]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    decay = [p for p in params if not (p.ndim < 2 or id(p) in embeddings)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")  # betas: the HF Trainer defaults the seed used


def make_state(model: PreTrainedModel, extra: nn.Module | None, loss_fn: LossFn, cfg: TrainConfig, total: int,
               d: Dist) -> tuple[LossModule, TrainState]:
    """The trained module on the device, with its optimizer and learning-rate schedule."""
    model.to(d.device)
    if extra is not None:
        extra.to(d.device)
    module = LossModule(model, extra, loss_fn, cfg.compile)
    optimizer = make_optimizer(module, cfg, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total))
    return module, TrainState(model, extra, optimizer, scheduler)


def accumulate_gradients(wrapped: nn.Module, micro_batches: Iterator[dict[str, Tensor]], cfg: TrainConfig, d: Dist,
                         sums: MetricSums) -> None:
    """Forward and backward over the grad_accum micro-batches of one optimizer step."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(d.device, non_blocking=True) for k, v in next(micro_batches).items()}
        last = micro == cfg.grad_accum - 1
        # DDP all-reduces the gradients once per optimizer step, on the last micro-batch.
        with wrapped.no_sync() if d.world > 1 and not last else nullcontext():
            with autocast:
                loss, terms = wrapped(batch)
            (loss / cfg.grad_accum).backward()
        sums.add(loss, terms, batch["input_ids"].numel())


def training_state(step: int, words: WordPlan | None, count: int | None = None) -> dict[str, int | None]:
    """What an exported model records of its training (kdcache_training.json): the step and words seen, and for a
    checkpoint by words seen the count it was saved at."""
    state = {"step": step, "words_seen": int(words.seen[step]) if words is not None else None}
    return state if count is None else {**state, "checkpoint_words": count}


def save_word_checkpoints(model: PreTrainedModel, words: WordPlan | None, done: int, out_dir: Path,
                          tokenizer_dir: str | Path, d: Dist) -> None:
    """Rank 0 exports a complete Hugging Face directory (atomically) for every count first reached at step `done`."""
    for count in words.due(done) if words is not None and d.main else []:
        export_model(model, tokenizer_dir, out_dir / "checkpoints" / checkpoint_name(count),
                     training_state(done, words, count))


def train(
    model: PreTrainedModel,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    loss_fn: LossFn = lm_loss,
    *,
    seed: int,
    resume: bool,
    fingerprint: dict[str, Any],
    tokenizer_dir: str | Path,
    collate_fn: Callable | None = None,
    extra_modules: nn.Module | None = None,
    dev: TokenDataset | None = None,
    words: np.ndarray | None = None,
) -> PreTrainedModel:
    """Train `model` (and `extra_modules`) on `dataset`; checkpoints in out_dir/checkpoints, metrics in
    out_dir/metrics.jsonl, the final model exported to out_dir/model. Returns the trained model.

    `fingerprint` identifies the run (model shape, data, ...); the trajectory-relevant training settings and the
    seed are added to it, and a checkpoint with another fingerprint is refused on resume. With `dev` and
    `cfg.eval_every`, the dev cross-entropy is measured (rank 0, no gradient, no RNG draw) every eval_every steps
    and after the last, and logged as `dev_ce`. With `words` (the words of each sequence of `dataset`), every record
    carries the words seen, and `cfg.save_at_words` exports out_dir/checkpoints/chck_<N>M at the first step
    reaching each count.
    """
    d = init_distributed()
    out_dir = Path(out_dir)
    check_batch_split(cfg, d.world)
    total = total_steps(cfg, len(dataset))
    word_plan = plan_words(cfg, words, seed, total, f"{out_dir}: train")
    fingerprint = run_fingerprint(fingerprint, seed, cfg)
    module, state = make_state(model, extra_modules, loss_fn, cfg, total, d)
    torch.manual_seed(seed + d.rank)  # dropout draws: reproducible, and different on each rank
    start = start_step(out_dir, resume, fingerprint, state, d, word_plan.seen if word_plan is not None else None)
    wrapped = module if d.world == 1 else \
        DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    micro_batches = iter(step_loader(dataset, cfg, d, seed, start, total, collate_fn))
    params = [p for p in module.parameters() if p.requires_grad]
    if d.main and word_plan is not None:  # counts passed before the resumed step whose directory is not there
        lost = [checkpoint_name(c) for c in word_plan.saved_before(start)
                if not (out_dir / "checkpoints" / checkpoint_name(c)).is_dir()]
        if lost:
            print(f"{out_dir}: resuming at step {start}, past the words of {', '.join(lost)}, which no directory holds "
                  f"(save_at_words changed, or deleted): they are not saved again")
    if d.main and start < total:
        print(f"{out_dir}: {count_parameters(model):,} parameters, steps {start} -> {total}, "
              f"batch {cfg.batch_size} = {d.world} ranks x {cfg.grad_accum} accum x "
              f"{cfg.batch_size // (d.world * cfg.grad_accum)} sequences")
    report = RunReport(out_dir, d, start, total, steps_per_epoch=len(dataset) // cfg.batch_size,
                       words_seen=word_plan.seen if word_plan is not None else None)

    module.train()
    for step in range(start, total):
        accumulate_gradients(wrapped, micro_batches, cfg, d, report.sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        lr = state.scheduler.get_last_lr()[0]
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        report.step(done, lr, grad_norm, logged=done % cfg.log_every == 0 or done == total)
        if dev is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total):
            report.evaluate(done, model, dev, cfg.batch_size)
            module.train()
        # before latest.pt: a run killed in between redoes this step and saves the same weights again
        save_word_checkpoints(model, word_plan, done, out_dir, tokenizer_dir, d)
        if done % cfg.checkpoint_every == 0 or done == total:
            checkpoint(out_dir / CHECKPOINT, done, fingerprint, state, d, tokenizer_dir,
                       training_state(done, word_plan)["words_seen"])
    report.close()

    if d.main:
        export_model(model, tokenizer_dir, out_dir / "model", training_state(total, word_plan))
    barrier(d)  # every rank returns once the export exists
    return model
