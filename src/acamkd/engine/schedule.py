"""Optimizers and learning-rate schedules: warm-up, then step / cosine / poly decay.

The schedule is a pure function of the iteration (:func:`lr_factor`), wrapped in a
``LambdaLR``: nothing but the iteration count needs saving, so a resumed run recomputes the
exact learning rate. Step milestones are in iterations (the engine converts epochs).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["lr_factor", "build_optimizer", "build_scheduler", "SCHEDULES", "OPTIMIZERS"]

SCHEDULES = ("step", "cosine", "poly")
OPTIMIZERS = ("sgd", "adamw")


def lr_factor(iteration: int, total: int, schedule: str = "step", milestones: Sequence[int] = (),
              gamma: float = 0.1, poly_power: float = 0.9, warmup_iters: int = 0,
              warmup_ratio: float = 0.001, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based) of ``total`` iterations.

    Cosine and poly decay from 1 to ``min_ratio`` (``train.min_lr / train.lr``).

    Warm-up is linear from ``warmup_ratio`` to 1 over ``warmup_iters`` iterations (mmdet's
    rule: ``ratio + (1 - ratio) * it / warmup_iters``), multiplied onto the decay, as mmdet does.
    """
    if schedule == "step":
        decay = gamma ** sum(iteration >= m for m in milestones)
    elif schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
        decay = min_ratio + (1 - min_ratio) * decay
    elif schedule == "poly":
        decay = (1 - min(iteration, total) / max(total, 1)) ** poly_power
        decay = min_ratio + (1 - min_ratio) * decay
    else:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if iteration < warmup_iters:
        decay *= warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters
    return decay


def build_optimizer(params: Iterable, name: str, lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW over ``params`` (student + method modules)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, schedule: str = "step",
                    milestones: Sequence[int] = (), gamma: float = 0.1, poly_power: float = 0.9,
                    warmup_iters: int = 0, warmup_ratio: float = 0.001,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` over :func:`lr_factor` (call ``step()`` once per optimizer step)."""
    lr_factor(0, total, schedule)  # validate the name now, not at the first step

    def factor(it: int) -> float:
        return lr_factor(it, total, schedule, milestones, gamma, poly_power, warmup_iters, warmup_ratio, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
