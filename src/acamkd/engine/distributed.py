"""Process-group plumbing for ``torchrun``: one process per device, rank 0 writes.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op, so the
same code path serves one CPU, one GPU and many GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "all_reduce_mean", "gather_objects", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (NCCL on GPU, gloo on CPU), or run alone."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over processes (one collective for the whole dict)."""
    if not info.distributed or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / info.world_size).tolist()))


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` in rank order (on every process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP keeps parameters equal, but each process's last training forward updates its own
    BatchNorm statistics: without this, processes would evaluate slightly different models,
    none of them exactly the one rank 0 saves.
    """
    if not info.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
