"""Training checkpoints: what a run saves every few steps, and how a resume restores it exactly or refuses it.

`checkpoints/latest.pt` holds the model, the extra trainable modules, the optimizer, the scheduler, every rank's
RNG state, the step and the words seen, with a fingerprint of the run (model, data, seed, trajectory-relevant training settings);
it is written atomically, so a crash mid-write leaves the previous one intact (the next start removes the temporary
file such a crash left).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from kdcache.cache import schema
from kdcache.config import TrainConfig
from kdcache.errors import KdcacheError
from kdcache.files import staged
from kdcache.runtime import Dist

CHECKPOINT = Path("checkpoints") / "latest.pt"
# TrainConfig keys that change how a run executes, not the trajectory it follows: free to change on resume.
EXECUTION_KEYS = ("grad_accum", "checkpoint_every", "log_every", "eval_every", "compile", "num_workers",
                  "save_at_words")


class TrainError(KdcacheError):
    """A run that cannot start or resume; the message names the file."""


def run_fingerprint(fingerprint: dict[str, Any], seed: int, cfg: TrainConfig) -> dict[str, Any]:
    """The caller's run identity (model shape, data, ...) plus the seed and the trajectory-relevant settings."""
    trajectory = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_KEYS}
    return {**fingerprint, "seed": seed, "train": trajectory}


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
               tokenizer_dir: str | Path, words_seen: int | None) -> None:
    """Save the run after `step` steps (rank 0 writes; every rank must call: the RNG states are gathered)."""
    rng = rng_states(d)  # a collective: every rank takes part
    if d.main:
        save_checkpoint(path, {"step": step, "words_seen": words_seen, "fingerprint": _canonical(fingerprint),
                               "hf_config": state.model.config.to_dict(), "tokenizer_dir": str(tokenizer_dir),
                               "rng": rng, **state.state_dict()})


def restore(path: Path, fingerprint: dict[str, Any], state: TrainState, d: Dist, seen: np.ndarray | None) -> int:
    """Load a checkpoint into the run's objects; returns the step to continue from. `seen`: the words seen after each
    step, as the run counts them now, which must agree with the count the checkpoint recorded."""
    ckpt = load_checkpoint(path)
    check_fingerprint(path, ckpt["fingerprint"], fingerprint)
    recorded, step = ckpt.get("words_seen"), ckpt["step"]
    if recorded is not None and seen is not None and recorded != int(seen[step]):
        raise TrainError(f"{path}: the checkpoint counted {recorded:,} words seen after step {step}, the store's "
                         f"words per sequence give {int(seen[step]):,}; delete it to start over")
    state.load_state_dict(ckpt)
    if len(ckpt["rng"]) == d.world:  # another world size draws other dropout masks anyway: keep the fresh seed
        rng = ckpt["rng"][d.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    if d.main:
        print(f"{path}: resuming at step {ckpt['step']}")
    return ckpt["step"]


def start_step(out_dir: Path, resume: bool, fingerprint: dict[str, Any], state: TrainState, d: Dist,
               seen: np.ndarray | None = None) -> int:
    """0 for a fresh run; with `resume`, the step its checkpoint reached (restored into `state`)."""
    path = out_dir / CHECKPOINT
    if d.main:  # what a run killed while saving left beside the last complete checkpoint is never loaded
        for debris in path.parent.glob(f"{path.name}.*.partial"):
            debris.unlink()
    if not path.exists():
        return 0
    if not resume:
        raise TrainError(f"{path}: a checkpoint exists; pass --resume to continue it, or delete {out_dir}")
    return restore(path, fingerprint, state, d, seen)
