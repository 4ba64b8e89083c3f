"""The distill recipe: config -> KD plan -> dataset -> student -> loss -> the trainer (and its two baselines).

No teacher weights are loaded here: the student reads the teachers' cached targets from the store through
`kdcache.student.kd`. The `--online` baseline (student/online.py), which exists only to be compared against, is the
one exception.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import zarr
from torch import Tensor, nn

from kdcache.cache import schema
from kdcache.cache.manifest import checked_manifest, seal_problems
from kdcache.cache.schema import StoreError
from kdcache.cache.words import read_word_counts
from kdcache.config import Config, RunPaths, run_paths
from kdcache.student.data import TokenDataset
from kdcache.student.kd import DistillDataset, KDLoss, KDPlan
from kdcache.student.kd.hidden import HiddenAlignment, HiddenPair, uniform_layer_mapping
from kdcache.student.lm import lm_loss
from kdcache.student.loop import LossFn, train
from kdcache.student.model import build_model
from kdcache.student.online import load_online_teachers, make_online_loss


def plan_from_config(cfg: Config, store: zarr.Group, num_student_layers: int) -> KDPlan:
    """Resolve the config's distillation section against what the store actually holds."""
    d = cfg.distill
    plan = KDPlan.from_store(store, cfg.teacher_weights(), form=d.form, temperature=d.temperature,
                             hard_weight=d.hard_weight)
    hidden = hidden_pairs(cfg, store, num_student_layers) if d.hidden.weight else ()
    return dataclasses.replace(plan, hidden=hidden, hidden_weight=d.hidden.weight, hidden_kind=d.hidden.kind)


def hidden_pairs(cfg: Config, store: zarr.Group, num_student_layers: int) -> tuple[HiddenPair, ...]:
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


def check_run_matches_store(cfg: Config, paths: RunPaths, attrs: dict, tokenizer_sha: str) -> None:
    """Refuse a config that no longer describes the store (edited after `kdcache data`), before any student is built."""
    problems = [f"{key} is {mine!r}, the store's is {attrs.get(name)!r}"
                for key, name, mine in (("tokenizer.vocab_size", "vocab_size", cfg.tokenizer.vocab_size),
                                        ("data.seq_len", "seq_len", cfg.data.seq_len))
                if mine is not None and attrs.get(name) != mine]  # vocab_size None: a pretrained tokenizer's own
    if attrs.get("tokenizer_sha256") != tokenizer_sha:
        problems.append(f"{paths.tokenizer} is not the tokenizer the store's tokens were made with "
                        "(tokenizer_sha256 differs)")
    if problems:
        raise StoreError(f"{cfg.source_path} does not match the store {paths.store}: " + "; ".join(problems)
                         + " (rerun `kdcache data --overwrite` and `kdcache precompute`, or restore the config)")


def make_kd_loss(plan: KDPlan, hidden: HiddenAlignment | None) -> LossFn:
    """The trainer's loss_fn(model, batch): the plan's KD loss, plus the weighted hidden alignment if any."""
    kd = KDLoss(plan)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(input_ids=batch["input_ids"], output_hidden_states=hidden is not None)
        total, terms = kd(out.logits, batch)
        if hidden is not None:
            aligned = hidden(out.hidden_states, batch)
            total = total + plan.hidden_weight * aligned
            terms["hidden"] = aligned.detach()
        return total, terms

    return loss_fn


def distill(cfg: Config, runs_root: str | Path = "runs", resume: bool = False, baseline: bool = False,
            online: bool = False, out_dir: Path | None = None) -> Path:
    """Train the student against the cache; returns its exported model directory. `baseline`: the same student on
    hard labels only (runs/<n>/baseline); `online`: the comparison run with the teachers in memory and dense KL
    (runs/<n>/online). `out_dir` replaces that default directory (a study's runs)."""
    paths = run_paths(cfg, runs_root)
    checked_manifest(paths.store, "train", None)  # a damaged metadata document is named before zarr reads it
    if (unsealed := seal_problems(paths.store)) and not cfg.distill.allow_unsealed:
        raise StoreError(f"{unsealed[0]}; or set distill.allow_unsealed: true to train on it unchecked")
    store = schema.open_store(str(paths.store))
    attrs = dict(store.attrs)
    expect = {"tokenizer_sha": schema.tokenizer_sha256(paths.tokenizer), "vocab_size": cfg.tokenizer.vocab_size,
              "seq_len": cfg.data.seq_len}
    check_run_matches_store(cfg, paths, attrs, expect["tokenizer_sha"])
    torch.manual_seed(cfg.seed)  # same initial student with and without distillation
    model = build_model(cfg.student, attrs["vocab_size"], attrs["special_ids"])
    fingerprint = {"student": dataclasses.asdict(cfg.student), "tokenizer_sha256": expect["tokenizer_sha"]}
    extra, collate_fn = None, None
    if baseline:
        default_dir, dataset, loss_fn = paths.baseline, TokenDataset(paths.store, "train"), lm_loss
        schema.check_store(store, tokenizer_sha=expect["tokenizer_sha"], seq_len=cfg.data.seq_len,
                           split_names=["train"])
        fingerprint["kd"] = None
    elif online:
        default_dir, dataset = paths.online, TokenDataset(paths.store, "train")
        teachers = load_online_teachers(cfg, runs_root, attrs["vocab_size"])
        loss_fn = make_online_loss(teachers, cfg.teacher_weights(), cfg.distill.hard_weight, cfg.distill.temperature)
        fingerprint["kd"] = "online"
    else:
        plan = plan_from_config(cfg, store, model.config.num_hidden_layers)
        default_dir, dataset = paths.student, DistillDataset(paths.store, "train", plan, expect)
        collate_fn = DistillDataset.collate  # the dataset fetches whole batches
        hidden = HiddenAlignment(plan.hidden, plan.hidden_kind, model.config.hidden_size) if plan.hidden else None
        extra = hidden.projections if hidden is not None else None
        loss_fn = make_kd_loss(plan, hidden)
        fingerprint["kd"] = dataclasses.asdict(plan)
        fingerprint["teachers"] = {name: store[f"{schema.TEACHERS}/{name}"].attrs.get("settings_digest")
                                   for name in plan.arrays()}
    out_dir = out_dir or default_dir
    dev = TokenDataset(paths.store, "dev") if cfg.student_train.eval_every else None
    train(model, dataset, cfg.student_train, out_dir, loss_fn, seed=cfg.seed, resume=resume, fingerprint=fingerprint,
          tokenizer_dir=paths.tokenizer, extra_modules=extra, collate_fn=collate_fn, dev=dev,
          words=read_word_counts(store, "train"))
    return out_dir / "model"
