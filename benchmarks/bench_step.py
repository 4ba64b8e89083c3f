"""Item 4: one student training step, plain LM vs offline KD vs online KD: time and peak memory.

Targets (GPU): offline / plain step time <= 1.10 and peak memory <= 1.05; online / offline >= 1.8.

The step is the trainer's: `LossModule` + `accumulate_gradients` (bf16 autocast on CUDA) + gradient clipping +
fused AdamW, with the loss built as `kdcache distill` builds it (`student.distill.make_kd_loss` over a `KDPlan`,
`student.online.make_online_loss` with both teachers in memory, `student.lm.lm_loss`). The batch has
the dtypes `DistillDataset` yields (float16 logits, int32 ids and counts, float32 lse); its teacher targets are
the top-k, logsumexp and samples of random logits, made by precompute's own functions; like a DataLoader's
batch it waits in (pinned) host memory, so every step pays its copy to the device as training does. Peak memory is
torch.cuda.max_memory_allocated; a CPU has no comparable figure for torch, so it reads n/a there.

    python benchmarks/bench_step.py [--profile cpu|seed|quick]
"""

from __future__ import annotations

import argparse
import gc
from statistics import median
from typing import Callable

import torch
from torch import Tensor

from benchlib import PROFILES, SPECIAL_IDS, Profile, Section, Table, Target, run_section, time_interleaved
from kdcache.config import TrainConfig
from kdcache.precompute.targets import sample_counts, topk_targets
from kdcache.student.distill import make_kd_loss
from kdcache.student.kd import KDPlan
from kdcache.student.kd.hidden import HiddenAlignment, HiddenPair, uniform_layer_mapping
from kdcache.student.model import build_model
from kdcache.runtime import Dist
from kdcache.student.lm import lm_loss
from kdcache.student.loop import LossModule, accumulate_gradients, make_optimizer
from kdcache.student.metrics import MetricSums
from kdcache.student.online import make_online_loss

TEMPERATURE = 2.0
HARD_WEIGHT = 0.5
FORMS = ("tail", "renorm", "sampled")
LossMaker = Callable[[], tuple[Callable, torch.nn.Module | None]]  # -> (loss_fn, extra trainable modules)


def teacher_batch(profile: Profile, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Tokens plus every array any variant reads, for each teacher: made on the device, returned in host memory
    (pinned on CUDA, as the trainer's DataLoader hands batches over)."""
    gen = torch.Generator(device).manual_seed(seed)
    shape = (profile.batch, profile.seq_len)
    batch = {"input_ids": torch.randint(3, profile.vocab, shape, generator=gen, device=device)}
    for i, (name, teacher) in enumerate(profile.teachers.items()):
        logits = torch.randn(*shape, profile.vocab, generator=gen, device=device) * 3
        targets = topk_targets(logits, profile.k, [TEMPERATURE])
        sample_ids, counts = sample_counts(logits, profile.samples, 1.0, gen)
        batch.update({f"{name}/topk_logits": targets["topk_logits"], f"{name}/topk_ids": targets["topk_ids"].int(),
                      f"{name}/lse": targets["lse"][..., 0],
                      f"{name}/sample_ids": sample_ids.int(), f"{name}/sample_counts": counts.int()})
        if i == 0:
            batch[f"{name}/hidden_{profile.hidden_teacher_layer}"] = torch.randn(
                *shape, teacher.hidden_size, generator=gen, device=device).half()
        del logits
    return {key: value.cpu().pin_memory() if device.type == "cuda" else value for key, value in batch.items()}


def kd_plan(profile: Profile, form: str, hidden: bool) -> KDPlan:
    teachers = list(profile.teachers)
    pairs = ()
    if hidden:
        first = profile.teachers[teachers[0]]
        [(student_layer, layer)] = uniform_layer_mapping(profile.student.num_layers, [profile.hidden_teacher_layer],
                                                         first.num_layers)
        pairs = (HiddenPair(student_layer, teachers[0], layer, first.hidden_size, quantized=False),)
    return KDPlan({t: 0.25 for t in teachers}, form, HARD_WEIGHT, TEMPERATURE, {t: 0 for t in teachers}, pairs,
                  0.1 if hidden else 0.0, "mse")


def training_step(profile: Profile, device: torch.device, batch: dict[str, Tensor], make_loss: LossMaker
                  ) -> Callable[[], None]:
    """One full training step on `batch` of a fresh student (same init every call) with its loss and optimizer."""
    torch.manual_seed(0)
    model = build_model(profile.student, profile.vocab, SPECIAL_IDS).to(device)
    loss_fn, extra = make_loss()
    if extra is not None:
        extra.to(device)
    module = LossModule(model, extra, loss_fn, compile=False)
    cfg = TrainConfig(batch_size=profile.batch)
    optimizer = make_optimizer(module, cfg, device)
    params = [p for p in module.parameters() if p.requires_grad]
    d, sums = Dist(0, 1, device), MetricSums(device)
    module.train()

    def step() -> None:
        accumulate_gradients(module, iter([batch]), cfg, d, sums)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory(profile: Profile, device: torch.device, batch: dict[str, Tensor], make_loss: LossMaker
                ) -> float | None:
    """Peak GiB over building and running a variant alone (warm-up steps and one more) on CUDA; None on a CPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = training_step(profile, device, batch, make_loss)
    for _ in range(profile.warmup + 1):
        step()
    torch.cuda.synchronize()
    del step
    return torch.cuda.max_memory_allocated() / 2**30


def online_teachers(profile: Profile, device: torch.device) -> dict[str, torch.nn.Module]:
    """Random-init teachers, frozen, as `load_online_teachers` holds them (float32 weights)."""
    teachers = {}
    for i, (name, shape) in enumerate(profile.teachers.items()):
        torch.manual_seed(100 + i)
        teachers[name] = build_model(shape, profile.vocab, SPECIAL_IDS).to(device).eval().requires_grad_(False)
    return teachers


def variants(profile: Profile, device: torch.device) -> list[tuple[str, dict[str, Tensor], LossMaker]]:
    """(name, batch, loss maker) of every step measured; each batch holds only what its loss reads."""
    full = teacher_batch(profile, device)
    tokens = {"input_ids": full["input_ids"]}
    out = [("plain LM", tokens, lambda: (lm_loss, None))]
    for form in FORMS:
        for hidden in (False, True):
            plan = kd_plan(profile, form, hidden)
            wanted = {"input_ids", *(f"{t}/{a}" for t, arrays in plan.arrays().items() for a in arrays)}

            def make(plan: KDPlan = plan) -> tuple[Callable, torch.nn.Module | None]:
                if not plan.hidden:
                    return make_kd_loss(plan, None), None
                hidden_term = HiddenAlignment(plan.hidden, plan.hidden_kind, profile.student.hidden_size)
                return make_kd_loss(plan, hidden_term), hidden_term.projections

            out.append((f"offline {form}" + (" + hidden" if hidden else ""),
                        {key: value for key, value in full.items() if key in wanted}, make))
    weights = {t: 0.25 for t in profile.teachers}
    # The teachers are built inside the maker: they are in memory (and in the peak) only for this variant.
    out.append(("online KD (both teachers, dense KL)", tokens,
                lambda: (make_online_loss(online_teachers(profile, device), weights, HARD_WEIGHT, TEMPERATURE), None)))
    return out


def run(profile: Profile) -> Section:
    """Every variant's peak memory alone (CUDA), then their step times interleaved: one step of each variant in
    turn, so a drifting machine slows all of them alike and the ratios compare steps taken side by side."""
    device = torch.device(profile.device)
    steps = variants(profile, device)
    peaks = {name: peak_memory(profile, device, batch, make) for name, batch, make in steps}
    gc.collect()
    times = time_interleaved({name: training_step(profile, device, batch, make) for name, batch, make in steps},
                             profile.warmup, profile.steps, device.type)
    return section(profile, {name: (median(times[name]), peaks[name]) for name, _, _ in steps})


def section(profile: Profile, results: dict[str, tuple[float, float | None]]) -> Section:
    plain_s, plain_mem = results["plain LM"]
    offline_s = results["offline tail"][0]
    tokens = profile.batch * profile.seq_len
    rows = [[name, s * 1e3, tokens / s, s / plain_s, "n/a" if mem is None else f"{mem:.2f}",
             "n/a" if mem is None else f"{mem / plain_mem:.3f}"] for name, (s, mem) in results.items()]
    online_s = results["online KD (both teachers, dense KL)"][0]
    table = Table(["step", "ms", "tokens/s", "x plain time", "peak GiB", "x plain memory"], rows,
                  f"{profile.device}, student {profile.student.arch} {profile.student.hidden_size}x"
                  f"{profile.student.num_layers}, teachers {', '.join(profile.teachers)}, vocab {profile.vocab}, "
                  f"batch {profile.batch} x {profile.seq_len}, k={profile.k}, {profile.samples} samples, "
                  f"median of {profile.steps} steps after {profile.warmup}, the variants' steps interleaved")
    targets = []
    for name, (s, mem) in results.items():
        if name.startswith("offline"):
            targets.append(Target(f"{name} / plain, step time", s / plain_s, 1.10, at_least=False))
            if mem is not None:
                targets.append(Target(f"{name} / plain, peak memory", mem / plain_mem, 1.05, at_least=False))
    if plain_mem is None:
        targets.append(Target("offline / plain, peak memory", None, 1.05, at_least=False,
                              note="no peak-memory figure for torch on a CPU"))
    targets.append(Target("online / offline tail, step time", online_s / offline_s, 1.8, at_least=True))
    section = Section("4. Student step: plain vs offline KD vs online KD", [table], targets)
    if profile.device == "cpu":
        section.notes.append("CPU shapes are the seed's halved and the batch is small: only the ratios carry over, "
                             "and repeats on a shared 2-core machine move them by a few percent.")
    return section


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    print(run_section(run, PROFILES[parser.parse_args().profile]).markdown())
