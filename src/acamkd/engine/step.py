"""One training step, the same for ``train``, ``distill``, ``bench distill`` and cost reports.

:class:`StudentAndMethod` holds what the optimizer trains (the student and the method's own,
training-only modules; one module so DDP averages the gradients of both). :class:`TrainingStep`
runs, per micro-batch: the frozen teacher's tapped features (eval, no grad), the student's task
losses and tapped features, the method's weighted losses on them; the sum is back-propagated
(scaled by the accumulation count); after the last micro-batch the gradients are clipped and the
optimizer and scheduler step. Nothing here knows the task: the :class:`~acamkd.engine.task.Task`
moves batches to the device and runs the models.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from acamkd.models import FeatureTaps

__all__ = ["NonFiniteLoss", "StudentAndMethod", "TrainingStep", "autocast_for"]


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf. ``losses`` holds every loss of that micro-batch as floats,
    ``micro_batch`` its index among the step's micro-batches."""

    def __init__(self, losses: dict[str, float], micro_batch: int = 0) -> None:
        self.losses, self.micro_batch = losses, micro_batch
        bad = {k: v for k, v in losses.items() if v != v or v in (float("inf"), float("-inf"))}
        super().__init__(f"non-finite loss {bad}; all losses: {losses}")


class StudentAndMethod(nn.Module):
    """The trained modules: ``student`` and ``method`` (None when training without distillation).

    ``forward(images, targets, teacher_feats=None, batch=None)`` returns the task losses as
    ``task.<name>`` and the method's weighted losses as ``distill.<name>``. ``student_taps`` record
    the student's distilled features during its own forward; they are not part of the state dict.
    """

    def __init__(self, student: nn.Module, method: nn.Module | None, task: Any, student_taps: FeatureTaps) -> None:
        super().__init__()
        self.student, self.method = student, method
        self._task, self._taps = task, student_taps  # not modules: not in the state dict

    def forward(self, images: Any, targets: Any, teacher_feats: dict[str, Tensor] | None = None,
                batch: Any = None) -> dict[str, Tensor]:
        task_losses, student_feats = self._task.student_forward(self.student, self._taps, images, targets)
        losses = {f"task.{k}": v for k, v in task_losses.items()}
        if self.method is not None:
            distill = self.method(teacher_feats, student_feats, batch=batch)
            losses.update({f"distill.{k}": v for k, v in distill.items()})
        return losses


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: autocast to bf16/fp16 on CUDA when ``amp`` asks, else a no-op."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=dtype)


class TrainingStep:
    """``step(micro_batches) -> losses``: forward, losses, backward for each micro-batch, then one
    optimizer step. Returns the last micro-batch's losses (detached) and their sum as ``loss``.

    Args:
        task: moves batches to the device, runs the teacher, builds the methods' batch facts.
        trained: the :class:`StudentAndMethod` whose parameters ``optimizer`` holds.
        teacher: the frozen teacher (eval mode, no grad), or None when training without one.
        teacher_taps: the teacher's hooks (None when the task reads its default levels directly).
        optimizer, scheduler: stepped once per call (``scheduler`` may be None).
        device: where batches go.
        model: what is called for the forward, ``trained`` or its DDP wrapper (default ``trained``).
        amp: "none" | "bf16" | "fp16" (CUDA only; fp16 adds a gradient scaler).
        grad_clip: max total gradient norm, or None.

    Raises:
        NonFiniteLoss: a loss is NaN or inf (before any backward of that micro-batch).
    """

    def __init__(self, task: Any, trained: StudentAndMethod, teacher: nn.Module | None,
                 teacher_taps: FeatureTaps | None, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 device: torch.device, model: nn.Module | None = None, amp: str = "none",
                 grad_clip: float | None = None) -> None:
        self.task, self.trained, self.teacher, self.teacher_taps = task, trained, teacher, teacher_taps
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, torch.device(device)
        self.model = model if model is not None else trained
        self.grad_clip = grad_clip
        self.autocast = autocast_for(amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and self.device.type == "cuda")

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """One micro-batch's forward: the named losses (with graph) under the configured autocast."""
        images, targets = self.task.to_device(batch, self.device)
        with self.autocast():
            teacher_feats = facts = None
            if self.teacher is not None:
                teacher_feats = self.task.teacher_forward(self.teacher, self.teacher_taps, images)
            if self.trained.method is not None:
                facts = self.task.distill_batch(images, targets)
            return self.model(images, targets, teacher_feats, facts)

    def backward(self, batch: Any, divisor: int = 1) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch (gradients accumulate, divided by ``divisor``)."""
        losses = self.losses(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise NonFiniteLoss({k: float(v.detach()) for k, v in losses.items()})
        self.scaler.scale(total / divisor).backward()
        return {**{k: v.detach() for k, v in losses.items()}, "loss": total.detach()}

    def optimizer_step(self) -> None:
        """Clip (after unscaling), step the optimizer and the scheduler, zero the gradients; then
        tell the method, if it has ``optimizer_stepped()`` (it counts optimizer steps)."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        stepped = getattr(self.trained.method, "optimizer_stepped", None)
        if stepped is not None:  # a method that depends on the step count (MasKD's mask warm-up)
            stepped()

    def __call__(self, micro_batches: Sequence[Any], accumulate: int | None = None) -> dict[str, Tensor]:
        """One optimizer step over ``micro_batches``; each loss is divided by ``accumulate``
        (default: the number of micro-batches given)."""
        if not micro_batches:
            raise ValueError("TrainingStep needs at least one micro-batch")
        divisor = accumulate or len(micro_batches)
        for i, batch in enumerate(micro_batches):
            try:
                losses = self.backward(batch, divisor)
            except NonFiniteLoss as err:
                err.micro_batch = i
                raise
        self.optimizer_step()
        return losses
