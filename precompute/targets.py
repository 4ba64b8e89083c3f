"""The targets computed from a teacher's logits: top-k, logsumexps, sampled ids and counts, hidden states.

All of it runs on the teacher's device, one batch of token ids at a time: the teacher forward (bfloat16
autocast on CUDA, float32 on CPU), then every group's arrays for that batch (`batch_targets`), in the dtypes the
store keeps (cache.schema.teacher_array_specs). A large vocabulary splits the batch into passes of at most
PASS_LOGITS logits (sequences x positions x vocabulary), so the logits and their float32 copies (sampling's
probabilities, the ensemble's sum) stay a few GiB whatever V: at seq_len 128, 64 sequences a pass up to 16,384
ids, 6 at 151,936, 4 at 262,144.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from kdcache.cache.schema import ENSEMBLE, canonical_json
from kdcache.config import CacheConfig
from kdcache.errors import KdcacheError
from kdcache.precompute.teachers import Teacher

PASS_LOGITS = 2**27  # logits per teacher forward: 512 MiB in float32


def logsumexps(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """logsumexp(logits / T) over the full vocabulary for each T, [..., n_T], computed in float32."""
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True)
    return torch.stack([(x - m).div(t).exp().sum(dim=-1).log() + m[..., 0] / t for t in temperatures], dim=-1)


@functools.cache
def _fused_logsumexps() -> Callable[[torch.Tensor, list[float]], torch.Tensor]:
    # On CUDA the compiled form fuses the upcast, scaling and exponentials into a few passes over the logits instead
    # of materialising float32 copies (at batch 128 x 128, vocab 16000, each copy is 1 GB: slower than the forward).
    return torch.compile(logsumexps, dynamic=True)


def logsumexps_by_rows(logits: torch.Tensor, temperatures: list[float], argmax: torch.Tensor,
                       rows: int = 16) -> torch.Tensor:
    """`logsumexps` for a CPU, `rows` positions at a time (their passes stay in cache), each temperature through
    torch.log_softmax, whose vectorised kernel is the fastest full pass torch has on a CPU: logsumexp(z) =
    max(z) - log_softmax(z)[argmax], `argmax` [...] being each position's top-1 id. At [16, 128, 16000] on 2
    cores: 9-10 us per position, against 47 for torch.logsumexp over 64 rows at a time; 3e-6 from float64."""
    flat, at = logits.reshape(-1, logits.shape[-1]), argmax.reshape(-1, 1)
    out = torch.empty(flat.shape[0], len(temperatures), device=logits.device)
    for start in range(0, flat.shape[0], rows):
        chunk, chunk_at = flat[start:start + rows].float(), at[start:start + rows]
        top = chunk.gather(-1, chunk_at)
        for j, t in enumerate(temperatures):
            scaled = torch.log_softmax(chunk if t == 1 else chunk / t, dim=-1)
            out[start:start + rows, j] = (top / t - scaled.gather(-1, chunk_at))[:, 0]
    return out.reshape(*logits.shape[:-1], len(temperatures))


def topk_targets(logits: torch.Tensor, k: int, temperatures: list[float]) -> dict[str, torch.Tensor]:
    """Top-k logits (float16, descending), their ids, and logsumexp(logits / T) per T in float32."""
    values, ids = logits.topk(k, dim=-1)
    if logits.is_cuda:
        lse = _fused_logsumexps()(logits, temperatures)
    else:
        lse = logsumexps_by_rows(logits, temperatures, ids[..., 0])
    return {"topk_logits": values.half(), "topk_ids": ids, "lse": lse}


def sample_counts(logits: torch.Tensor, n: int, temperature: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` draws with replacement from softmax(logits / temperature) per position, as unique ids and counts.

    Returns ([..., min(n, V)] ids, counts), sorted by count descending then id ascending (a total order, so the
    bytes do not depend on sort stability), padded with id 0 / count 0.
    """
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.reshape(-1, vocab).float() / temperature, dim=-1)
    draws = torch.multinomial(probs, n, replacement=True, generator=generator).sort(dim=1).values
    # Run-length encode each sorted row: run index of every draw, then counts and ids per run.
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = starts.long().cumsum(dim=1) - 1
    counts = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, run, draws)  # every draw of a run has the same id
    key = torch.where(counts > 0, counts * vocab + (vocab - 1 - ids), 0)
    key = key.sort(dim=1, descending=True).values[:, : min(n, vocab)]
    counts = key // vocab
    ids = torch.where(counts > 0, vocab - 1 - key % vocab, 0)
    shape = (*logits.shape[:-1], key.shape[1])
    return ids.reshape(shape), counts.reshape(shape)


def quantize_int8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-position int8: value ~= q * scale, scale = absmax / 127 stored as float16."""
    scale = (hidden.abs().amax(dim=-1) / 127).half()
    s = scale.float().unsqueeze(-1)  # quantise against the stored (rounded) scale
    q = torch.where(s > 0, hidden / s.clamp_min(torch.finfo(torch.float32).tiny), 0)
    return q.round().clamp(-127, 127).to(torch.int8), scale


def hidden_targets(hidden: torch.Tensor, layer: int, dtype: str) -> dict[str, torch.Tensor]:
    """One hidden layer's arrays: float16 as is, or int8 with its per-position scale."""
    if dtype == "float16":
        return {f"hidden_{layer}": hidden.half()}
    q, scale = quantize_int8(hidden.float())
    return {f"hidden_{layer}": q, f"hidden_{layer}_scale": scale}


def shard_generator(seed: int, teacher: str, split: str, shard: int, device: torch.device) -> torch.Generator:
    """Sampling RNG of one shard, a function of (seed, teacher, split, shard) only: resumed and multi-rank runs
    draw the same samples."""
    digest = hashlib.sha256(canonical_json([seed, teacher, split, shard]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # float32 on CPU


def forward(model: PreTrainedModel, ids: torch.Tensor, hidden: bool = False) -> Any:
    """The teacher's forward over token ids [B, L] as precompute runs it (bfloat16 autocast on CUDA)."""
    with _autocast(ids.device):
        return model(input_ids=ids, output_hidden_states=hidden, use_cache=False)


class NonFiniteTargets(KdcacheError):
    """A teacher whose logits (or hidden states) are NaN or inf, or beyond float16: nothing of the shard is stored."""


def check_finite(group: str, arrays: dict[str, torch.Tensor], split: str, first: int) -> None:
    """Refuse NaN or inf in a group's float arrays of one batch, naming the split and sequence (`first` is the
    batch's first). A NaN or +inf logit anywhere makes the logsumexps non-finite, and a logit or hidden value beyond
    float16 becomes inf in its stored array, so the stored arrays are what is checked. One device sync per call."""
    lse = arrays["lse"]
    bad = torch.zeros(lse.shape[:2], dtype=torch.bool, device=lse.device)
    for x in (x for x in arrays.values() if x.is_floating_point()):
        bad |= ~torch.isfinite(x).reshape(*bad.shape, -1).all(-1)
    if bad.any():
        row, position = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteTargets(f"teacher {group!r}: NaN or inf targets at {split} sequence {first + row}, position "
                               f"{position} (the teacher's logits or hidden states are not finite, or exceed float16); "
                               "refused: that shard is not written")


def batch_targets(teachers: list[Teacher], ids: torch.Tensor, cache: CacheConfig,
                  generators: dict[str, torch.Generator], ensemble: bool,
                  where: tuple[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """Every group's arrays for one batch of token ids [B, L], in passes of at most PASS_LOGITS logits; `where` is
    (split, index of the batch's first sequence), for `check_finite`'s message."""
    vocab = teachers[0].model.config.vocab_size  # every teacher's: checked against the store's
    step = max(1, PASS_LOGITS // (ids.shape[1] * vocab))
    parts = [_pass_targets(teachers, ids[lo:lo + step], cache, generators, ensemble, (where[0], where[1] + lo))
             for lo in range(0, len(ids), step)]
    if len(parts) == 1:
        return parts[0]
    return {group: {name: torch.cat([part[group][name] for part in parts]) for name in arrays}
            for group, arrays in parts[0].items()}


def _pass_targets(teachers: list[Teacher], ids: torch.Tensor, cache: CacheConfig,
                  generators: dict[str, torch.Generator], ensemble: bool,
                  where: tuple[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """`batch_targets` of one pass: one forward per teacher."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    total = None
    for teacher in teachers:
        result = forward(teacher.model, ids, hidden=bool(teacher.hidden_layers))
        logits = result.logits  # bfloat16 under autocast: top-k is exact on it, the float32 math upcasts
        arrays = topk_targets(logits, cache.k, cache.temperatures)
        for layer in teacher.hidden_layers:
            arrays.update(hidden_targets(result.hidden_states[layer], layer, cache.hidden_dtype))
        check_finite(teacher.name, arrays, *where)  # before sampling, which fails on NaN probabilities
        if cache.samples:
            arrays["sample_ids"], arrays["sample_counts"] = sample_counts(
                logits, cache.samples, cache.sample_temperature, generators[teacher.name])
        out[teacher.name] = arrays
        if ensemble:
            total = logits.float() if total is None else total + logits.float()
    if ensemble:
        out[ENSEMBLE] = topk_targets(total / len(teachers), cache.k, cache.temperatures)
        check_finite(ENSEMBLE, out[ENSEMBLE], *where)
    return out
