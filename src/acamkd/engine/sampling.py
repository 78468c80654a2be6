"""Data order and augmentation randomness that a resumed run reproduces exactly.

Two pieces make "kill mid-epoch, resume, same result" hold with any number of processes and
data-loader workers:

* :class:`ResumableSampler`: the epoch's order is a permutation drawn from ``(seed, epoch)``
  only, sharded across ranks like ``DistributedSampler`` (padded so every rank gets the same
  count), and it can start part-way through an epoch (``set_epoch(epoch, start=k)`` skips the
  first ``k`` of this rank's indices without loading them).
* :class:`PerSampleSeed`: wraps a dataset so that each item's random transforms draw from a
  generator seeded by ``(seed, epoch, index)``, not from whatever state the global generator
  of whichever worker process happens to be in. The same sample gets the same augmentation
  whether it is loaded in an uninterrupted run or after a resume, by any worker.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "PerSampleSeed", "mix_seed"]


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (int(v) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered), rank-sharded indices for one epoch, startable mid-epoch."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if length < 1:
            raise ValueError(f"ResumableSampler: the dataset is empty (length {length})")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank {rank} outside world_size {world_size}")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(length / world_size)  # every rank gets the same count
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; skip the first ``start`` indices of this rank (resume)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"ResumableSampler: start {start} outside [0, {self.per_rank}]")
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """All of this rank's indices for the current epoch (ignoring ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        while len(order) < total:  # pad by wrapping, as DistributedSampler does (repeatedly if tiny)
            order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "length": self.length,
                "world_size": self.world_size}


class PerSampleSeed(Dataset):
    """``dataset[i]`` with torch's global generator seeded by ``(seed, epoch, i)`` meanwhile.

    The caller's generator state is saved and restored around each item, so wrapping changes
    nothing outside the item. Call :meth:`set_epoch` each epoch (the engine does, before the
    data-loader iterator is created, so worker processes see it).
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        saved = torch.get_rng_state()
        torch.manual_seed(mix_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)

    def __getattr__(self, name: str):  # dataset attributes (num_classes, ann_file, ...) pass through
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
