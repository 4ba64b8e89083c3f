"""Where this process runs: its device, its rank among torchrun's processes, and the process group."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class Dist:
    """This process's rank, the number of processes, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None = None) -> torch.device:
    """auto (CUDA when present) | cpu | cuda; a CUDA process takes the GPU of its LOCAL_RANK."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise KdcacheError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise KdcacheError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> Dist:
    """This process's rank and device; joins torchrun's process group when there are several processes
    (idempotent: later calls return the same answer; the group is closed when the process exits)."""
    torch_device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # ranks on one host share its cores (torchrun's default is 1 thread each)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return Dist(int(os.environ.get("RANK", "0")), world, torch_device)


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op alone)."""
    if d.world > 1:
        dist.barrier()
