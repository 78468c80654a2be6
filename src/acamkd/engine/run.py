"""From a config to a running job: build the task, models, method and trainer; train, distil,
evaluate, export. The CLI is a thin layer over these functions."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from acamkd.config import Config, ModelConfig
from acamkd.engine.distributed import DistInfo, init_distributed
from acamkd.engine.sampling import ResumableSampler
from acamkd.engine.schedule import build_optimizer, build_scheduler
from acamkd.engine.run_folder import OutputDirError, check_fresh_start, check_writable
from acamkd.engine.step import StudentAndMethod, TrainingStep
from acamkd.engine.task import Task
from acamkd.engine.trainer import Trainer, plan_epochs
from acamkd.methods import build as build_method
from acamkd.methods import parse_options
from acamkd.models import FeatureTaps, inherit_weights

__all__ = ["RunModels", "build_models", "build_step", "build_task", "prepare", "train", "distill", "evaluate",
           "export_student", "sha256_of"]

logger = logging.getLogger("acamkd")


def build_task(cfg: Config, info: DistInfo) -> Task:
    """The adapter that knows ``student.task``'s data, models, losses and metrics."""
    if cfg.student.task == "detection":
        from acamkd.engine.detection import DetectionTask

        return DetectionTask(cfg, info)
    if cfg.student.task == "segmentation":
        from acamkd.engine.segmentation import SegmentationTask

        return SegmentationTask(cfg, info)
    raise ValueError(f"student.task={cfg.student.task!r}: choose detection or segmentation")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _teacher_config(cfg: Config) -> ModelConfig:
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise ValueError("distill needs a trained teacher: set teacher.checkpoint=PATH (a checkpoint written by "
                         "`acamkd train` or a state dict of the same architecture)")
    if not os.path.isfile(cfg.teacher.checkpoint):
        raise FileNotFoundError(f"teacher.checkpoint: no file at {cfg.teacher.checkpoint}")
    return cfg.teacher


@dataclass
class RunModels:
    """The models of a run and their hooks. ``teacher``/``method``/``teacher_taps`` are None when
    training without distillation (``teacher_taps`` also when the task reads the teacher's default
    levels directly)."""

    student: nn.Module
    student_taps: FeatureTaps
    teacher: nn.Module | None = None
    teacher_taps: FeatureTaps | None = None
    method: nn.Module | None = None
    teacher_sha256: str | None = None  # of the teacher checkpoint file (stored in the run's checkpoints)


def build_models(cfg: Config, task: Task, mode: str, num_classes: int, sample: Callable[[], list] | None = None,
                 random_init: bool = False) -> RunModels:
    """The student, and for ``mode="distill"`` the frozen teacher (checkpoint loaded strictly, unless
    ``random_init``) and the configured method sized to the taps' channels.

    ``sample()`` returns a list of one image; it is called only when configured taps need a forward
    to learn their channels. ``random_init`` builds every model without weights (benchmarks).

    Raises:
        ValueError, FileNotFoundError: no teacher checkpoint, taps that do not pair up, a pair the
            task refuses (:meth:`Task.check_pair`), a method the registry does not know.
    """
    student_cfg = replace(cfg.student, pretrained=None, checkpoint=None) if random_init else cfg.student
    student = task.build_model(student_cfg, num_classes, "student")
    if mode != "distill":
        return RunModels(student, task.make_taps(student, "student"))
    if random_init:
        teacher_cfg = replace(cfg.teacher, pretrained=None, checkpoint=None)
    else:
        teacher_cfg = _teacher_config(cfg)
    teacher = task.build_model(teacher_cfg, num_classes, "teacher")  # strict load inside
    teacher_sha = sha256_of(teacher_cfg.checkpoint) if teacher_cfg.checkpoint else None
    if teacher_sha and task.info.is_main:
        logger.info("teacher %s sha256 %s", teacher_cfg.checkpoint, teacher_sha)
    task.check_pair(student, teacher)
    if cfg.train.inherit_teacher and not random_init:
        report = inherit_weights(student, teacher, task.inherit_prefixes, task.inherit_all_or_nothing)
        logger.info("inherited %d teacher tensors (%s); skipped %d", len(report.copied),
                    ", ".join(report.copied[:8]) + (" ..." if len(report.copied) > 8 else ""), len(report.skipped))
    if cfg.method.name is None:
        raise ValueError("distill needs method.name (e.g. method.name=acam)")
    # Configured taps need one forward to learn their channels; default levels are read off the model.
    images = sample() if (sample is not None and (cfg.teacher.taps or cfg.student.taps)) else []
    t_channels = task.tap_channels(teacher, "teacher", images)
    s_channels = task.tap_channels(student, "student", images)
    if sorted(t_channels) != sorted(s_channels):
        raise ValueError(f"teacher taps {sorted(t_channels)} and student taps {sorted(s_channels)} differ: "
                         f"set teacher.taps and student.taps to levels that pair up")
    method = build_method(cfg.method.name, teacher_channels=t_channels, student_channels=s_channels,
                          options=parse_options(cfg.method.name, cfg.method.options))
    teacher.eval().requires_grad_(False)
    return RunModels(student, task.make_taps(student, "student"), teacher, task.teacher_taps(teacher), method,
                     teacher_sha)


def build_step(cfg: Config, task: Task, models: RunModels, info: DistInfo, total_steps: int,
               steps_unit: int = 1) -> TrainingStep:
    """Moves the models to ``info.device``, wraps the trained modules in DDP when distributed, and
    builds the optimizer (over student + method), the schedule of ``total_steps`` optimizer steps
    (``train.steps`` counted in ``steps_unit`` steps) and the :class:`TrainingStep`."""
    t = cfg.train
    trained = StudentAndMethod(models.student, models.method, task, models.student_taps).to(info.device)
    if models.teacher is not None:
        models.teacher.to(info.device)
    model: nn.Module = trained
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            trained, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    optimizer = build_optimizer(trained.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, t.schedule, [m * steps_unit for m in t.steps], t.gamma,
                                t.poly_power, t.warmup_iters, t.warmup_ratio, t.min_lr / t.lr)
    return TrainingStep(task, trained, models.teacher, models.teacher_taps, optimizer, scheduler,
                        device=info.device, model=model, amp=t.amp, grad_clip=t.grad_clip)


def prepare(cfg: Config, mode: str, info: DistInfo | None = None, *, resume: bool = False,
            overwrite: bool = False) -> Trainer:
    """Everything ``train`` (mode "train") or ``distill`` (mode "distill") needs, seeded: the task,
    datasets, sampler and epoch plan, models, taps and method, optimizer, schedule and step.

    The output folder is checked first, before anything is built: it must be writable and, for a
    new run (no ``resume``, no ``overwrite``), hold no other run's checkpoint.

    Raises:
        OutputDirError: the output folder cannot be written or holds another run.
    """
    info = info or init_distributed()
    check_writable(cfg.train.output_dir)
    if not resume and not overwrite:
        check_fresh_start(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)  # model initialisation is part of the run's result
    task = build_task(cfg, info)
    train_set, val_set = task.datasets()
    if mode == "distill":  # MasKD's token_file=auto: stage 1 into the run folder first (cached)
        from acamkd.engine.maskd_tokens import resolve_token_file

        cfg = resolve_token_file(cfg, task, train_set)
    models = build_models(cfg, task, mode, task.model_classes(train_set), sample=lambda: [train_set[0][0]])
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=cfg.train.seed, rank=info.rank,
                               world_size=info.world_size)
    plan = plan_epochs(cfg, sampler, task.drop_last, task.name)
    step = build_step(cfg, task, models, info, plan.total_steps, plan.unit)
    return Trainer(cfg, task, info, step, train_set, val_set, sampler, plan, teacher=models.teacher,
                   teacher_sha256=models.teacher_sha256)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Train ``cfg.student`` (no teacher); ``resume`` continues the run in ``train.output_dir``,
    ``overwrite`` replaces the run there."""
    return prepare(cfg, "train", resume=resume, overwrite=overwrite).fit(resume=resume, overwrite=overwrite)


def distill(cfg: Config, resume: bool = False, eval_teacher: bool | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Distil; by default evaluate the teacher first, so a teacher that did not load shows at step 0."""
    trainer = prepare(cfg, "distill", resume=resume, overwrite=overwrite)
    result: dict[str, Any] = {}
    if (cfg.train.eval_teacher_first if eval_teacher is None else eval_teacher) and not resume:
        result["teacher"] = trainer.task.evaluate(trainer.teacher, trainer.val_loader(), trainer.val_set)
        logger.info("teacher before distillation: %s", result["teacher"])
    result["student"] = trainer.fit(resume=resume, overwrite=overwrite)
    return result


def load_student(cfg: Config, checkpoint: str, info: DistInfo | None = None) -> tuple[Any, nn.Module, Any]:
    """The configured student with the weights of ``checkpoint`` (an engine checkpoint, whose
    student is under ``student``, or a plain state dict), loaded strictly; and the val set."""
    from acamkd.models.weights import load_state_dict_file, load_weights_strict

    info = info or init_distributed()
    task = build_task(cfg, info)
    val_set = task.val_dataset()
    model = task.build_model(cfg.student, task.model_classes(val_set), "student")
    load_weights_strict(model, load_state_dict_file(checkpoint), checkpoint,
                        f"{cfg.student.arch}/{cfg.student.backbone}")
    return task, model.to(info.device), val_set


def evaluate(cfg: Config, checkpoint: str) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from acamkd.engine.sampling import ResumableSampler

    info = init_distributed()
    task, model, val_set = load_student(cfg, checkpoint, info)
    loader = DataLoader(val_set, batch_size=cfg.eval.batch_size or cfg.data.batch_size,
                        sampler=ResumableSampler(len(val_set), shuffle=False, rank=info.rank,
                                                 world_size=info.world_size),
                        num_workers=cfg.data.workers, collate_fn=task.collate)
    return task.evaluate(model, loader, val_set)


def export_student(cfg: Config, checkpoint: str, out: str) -> list[str]:
    """Student weights only (the method's modules are training-only) as safetensors; the metadata
    records ``arch``, ``backbone``, ``source`` and the classes (:meth:`Task.class_metadata`: the
    names in output order, detection's category ids, segmentation's ignore label).

    Raises:
        OutputDirError: ``out``'s folder cannot be written (checked before anything is loaded).
        OSError: writing ``out`` failed (no space left, ...); the message names the file.
    """
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise OutputDirError(f"--out {out} is a folder: give a file name, e.g. {os.path.join(out, 'student.safetensors')}")
    check_writable(folder, key="--out")
    task, model, val_set = load_student(cfg, checkpoint)  # proves the weights fit the configured student
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"arch": cfg.student.arch, "backbone": cfg.student.backbone,
                                        "source": os.path.basename(checkpoint), **task.class_metadata(val_set)})
        os.replace(tmp, out)
    except Exception as err:  # safetensors raises its own error type for I/O failures
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(f"cannot write {out}: {err}") from None
    return sorted(state)
