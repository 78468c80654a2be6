"""One training loop for ``train`` and ``distill``, on one CPU, one GPU or many through torchrun.

Per micro-batch: the teacher (frozen, eval, no grad) computes its tapped features; the
:class:`Distiller` (student + method, one module so DDP syncs both) returns the task losses
and the weighted distillation losses; their sum is back-propagated. Every ``accumulate``
micro-batches the optimizer steps (gradient clipping first). A checkpoint after an optimizer
step records everything that decides the rest of the run (weights, optimizer, scheduler,
scaler, every process's RNG states, epoch and batches done in it), so ``resume`` continues to
the same result: the data order is a function of (seed, epoch) and augmentation of
(seed, epoch, index), see :mod:`acamkd.engine.sampling`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from acamkd.config import Config, dump_yaml
from acamkd.engine.checkpoint import LAST_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from acamkd.engine.distributed import DistInfo, all_reduce_mean, barrier, broadcast_buffers, gather_objects
from acamkd.engine.run_log import RunLog
from acamkd.engine.sampling import PerSampleSeed, ResumableSampler
from acamkd.engine.schedule import build_optimizer, build_scheduler

__all__ = ["Distiller", "Trainer", "TrainingDiverged"]

logger = logging.getLogger("acamkd")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf: the message names the step and the losses that went bad."""


class Distiller(nn.Module):
    """Student + distillation method in one module, so DDP averages the gradients of both."""

    def __init__(self, student: nn.Module, method: nn.Module | None, task: Any) -> None:
        super().__init__()
        self.student, self.method = student, method
        self._task = task  # not a module: not part of the state dict

    def forward(self, images, targets, teacher_feats: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        task_losses, student_feats = self._task.student_forward(self.student, images, targets)
        losses = {f"task.{k}": v for k, v in task_losses.items()}
        if self.method is not None:
            distill = self.method(teacher_feats, student_feats, batch=targets)
            losses.update({f"distill.{k}": v for k, v in distill.items()})
        return losses


class Trainer:
    """Builds the loop's pieces from the config and runs it; rank 0 writes everything."""

    def __init__(self, cfg: Config, task: Any, info: DistInfo, student: nn.Module,
                 train_set, val_set, teacher: nn.Module | None = None, method: nn.Module | None = None) -> None:
        self.cfg, self.task, self.info = cfg, task, info
        self.train_set, self.val_set = PerSampleSeed(train_set, cfg.train.seed), val_set
        self.teacher = teacher
        self.distiller = Distiller(student, method, task).to(info.device)
        if teacher is not None:
            teacher.to(info.device).eval().requires_grad_(False)
        t = cfg.train
        self.output_dir = t.output_dir
        self.sampler = ResumableSampler(len(train_set), shuffle=True, seed=t.seed, rank=info.rank,
                                        world_size=info.world_size)
        self.drop_last = bool(getattr(task, "drop_last", False))  # segmentation: no 1-image batch for BN
        per_rank, batch = self.sampler.per_rank, cfg.data.batch_size
        if self.drop_last and per_rank < batch:
            raise ValueError(f"data.batch_size={batch} exceeds the {per_rank} training images per process and "
                             f"{task.name} drops short batches: lower data.batch_size")
        self.batches_per_epoch = per_rank // batch if self.drop_last else math.ceil(per_rank / batch)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.accumulate)
        self.total_steps = t.iterations if t.iterations else t.epochs * self.steps_per_epoch
        unit = 1 if t.iterations else self.steps_per_epoch  # config counts in iterations or epochs
        self.unit = unit
        self.optimizer = build_optimizer(self.distiller.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, t.schedule, [m * unit for m in t.steps],
                                         t.gamma, t.poly_power, t.warmup_iters, t.warmup_ratio, t.min_lr / t.lr)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
        use_amp = self.amp_dtype is not None and info.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=self.amp_dtype)) if use_amp else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and t.amp == "fp16")
        self.model: nn.Module = self.distiller
        if info.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.step_seconds: list[float] = []  # wall time of each optimizer step of this process

    # ------------------------------------------------------------------ state
    def _loader(self) -> DataLoader:
        d = self.cfg.data
        return DataLoader(self.train_set, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.workers,
                          collate_fn=self.task.collate, generator=torch.Generator(),  # leaves the global RNG alone
                          pin_memory=self.info.device.type == "cuda", drop_last=self.drop_last)

    def val_loader(self) -> DataLoader:
        d = self.cfg.data
        sampler = ResumableSampler(len(self.val_set), shuffle=False, rank=self.info.rank,
                                   world_size=self.info.world_size)
        return DataLoader(self.val_set, batch_size=self.cfg.eval.batch_size or d.batch_size, sampler=sampler,
                          num_workers=d.workers, collate_fn=self.task.collate, generator=torch.Generator())

    def state_dict(self) -> dict[str, Any]:
        rng = gather_objects(capture_rng_state(), self.info)  # every process's generators
        method = self.distiller.method
        return {"student": self.distiller.student.state_dict(),  # what teachers / exports load
                "method": {} if method is None else method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
                "world_size": self.info.world_size}

    def save(self, name: str = LAST_NAME) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.info.is_main:
            save_checkpoint(os.path.join(self.output_dir, name), state)
        barrier(self.info)

    def load(self, path: str) -> None:
        # CPU first: RNG states must stay CPU byte tensors; weights and optimizer state are
        # copied onto the parameters' device by load_state_dict.
        state = load_checkpoint(path, map_location="cpu")
        if state.get("world_size", 1) != self.info.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                             f"{self.info.world_size}: resume with the same process count")
        self.distiller.student.load_state_dict(state["student"])
        if self.distiller.method is not None:
            self.distiller.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][self.info.rank])
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> dict[str, float]:
        last = os.path.join(self.output_dir, LAST_NAME)
        if resume:
            if not os.path.isfile(last):
                raise FileNotFoundError(f"--resume: no checkpoint at {last} (train.output_dir={self.output_dir})")
            self.load(last)
        if self.info.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            dump_yaml(self.cfg, os.path.join(self.output_dir, "config.yaml"))
        log = RunLog(self.output_dir, enabled=self.info.is_main, resume_step=self.step if resume else None,
                     total=self.total_steps)
        try:
            metrics = self._loop(log)
        finally:
            log.close()
        return metrics

    def _loop(self, log: RunLog) -> dict[str, float]:
        t = self.cfg.train
        metrics: dict[str, float] = {}
        self.model.train()
        while self.step < self.total_steps:
            self.train_set.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, start=min(self.batches_done * self.cfg.data.batch_size,
                                                          self.sampler.per_rank))
            tic, images_seen = time.perf_counter(), 0
            step_start = time.perf_counter()
            for batch in self._loader():
                images_seen += self.task.batch_size(batch)
                losses = self._micro_step(batch)
                self.batches_done += 1
                if self.batches_done % t.accumulate and self.batches_done < self.batches_per_epoch:
                    continue
                self._optimizer_step()
                self.step_seconds.append(time.perf_counter() - step_start)  # data + forward + backward + step
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log(log, losses, images_seen / (time.perf_counter() - tic))
                log.advance()
                if self._due(t.checkpoint_every, epoch_end=False):
                    self.save()
                if self._due(t.val_every, epoch_end=False):
                    metrics = self.validate(log)
                if self.step >= self.total_steps:
                    break
                step_start = time.perf_counter()
            if self.batches_done >= self.batches_per_epoch:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if self._due(t.checkpoint_every, epoch_end=True):
                    self.save()
                if self._due(t.val_every, epoch_end=True):
                    metrics = self.validate(log)
        if not metrics or t.val_every == 0 or self.step % (t.val_every * self.unit):
            metrics = self.validate(log)
        self.save()
        if self.info.is_main:
            with open(os.path.join(self.output_dir, "final_metrics.json"), "w") as f:
                json.dump({"step": self.step, **metrics}, f, indent=1)
            if self.step_seconds:  # apart from the metrics: timings differ between equal runs
                with open(os.path.join(self.output_dir, "timing.json"), "w") as f:
                    json.dump({"sec_per_step": statistics.median(self.step_seconds),
                               "steps_timed": len(self.step_seconds)}, f, indent=1)
        return metrics

    def _due(self, every: int, epoch_end: bool) -> bool:
        """Iteration-unit events fire after optimizer steps; epoch-unit ones at epoch ends."""
        if every <= 0 or (self.unit == 1) == epoch_end:
            return False
        return (self.step if self.unit == 1 else self.epoch) % every == 0

    def _micro_step(self, batch) -> dict[str, Tensor]:
        images, targets = self.task.to_device(batch, self.info.device)
        with self.autocast():
            teacher_feats = self.task.teacher_forward(self.teacher, images) if self.teacher is not None else None
            losses = self.model(images, targets, teacher_feats)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
            raise TrainingDiverged(f"non-finite loss at step {self.step} (epoch {self.epoch}, batch "
                                   f"{self.batches_done}): {bad}; all losses: "
                                   f"{ {k: float(v) for k, v in losses.items()} }. Lower train.lr, set "
                                   f"train.grad_clip, or check the data; the last checkpoint is unchanged.")
        self.scaler.scale(total / self.cfg.train.accumulate).backward()
        return {**losses, "loss": total.detach()}

    def _optimizer_step(self) -> None:
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _log(self, log: RunLog, losses: dict[str, Tensor], images_per_s: float) -> None:
        values = {k: float(v.detach()) for k, v in losses.items()}
        method = self.distiller.method
        if method is not None and hasattr(method, "statistics"):
            values.update({f"stats.{k}": v for k, v in method.statistics().items()})
        values = all_reduce_mean(values, self.info)
        values.update(lr=self.optimizer.param_groups[0]["lr"], epoch=self.epoch,
                      img_per_s=images_per_s * self.info.world_size)
        log.log(self.step, values)
        if self.info.is_main:
            logger.info("step %d/%d epoch %d loss %.4f lr %.3g %.1f img/s", self.step, self.total_steps,
                        self.epoch, values["loss"], values["lr"], values["img_per_s"])

    def validate(self, log: RunLog | None = None) -> dict[str, float]:
        broadcast_buffers(self.distiller.student, self.info)  # evaluate the model rank 0 saves
        metrics = self.task.evaluate(self.distiller.student, self.val_loader(), self.val_set)
        if self.info.is_main:
            logger.info("step %d validation: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        if log is not None:
            log.log(self.step, metrics, kind="val")
        return metrics
