"""The training loop shared by teachers (next-token cross-entropy) and students (distillation against the store).

A plain PyTorch loop over a Hugging Face model: AdamW, linear warm-up then cosine decay, gradient accumulation,
clipping, bf16 autocast on CUDA (fp32 on CPU), optional torch.compile, DDP under torchrun.

One optimizer step reads `cfg.batch_size` sequences = world_size x grad_accum x micro-batch. The data order is a
seeded permutation per epoch shared by every rank: step s reads the next `batch_size` sequences of its epoch's
permutation and rank r takes the strided slice r::world_size of them. The data position is therefore a function of
the step count alone, and `resume` continues exactly: model, extra modules, optimizer, scheduler, every rank's RNG
and the step are restored from `checkpoints/latest.pt`, which is written atomically (temp file + rename).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kdcache.cache import schema
from kdcache.config import Config, TeacherConfig, TrainConfig, run_paths
from kdcache.cache.schema import StoreError
from kdcache.student.export import export_model
from kdcache.student.model import build_model, count_parameters
from kdcache.errors import KdcacheError
from kdcache.files import staged
from kdcache.runtime import Dist, barrier, init_distributed

# loss_fn(model, batch) -> (loss to minimise, per-term metrics); metric values may stay tensors (no sync per step).
LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float | Tensor]]]

CHECKPOINT = Path("checkpoints") / "latest.pt"
METRICS = "metrics.jsonl"
# TrainConfig keys that change how a run executes, not the trajectory it follows: free to change on resume.
EXECUTION_KEYS = ("grad_accum", "checkpoint_every", "log_every", "compile", "num_workers")


class TrainError(KdcacheError):
    """A run that cannot start or resume; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Data.


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


class StepBatches(Sampler[list[int]]):
    """The micro-batches (lists of sequence indices) this rank reads for optimizer steps start..total-1."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, d: Dist, seed: int, start: int, total: int):
        self.n, self.batch_size, self.grad_accum, self.d = n, batch_size, grad_accum, d
        self.seed, self.start, self.total = seed, start, total

    def __len__(self) -> int:
        return (self.total - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch_size
        order, order_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, offset = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.seed, epoch, self.n), epoch
            batch = order[offset * self.batch_size : (offset + 1) * self.batch_size]
            for micro in np.array_split(batch[self.d.rank :: self.d.world], self.grad_accum):
                yield micro.tolist()


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


# ---------------------------------------------------------------------------------------------------------------
# Loss, optimizer, schedule.


def next_token_ce(logits: Tensor, input_ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of each position's prediction of the next token (L-1 positions per sequence), in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Plain language modelling: next-token cross-entropy."""
    ids = batch["input_ids"]
    loss = next_token_ce(model(input_ids=ids, use_cache=False).logits, ids)
    return loss, {"ce": loss.detach()}


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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.


def trajectory_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_KEYS}


def _canonical(obj: Any) -> Any:
    return json.loads(schema.canonical_json(obj))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise TrainError(f"{path}: not a readable kdcache checkpoint ({e.__class__.__name__}: {e})") from None


def check_fingerprint(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another run (model, data, seed or trajectory-relevant training settings)."""
    saved, expected = _canonical(saved), _canonical(expected)
    differ = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {expected.get(k)!r}" for k in differ)
        raise TrainError(f"{path}: checkpoint is from another config ({detail}); delete it to start over")


def model_from_checkpoint(path: str | Path) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The model saved in a checkpoint, and the checkpoint (for its tokenizer_dir and step)."""
    ckpt = load_checkpoint(path)
    config = dict(ckpt["hf_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def rng_states(d: Dist) -> list[dict[str, Tensor | None]]:
    """Every rank's RNG state (dropout draws differ per rank), gathered on every rank."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}
    if d.world == 1:
        return [state]
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary name, then rename: a crash mid-write leaves the previous checkpoint intact."""
    with staged(path) as tmp:
        torch.save(state, tmp)


@dataclass
class TrainState:
    """What a checkpoint restores besides the RNG and the step."""

    model: PreTrainedModel
    extra: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "extra": self.extra.state_dict() if self.extra is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.extra is not None:
            self.extra.load_state_dict(ckpt["extra"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])


def checkpoint(path: Path, step: int, fingerprint: dict[str, Any], state: TrainState, d: Dist,
               tokenizer_dir: str | Path) -> None:
    rng = rng_states(d)  # a collective: every rank takes part
    if d.main:
        save_checkpoint(path, {"step": step, "fingerprint": _canonical(fingerprint),
                               "hf_config": state.model.config.to_dict(), "tokenizer_dir": str(tokenizer_dir),
                               "rng": rng, **state.state_dict()})


def restore(path: Path, fingerprint: dict[str, Any], state: TrainState, d: Dist) -> int:
    """Load a checkpoint into the run's objects; returns the step to continue from."""
    ckpt = load_checkpoint(path)
    check_fingerprint(path, ckpt["fingerprint"], fingerprint)
    state.load_state_dict(ckpt)
    if len(ckpt["rng"]) == d.world:  # another world size draws other dropout masks anyway: keep the fresh seed
        rng = ckpt["rng"][d.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    if d.main:
        print(f"{path}: resuming at step {ckpt['step']}")
    return ckpt["step"]


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step (rank 0 only), and TensorBoard events when installed.

    On resume the records past the checkpoint's step (steps that will be redone) are dropped first, so the file
    reads like one uninterrupted run.
    """

    def __init__(self, out_dir: Path, keep_until: int):
        path = out_dir / METRICS
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= keep_until] if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))
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


# ---------------------------------------------------------------------------------------------------------------
# The loop.


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
) -> PreTrainedModel:
    """Train `model` (and `extra_modules`) on `dataset`; checkpoints in out_dir/checkpoints, metrics in
    out_dir/metrics.jsonl, the final model exported to out_dir/model. Returns the trained model.

    `fingerprint` identifies the run (model shape, data, ...); the trajectory-relevant training settings and the
    seed are added to it, and a checkpoint with another fingerprint is refused on resume.
    """
    d = init_distributed()
    out_dir = Path(out_dir)
    check_batch_split(cfg, d.world)
    total = total_steps(cfg, len(dataset))
    steps_per_epoch = len(dataset) // cfg.batch_size
    fingerprint = {**fingerprint, "seed": seed, "train": trajectory_config(cfg)}
    ckpt_path = out_dir / CHECKPOINT

    model.to(d.device)
    if extra_modules is not None:
        extra_modules.to(d.device)
    module = LossModule(model, extra_modules, loss_fn, cfg.compile)
    optimizer = make_optimizer(module, cfg, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total))
    state = TrainState(model, extra_modules, optimizer, scheduler)
    torch.manual_seed(seed + d.rank)  # dropout draws: reproducible, and different on each rank

    start = 0
    if ckpt_path.exists():
        if not resume:
            raise TrainError(f"{ckpt_path}: a checkpoint exists; pass --resume to continue it, or delete {out_dir}")
        start = restore(ckpt_path, fingerprint, state, d)
    wrapped = module if d.world == 1 else \
        DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    loader = DataLoader(
        dataset,
        batch_sampler=StepBatches(len(dataset), cfg.batch_size, cfg.grad_accum, d, seed, start, total),
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # its worker seeds must not draw from the global RNG
    )
    micro_batches = iter(loader)
    params = [p for p in module.parameters() if p.requires_grad]
    log = MetricsLog(out_dir, keep_until=start) if d.main else None
    sums = MetricSums(d.device)
    if d.main and start < total:
        print(f"{out_dir}: {count_parameters(model):,} parameters, steps {start} -> {total}, "
              f"batch {cfg.batch_size} = {d.world} ranks x {cfg.grad_accum} accum x "
              f"{cfg.batch_size // (d.world * cfg.grad_accum)} sequences")
    progress = tqdm(total=total, initial=start, disable=not d.main, unit="step", desc=out_dir.name, dynamic_ncols=True)
    window_start = time.perf_counter()

    module.train()
    for step in range(start, total):
        accumulate_gradients(wrapped, micro_batches, cfg, d, sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update()
        if done % cfg.log_every == 0 or done == total:
            means, tokens = sums.reduce(d)
            tokens_per_s = tokens / (time.perf_counter() - window_start)
            window_start = time.perf_counter()
            if log:
                log.write({"step": done, "epoch": done / steps_per_epoch, "lr": lr, **means,
                           "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s})
            progress.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if done % cfg.checkpoint_every == 0 or done == total:
            checkpoint(ckpt_path, done, fingerprint, state, d, tokenizer_dir)
    progress.close()
    if log:
        log.close()

    if d.main:
        export_model(model, tokenizer_dir, out_dir / "model")
    barrier(d)  # every rank returns once the export exists
    return model


# ---------------------------------------------------------------------------------------------------------------
# Teachers.


def train_teacher(cfg: Config, teacher: TeacherConfig, runs_root: str | Path = "runs", resume: bool = False) -> Path:
    """Train one teacher from scratch on tokens/train of the run's store; returns its exported model directory."""
    paths = run_paths(cfg, runs_root)
    dataset = TokenDataset(paths.store, "train")
    if schema.tokenizer_sha256(paths.tokenizer) != dataset.attrs["tokenizer_sha256"]:
        raise StoreError(f"{paths.tokenizer}: not the tokenizer the tokens of {paths.store} were made with")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    model = build_model(teacher.model, dataset.attrs["vocab_size"], dataset.attrs["special_ids"])
    dataset.check_model(model.config)
    fingerprint = {
        "teacher": teacher.name,
        "model": dataclasses.asdict(teacher.model),
        "tokens": dataset.digest,
        "tokenizer_sha256": dataset.attrs["tokenizer_sha256"],
    }
    out_dir = paths.teacher(teacher.name)
    train(model, dataset, teacher.train, out_dir, lm_loss, seed=cfg.seed, resume=resume,
          fingerprint=fingerprint, tokenizer_dir=paths.tokenizer)
    return out_dir / "model"
