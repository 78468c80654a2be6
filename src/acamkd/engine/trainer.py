"""The training loop for ``train`` and ``distill``, on one CPU, one GPU or many through torchrun.

Read top to bottom: for each epoch, the sampler is positioned (a resumed run starts mid-epoch),
micro-batches are grouped by ``train.accumulate`` and handed to the :class:`TrainingStep`
(``engine/step.py``: forward, losses, backward, optimizer step); then logging, checkpoints and
validation when due. Everything the loop uses is built in ``engine/run.py:prepare``.

A checkpoint after an optimizer step records everything that decides the rest of the run
(weights, optimizer, scheduler, scaler, every process's RNG states, epoch and batches done in
it), so ``resume`` continues to the same result: the data order is a function of (seed, epoch)
and augmentation of (seed, epoch, index), see :mod:`acamkd.engine.sampling`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from acamkd.config import Config, dump_yaml, to_dict
from acamkd.engine.checkpoint import (
    LAST_NAME,
    capture_rng_state,
    load_latest,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from acamkd.engine.distributed import DistInfo, all_reduce_mean, barrier, broadcast_buffers, gather_objects
from acamkd.engine.resume_config import check_resume_config
from acamkd.engine.run_folder import RunFolderLock, check_fresh_start
from acamkd.engine.run_log import RunLog
from acamkd.engine.sampling import PerSampleSeed, ResumableSampler
from acamkd.engine.step import NonFiniteLoss, TrainingStep
from acamkd.methods.base import NonFiniteValues

__all__ = ["EpochPlan", "StopSignals", "Trainer", "TrainingDiverged", "TrainingInterrupted", "plan_epochs"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

logger = logging.getLogger("acamkd")


class StopSignals:
    """SIGINT and SIGTERM set :attr:`signum` while the context is active, for a loop to read at
    its step boundaries (checkpoint, then stop); a second signal of the same kind acts as usual
    (Ctrl-C twice stops at once). Installed from the main thread only (elsewhere a no-op);
    leaving the context restores the previous handlers. ``announce``: log the first signal."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.signum == signum:  # the second time: the previous behaviour, now
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.announce:
            logger.warning("%s received: stopping after this step (checkpoint first); send it again to "
                           "stop at once", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old)
        self._previous.clear()


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf: the message names the step and the losses that went bad."""


class TrainingInterrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run at a step boundary, after saving a checkpoint.
    ``signum`` is the signal, ``step`` the optimizer steps done, ``checkpoint`` the file written."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to "
                         f"{checkpoint}")  # how to continue is the caller's to say (CLI: --resume, or rerun a run set)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at a step
    boundary and then ends them (a worker killed by Ctrl-C would abort the step instead)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class EpochPlan:
    """How a run's length is counted. ``unit`` is 1 when the config counts iterations, else
    ``steps_per_epoch`` (``train.steps``, ``val_every``, ``checkpoint_every`` are in that unit)."""

    batches_per_epoch: int  # micro-batches per epoch on each process
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int  # optimizer steps of the whole run
    unit: int


def plan_epochs(cfg: Config, sampler: ResumableSampler, drop_last: bool, task_name: str) -> EpochPlan:
    """The run's :class:`EpochPlan` for this process's shard.

    Raises:
        ValueError: ``data.batch_size`` exceeds the images per process of a task that drops short
            batches (an epoch would have no batch).
    """
    t, per_rank, batch = cfg.train, sampler.per_rank, cfg.data.batch_size
    if drop_last and per_rank < batch:
        raise ValueError(f"data.batch_size={batch} exceeds the {per_rank} training images per process and "
                         f"{task_name} drops short batches: lower data.batch_size")
    batches = per_rank // batch if drop_last else math.ceil(per_rank / batch)
    steps = math.ceil(batches / t.accumulate)
    return EpochPlan(batches, steps, t.iterations if t.iterations else t.epochs * steps,
                     1 if t.iterations else steps)


class Trainer:
    """Runs the loop; rank 0 writes the run folder (config, logs, checkpoints, final metrics).

    ``step.trained`` holds the student and the method (checkpointed); ``teacher`` is kept for
    evaluating it before distillation. ``train_set`` is wrapped so that augmentation draws from
    ``(seed, epoch, index)``.
    """

    def __init__(self, cfg: Config, task: Any, info: DistInfo, step: TrainingStep, train_set, val_set,
                 sampler: ResumableSampler, plan: EpochPlan, teacher=None, teacher_sha256: str | None = None) -> None:
        self.cfg, self.task, self.info, self.step_fn = cfg, task, info, step
        self.train_set, self.val_set = PerSampleSeed(train_set, cfg.train.seed), val_set
        self.sampler, self.plan, self.teacher = sampler, plan, teacher
        self.teacher_sha256 = teacher_sha256  # stored in checkpoints; a resume must use the same teacher
        self.trained = step.trained
        self.output_dir = cfg.train.output_dir
        self.total_steps, self.unit = plan.total_steps, plan.unit
        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.saved_step: int | None = None  # the step of the newest checkpoint of this run
        self.step_seconds: list[float] = []  # wall time of each optimizer step of this process
        self._stop = StopSignals(announce=info.is_main)

    @property
    def student(self):
        return self.trained.student

    @property
    def method(self):
        return self.trained.method

    # ------------------------------------------------------------------ loaders
    def _loader(self) -> DataLoader:
        d = self.cfg.data
        return DataLoader(self.train_set, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.workers,
                          collate_fn=self.task.collate, generator=torch.Generator(),  # leaves the global RNG alone
                          pin_memory=self.info.device.type == "cuda", drop_last=self.task.drop_last,
                          worker_init_fn=ignore_stop_signals if d.workers else None)

    def val_loader(self) -> DataLoader:
        d = self.cfg.data
        sampler = ResumableSampler(len(self.val_set), shuffle=False, rank=self.info.rank,
                                   world_size=self.info.world_size)
        return DataLoader(self.val_set, batch_size=self.cfg.eval.batch_size or d.batch_size, sampler=sampler,
                          num_workers=d.workers, collate_fn=self.task.collate, generator=torch.Generator(),
                          worker_init_fn=ignore_stop_signals if d.workers else None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        rng = gather_objects(capture_rng_state(), self.info)  # every process's generators
        s = self.step_fn
        return {"student": self.student.state_dict(),  # what teachers / exports load
                "method": {} if self.method is None else self.method.state_dict(),
                "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                "scaler": s.scaler.state_dict(), "rng": rng, "epoch": self.epoch,
                "batches_done": self.batches_done, "step": self.step, "world_size": self.info.world_size,
                "config": to_dict(self.cfg), "teacher_sha256": self.teacher_sha256}

    def save(self, name: str = LAST_NAME) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.info.is_main:
            save_checkpoint(os.path.join(self.output_dir, name), state)
        self.saved_step = self.step
        barrier(self.info)

    def load(self) -> str:
        """Restore the newest whole checkpoint of the run folder (``last.pt``, else ``prev.pt``);
        returns its path.

        Raises:
            FileNotFoundError: no checkpoint to resume from.
            ResumeConfigError: the configuration changes what the run computes (see
                :mod:`acamkd.engine.resume_config`); allowed changes are logged and used.
            ValueError: another process count, or another teacher file than the run started with.
        """
        # CPU first: RNG states must stay CPU byte tensors; weights and optimizer state are
        # copied onto the parameters' device by load_state_dict.
        state, path = load_latest(self.output_dir, map_location="cpu")
        self._check_same_run(state, path)
        if state.get("world_size", 1) != self.info.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                             f"{self.info.world_size}: resume with the same process count")
        self.student.load_state_dict(state["student"])
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        s = self.step_fn
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        s.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][self.info.rank])
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        self.saved_step = self.step
        return path

    def _check_same_run(self, state: dict[str, Any], path: str) -> None:
        stored = state.get("config")
        if stored is None:  # a checkpoint from before configs were stored: the run folder's copy
            from acamkd.config import load_config

            saved_yaml = os.path.join(self.output_dir, "config.yaml")
            stored = to_dict(load_config(saved_yaml)) if os.path.isfile(saved_yaml) else None
        if stored is not None:
            for key, (old, new) in check_resume_config(stored, to_dict(self.cfg), path).items():
                if self.info.is_main:
                    logger.warning("--resume: %s changed from %r to %r (allowed; used from now on)", key, old, new)
        before = state.get("teacher_sha256")
        if before is not None and self.teacher_sha256 is not None and before != self.teacher_sha256:
            raise ValueError(f"--resume from {path}: teacher.checkpoint={self.cfg.teacher.checkpoint} is not the "
                             f"teacher the run started with (sha256 {self.teacher_sha256[:12]}... vs "
                             f"{before[:12]}...): give the original teacher file")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
        """Train to ``total_steps`` and return the final validation metrics. The run folder is locked
        meanwhile; without ``resume`` a folder holding another run is refused (or, with
        ``overwrite``, cleared); SIGINT/SIGTERM stop at the next step boundary after a checkpoint.

        Raises:
            RunFolderBusy, OutputDirError: the folder is in use or holds another run.
            TrainingInterrupted: a stop signal arrived (a checkpoint was saved first).
            TrainingDiverged: a loss became NaN or inf.
        """
        lock = RunFolderLock(self.output_dir) if self.info.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            if self.info.is_main:
                if not resume:
                    check_fresh_start(self.output_dir, overwrite)
                remove_stale_temporaries(self.output_dir)
            barrier(self.info)
            if resume:
                self.load()
            if self.info.is_main:
                dump_yaml(self.cfg, os.path.join(self.output_dir, "config.yaml"))
            log = RunLog(self.output_dir, enabled=self.info.is_main, resume_step=self.step if resume else None,
                         total=self.total_steps)
            reset_peak_memory(self.info.device)
            try:
                with self._stop:
                    return self._loop(log)
            finally:
                log.close()
        finally:
            if lock is not None:
                lock.release()

    def _stop_requested(self) -> int | None:
        """The stop signal, agreed by every process (a collective when distributed)."""
        signum = self._stop.signum or 0
        if self.info.distributed:
            flag = torch.tensor([float(signum)], device=self.info.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def _stop_if_asked(self) -> None:
        signum = self._stop_requested()
        if signum is None:
            return
        if self.saved_step != self.step:
            self.save()
        raise TrainingInterrupted(signum, self.step, os.path.join(self.output_dir, LAST_NAME))

    def _loop(self, log: RunLog) -> dict[str, float]:
        t, plan = self.cfg.train, self.plan
        metrics: dict[str, float] = {}
        self.trained.train()
        while self.step < self.total_steps:
            self.train_set.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, start=min(self.batches_done * self.cfg.data.batch_size,
                                                          self.sampler.per_rank))
            tic, images_seen, pending = time.perf_counter(), 0, []
            step_start = time.perf_counter()
            for batch in self._loader():
                pending.append(batch)
                if len(pending) < t.accumulate and self.batches_done + len(pending) < plan.batches_per_epoch:
                    continue  # gradient accumulation: more micro-batches before this step
                losses = self._train_step(pending)
                self.batches_done += len(pending)
                images_seen += sum(self.task.batch_size(b) for b in pending)
                pending = []
                self.step_seconds.append(time.perf_counter() - step_start)  # data + forward + backward + step
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log(log, losses, images_seen / (time.perf_counter() - tic))
                log.advance()
                if self._due(t.checkpoint_every, epoch_end=False):
                    self.save()
                if self._due(t.val_every, epoch_end=False):
                    metrics = self._validate_saved(log)
                if self.step >= self.total_steps:
                    break
                self._stop_if_asked()
                step_start = time.perf_counter()
            if self.batches_done >= plan.batches_per_epoch:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if self._due(t.checkpoint_every, epoch_end=True):
                    self.save()
                if self._due(t.val_every, epoch_end=True):
                    metrics = self._validate_saved(log)
                self._stop_if_asked()
        if self.saved_step != self.step:
            self.save()  # before the final validation: a val file that fails must not cost the run
        if not metrics or t.val_every == 0 or self.step % (t.val_every * self.unit):
            metrics = self.validate(log)
        if self.info.is_main:
            with open(os.path.join(self.output_dir, "final_metrics.json"), "w") as f:
                json.dump({"step": self.step, **metrics}, f, indent=1)
            if self.step_seconds:  # apart from the metrics: timings differ between equal runs
                with open(os.path.join(self.output_dir, "timing.json"), "w") as f:
                    json.dump({"sec_per_step": statistics.median(self.step_seconds),
                               "steps_timed": len(self.step_seconds), **peak_memory(self.info.device)}, f, indent=1)
        return metrics

    def _train_step(self, micro_batches: list) -> dict[str, Tensor]:
        try:
            losses = self.step_fn(micro_batches, accumulate=self.cfg.train.accumulate)
        except NonFiniteLoss as err:
            bad = {k: v for k, v in err.losses.items() if not math.isfinite(v)}
            raise TrainingDiverged(f"non-finite loss at step {self.step} (epoch {self.epoch}, batch "
                                   f"{self.batches_done + err.micro_batch}): {bad}; all losses: {err.losses}. Lower train.lr, set "
                                   f"train.grad_clip, or check the data; the last checkpoint is unchanged.") from None
        except NonFiniteValues as err:  # a method's inputs: the student's (or teacher's) features went NaN/inf
            raise TrainingDiverged(f"non-finite values in {err.names} at step {self.step} (epoch {self.epoch}): the "
                                   f"previous steps diverged. Lower train.lr or the distillation weight, set "
                                   f"train.grad_clip, or check the teacher; the last checkpoint is unchanged.") from None
        self.step += 1
        return losses

    def _due(self, every: int, epoch_end: bool) -> bool:
        """Iteration-unit events fire after optimizer steps; epoch-unit ones at epoch ends."""
        if every <= 0 or (self.unit == 1) == epoch_end:
            return False
        return (self.step if self.unit == 1 else self.epoch) % every == 0

    def _log(self, log: RunLog, losses: dict[str, Tensor], images_per_s: float) -> None:
        values = {k: float(v) for k, v in losses.items()}
        if self.method is not None and hasattr(self.method, "statistics"):
            values.update({f"stats.{k}": v for k, v in self.method.statistics().items()})
        values = all_reduce_mean(values, self.info)
        values.update(lr=self.step_fn.optimizer.param_groups[0]["lr"], epoch=self.epoch,
                      img_per_s=images_per_s * self.info.world_size)
        log.log(self.step, values)
        if self.info.is_main:
            logger.info("step %d/%d epoch %d loss %.4f lr %.3g %.1f img/s", self.step, self.total_steps,
                        self.epoch, values["loss"], values["lr"], values["img_per_s"])
            for message in getattr(self.method, "health_warnings", lambda: [])():
                logger.warning("step %d: %s", self.step, message)  # e.g. ACAM-KD's masks collapsing

    def _validate_saved(self, log: RunLog) -> dict[str, float]:
        """Validation during training, after a checkpoint of this step (one is written first if
        none was): an evaluation that fails never costs trained steps."""
        if self.saved_step != self.step:
            self.save()
        return self.validate(log)

    def validate(self, log: RunLog | None = None) -> dict[str, float]:
        broadcast_buffers(self.student, self.info)  # evaluate the model rank 0 saves
        metrics = self.task.evaluate(self.student, self.val_loader(), self.val_set)
        if self.info.is_main:
            logger.info("step %d validation: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        if log is not None:
            log.log(self.step, metrics, kind="val")
        return metrics


def reset_peak_memory(device: torch.device) -> None:
    """Start this process's peak-memory count afresh (CUDA: the allocator's peak; CPU on Linux: the
    peak resident set, via ``/proc/self/clear_refs``), so :func:`peak_memory` is this run's own
    even when several runs share a process (``acamkd demo``, ``acamkd compare``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the process's peak since its start
        pass


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory in MiB since :func:`reset_peak_memory`, and what was measured: on CUDA the most
    memory tensors held on the device (``max_memory_allocated``), on CPU the peak resident set of
    the whole process (data, models and Python included; Linux ``VmHWM``, else ``ru_maxrss``)."""
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20, "peak_mem_kind": "cuda_max_allocated"}
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_mib": kib / 1024, "peak_mem_kind": "cpu_peak_rss"}
