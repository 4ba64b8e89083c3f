"""Distillation against the store: the dataset of tokens + cached targets, the KD loss, and the distill run.

No teacher weights are loaded here (except by the `--online` baseline, which exists only to be compared
against): the student reads the teachers' cached targets through `cache.reader`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdcache.cache import schema
from kdcache.config import Config, run_paths
from kdcache.cache.reader import StoreReader
from kdcache.cache.schema import StoreError
from kdcache.student.losses import (
    HiddenProjections, TeacherTargets, dense_kl, distillation_loss, hard_cross_entropy, hidden_alignment_loss,
    uniform_layer_mapping,
)
from kdcache.student.model import build_model
from kdcache.runtime import init_distributed
from kdcache.student.train import TokenDataset, lm_loss, train

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class HiddenPair:
    student_layer: int
    teacher: str
    teacher_layer: int
    teacher_dim: int
    quantized: bool  # int8 with a per-position scale


@dataclass(frozen=True)
class KDPlan:
    """What the loss needs from the store: which teacher groups, which arrays, at which temperature index."""

    weights: dict[str, float]  # store group -> KL weight
    form: str  # tail | renorm | sampled (seed_exact is tail on the ensemble group)
    temperature: float
    temperature_index: dict[str, int]  # store group -> column of its lse
    hidden: tuple[HiddenPair, ...]
    hidden_weight: float
    hidden_kind: str

    def arrays(self) -> dict[str, list[str]]:
        needed = {"tail": ["topk_logits", "topk_ids", "lse"], "renorm": ["topk_logits", "topk_ids"],
                  "sampled": ["sample_ids", "sample_counts"]}[self.form]
        arrays = {name: list(needed) for name in self.weights}
        for pair in self.hidden:
            arrays.setdefault(pair.teacher, []).append(f"hidden_{pair.teacher_layer}")
            if pair.quantized:
                arrays[pair.teacher].append(f"hidden_{pair.teacher_layer}_scale")
        return arrays


def plan_from_config(cfg: Config, store: schema.zarr.Group, num_student_layers: int) -> KDPlan:
    """Resolve the config's distillation section against what the store actually holds."""
    d = cfg.distill
    if d.form == "seed_exact":
        # BabyLlama: (1 - alpha) * T^2 * KLDivLoss(batchmean) on [B, L, V] = a per-position mean KL weighted by L.
        weights = {ENSEMBLE: (1.0 - d.hard_weight) * cfg.data.seq_len}
        form = "tail"
    else:
        weights = {k: v for k, v in cfg.teacher_weights().items() if v}
        form = d.form
    temperature_index = {}
    for name in weights:
        group = f"{schema.TEACHERS}/{name}"
        if group not in store:
            raise StoreError(f"{store.store}: no cached teacher {name!r}; run `kdcache precompute` first")
        temps = store[group].attrs["temperatures"]
        if d.temperature not in temps:
            raise StoreError(f"{store.store}: teacher {name!r} has no log-sum-exp at T={d.temperature} (has {temps})")
        temperature_index[name] = temps.index(d.temperature)
    return KDPlan(weights, form, d.temperature, temperature_index,
                  hidden_pairs(cfg, store, num_student_layers) if d.hidden.weight else (), d.hidden.weight, d.hidden.kind)


def hidden_pairs(cfg: Config, store: schema.zarr.Group, num_student_layers: int) -> tuple[HiddenPair, ...]:
    """Student layer -> cached teacher layer: explicit from the config, else uniform over every cached layer."""
    def dim(teacher: str, layer: int) -> int:
        path = f"{schema.TEACHERS}/{teacher}/train/hidden_{layer}"
        if path not in store:
            raise StoreError(f"{store.store}: teacher {teacher!r} has no cached hidden layer {layer}")
        return store[path].shape[-1]

    if cfg.distill.hidden.mapping:
        pairs = [(int(s), str(t), int(l)) for s, (t, l) in cfg.distill.hidden.mapping.items()]
    else:
        pairs = []
        for teacher, layers in cfg.cache.hidden_layers.items():
            n_teacher = cfg.teacher(teacher).model.num_layers
            pairs += [(s, teacher, l) for s, l in uniform_layer_mapping(num_student_layers, layers, n_teacher)]
    if not pairs:
        raise StoreError(f"{cfg.source_path}: distill.hidden.weight > 0 but no hidden layers are cached")
    def quantized(teacher: str) -> bool:
        return store[f"{schema.TEACHERS}/{teacher}"].attrs.get("hidden_dtype") == "int8"

    return tuple(HiddenPair(s, t, l, dim(t, l), quantized(t)) for s, t, l in pairs)


class DistillDataset(Dataset):
    """Token ids plus each teacher's cached targets for one sequence, as tensors (lse at the distill temperature)."""

    def __init__(self, store_path: str | Path, split: str, plan: KDPlan, expect: dict[str, Any]):
        self.plan = plan
        self.reader = StoreReader(store_path, teachers=list(plan.arrays()), arrays=plan.arrays(), split=split,
                                  expect=expect)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: value[0] for key, value in self.__getitems__([i]).items()}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        """The DataLoader's batched fetch: one reader call decodes the whole batch's chunks, and the batch stays
        one tensor per array (`collate` passes it on) instead of being split into items and stacked again."""
        batch = {key: self._convert(key, value) for key, value in self.reader.batch(idx).items()}
        for key in [k for k in batch if k.endswith("_scale")]:  # int8 hidden -> float16 values
            hidden = key.removesuffix("_scale")
            batch[hidden] = (batch[hidden].float() * batch.pop(key).float().unsqueeze(-1)).half()
        return batch

    @staticmethod
    def collate(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch

    def _convert(self, key: str, value: np.ndarray) -> Tensor:
        if key.endswith("/lse"):
            value = value[..., self.plan.temperature_index[key.split("/")[0]]]
        elif value.dtype == np.uint16:  # torch has few uint16 kernels; ids and counts fit int32
            value = value.astype(np.int32)
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor.long() if key == "input_ids" else tensor


def make_kd_loss(plan: KDPlan, hard_weight: float, projections: HiddenProjections | None):
    """loss_fn(model, batch) for the trainer: CE + weighted KL per teacher (+ hidden alignment)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(input_ids=batch["input_ids"], output_hidden_states=bool(plan.hidden))
        teachers = [
            TeacherTargets(name, weight, plan.form,
                           topk_logits=batch.get(f"{name}/topk_logits"), topk_ids=batch.get(f"{name}/topk_ids"),
                           lse=batch.get(f"{name}/lse"), sample_ids=batch.get(f"{name}/sample_ids"),
                           sample_counts=batch.get(f"{name}/sample_counts"))
            for name, weight in plan.weights.items()
        ]
        total, terms = distillation_loss(out.logits, batch["input_ids"], teachers, hard_weight, plan.temperature)
        if plan.hidden:
            hidden = torch.stack([
                hidden_alignment_loss(out.hidden_states[p.student_layer], batch[f"{p.teacher}/hidden_{p.teacher_layer}"],
                                      projections[HiddenProjections.key(p.student_layer, p.teacher, p.teacher_layer)],
                                      plan.hidden_kind)
                for p in plan.hidden
            ]).mean()
            total = total + plan.hidden_weight * hidden
            terms["hidden"] = hidden.detach()
        return total, terms

    return loss_fn


def distill(cfg: Config, runs_root: str | Path = "runs", resume: bool = False, baseline: bool = False,
            online: bool = False) -> Path:
    """Train the student against the cache. `baseline`: the same student on hard labels only (runs/<n>/baseline);
    `online`: the comparison run with the teachers in memory and dense KL (runs/<n>/online)."""
    paths = run_paths(cfg, runs_root)
    store = schema.open_store(str(paths.store))
    attrs = dict(store.attrs)
    expect = {"tokenizer_sha": schema.tokenizer_sha256(paths.tokenizer), "vocab_size": attrs.get("vocab_size"),
              "seq_len": cfg.data.seq_len}
    torch.manual_seed(cfg.seed)  # same initial student with and without distillation
    model = build_model(cfg.student, attrs["vocab_size"], attrs["special_ids"])
    fingerprint = {"student": dataclasses.asdict(cfg.student), "tokenizer_sha256": expect["tokenizer_sha"]}
    if baseline:
        dataset = TokenDataset(paths.store, "train")
        schema.check_store(store, tokenizer_sha=expect["tokenizer_sha"], seq_len=cfg.data.seq_len, split_names=["train"])
        return train_and_report(cfg, model, dataset, paths.baseline, lm_loss, resume, {**fingerprint, "kd": None},
                                paths.tokenizer, None)
    if online:
        dataset = TokenDataset(paths.store, "train")
        teachers = load_online_teachers(cfg, runs_root, attrs["vocab_size"])
        loss = make_online_loss(teachers, cfg.teacher_weights(), cfg.distill.hard_weight, cfg.distill.temperature)
        return train_and_report(cfg, model, dataset, paths.online, loss, resume,
                                {**fingerprint, "kd": "online"}, paths.tokenizer, None)
    plan = plan_from_config(cfg, store, model.config.num_hidden_layers)
    dataset = DistillDataset(paths.store, "train", plan, expect)
    projections = HiddenProjections(
        model.config.hidden_size, [(p.student_layer, p.teacher, p.teacher_layer, p.teacher_dim) for p in plan.hidden]
    ) if plan.hidden else None
    fingerprint = {**fingerprint, "kd": dataclasses.asdict(plan),
                   "teachers": {name: store[f"{schema.TEACHERS}/{name}"].attrs.get("settings_digest") for name in plan.arrays()}}
    return train_and_report(cfg, model, dataset, paths.student, make_kd_loss(plan, cfg.distill.hard_weight, projections),
                            resume, fingerprint, paths.tokenizer, projections, DistillDataset.collate)


def train_and_report(cfg: Config, model, dataset, out_dir: Path, loss_fn, resume: bool, fingerprint: dict,
                     tokenizer_dir: Path, extra: nn.Module | None, collate_fn=None) -> Path:
    train(model, dataset, cfg.student_train, out_dir, loss_fn, seed=cfg.seed, resume=resume,
          fingerprint=fingerprint, tokenizer_dir=tokenizer_dir, extra_modules=extra, collate_fn=collate_fn)
    return out_dir / "model"


def load_online_teachers(cfg: Config, runs_root: str | Path, vocab_size: int) -> dict[str, nn.Module]:
    """The online baseline only: every teacher in memory, frozen, on the training device."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - the cached path never needs it

    device = init_distributed().device
    teachers = {}
    for t in cfg.teachers:
        source = run_paths(cfg, runs_root).teacher_model(t)
        model = AutoModelForCausalLM.from_pretrained(source).to(device).eval().requires_grad_(False)
        if model.config.vocab_size != vocab_size:
            raise StoreError(f"{source}: teacher vocab_size {model.config.vocab_size} != store's {vocab_size}")
        teachers[t.name] = model
    return teachers


def make_online_loss(teachers: dict[str, nn.Module], weights: dict[str, float], hard_weight: float, temperature: float):
    """CE + weighted dense KL to teachers run on every batch (what kdcache exists to avoid)."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(input_ids=batch["input_ids"]).logits
        ce = hard_cross_entropy(logits, batch["input_ids"])
        total, terms = hard_weight * ce, {"hard_ce": ce.detach()}
        for name, teacher in teachers.items():
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits
            kl = dense_kl(logits, teacher_logits, temperature).mean()
            total = total + weights.get(name, 0.0) * kl
            terms[f"kl/{name}"] = kl.detach()
        return total, terms

    return loss_fn
