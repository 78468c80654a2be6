"""Detection for the engine: datasets, model builds, forward passes and COCO evaluation.

The engine's loop is task-agnostic; this adapter is the one place that knows that detection
batches are lists of images and target dicts, that the student's taps are its FPN levels,
that the teacher runs transform + backbone/FPN only, and that evaluation is COCO mAP on boxes
mapped back to the original image frame.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from acamkd.config import Config, ModelConfig
from acamkd.data import CocoDetection, Compose, RandomHorizontalFlip, ResizeKeepRatio, detection_collate
from acamkd.engine.distributed import DistInfo, barrier, gather_objects
from acamkd.evaluation import evaluate_detections
from acamkd.models import FeatureTaps, build_detector, detector_channels, student_taps, teacher_features
from acamkd.models.taps import tap_channels

__all__ = ["DetectionTask"]

_NORM = {"auto": None, "bn": False, "frozen_bn": True, "syncbn": False}


class DetectionTask:
    """Adapter between the engine and torchvision detectors on COCO-layout data."""

    name = "detection"
    collate = staticmethod(detection_collate)
    drop_last = False  # torchvision detectors train on any batch size
    inherit_prefixes = ("backbone.fpn", "head", "rpn", "roi_heads")  # the paper's neck + head inheritance
    inherit_all_or_nothing = False  # tensor by tensor, as FGD's init_student (FPN and heads have no BatchNorm)

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None

    # ------------------------------------------------------------------ data
    def coco_root(self) -> str:
        data = self.cfg.data
        if data.dataset == "shapes":
            from acamkd.data.synthetic import make_shapes

            if self.info.is_main:  # generate once (cached by its parameters), others wait
                s = data.shapes
                make_shapes(data.root, train=s.train, val=s.val, size=tuple(s.size), seed=s.seed,
                            difficulty=s.difficulty)
            barrier(self.info)
            return os.path.join(data.root, "coco")
        return data.root

    def _dataset(self, split: str, transforms) -> CocoDetection:
        data = self.cfg.data
        fill = (lambda p: None if p is None else p.replace("{split}", split))
        return CocoDetection(self.coco_root(), split, img_dir=fill(data.img_dir), ann_file=fill(data.ann_file),
                             transforms=transforms, on_bad_image=data.on_bad_image)

    def datasets(self) -> tuple[CocoDetection, CocoDetection]:
        data = self.cfg.data
        resize = ResizeKeepRatio(data.min_size, data.max_size)
        train = self._dataset(data.train_split, Compose([resize, RandomHorizontalFlip(data.flip_prob)]))
        return train, self.val_dataset()

    def val_dataset(self) -> CocoDetection:
        """Validation only (eval and export need no training annotations)."""
        data = self.cfg.data
        return self._dataset(data.val_split, ResizeKeepRatio(data.min_size, data.max_size))

    @staticmethod
    def model_classes(dataset: CocoDetection) -> int:
        """Foreground classes (``dataset.num_classes`` counts the background label 0 too)."""
        return dataset.num_classes - 1

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
        """``num_classes`` foreground classes (the dataset's unless the config says otherwise)."""
        classes = model_cfg.num_classes or num_classes
        model = build_detector(model_cfg.arch, model_cfg.backbone, classes + 1, pretrained=model_cfg.pretrained,
                               checkpoint=model_cfg.checkpoint, min_size=self.cfg.data.min_size,
                               max_size=self.cfg.data.max_size, frozen_bn=_NORM[model_cfg.norm],
                               trainable_backbone_layers=model_cfg.trainable_layers)
        self._set_eval_limits(model)
        if model_cfg.norm == "syncbn" and self.info.distributed and self.info.device.type == "cuda":  # GPU-only op
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _set_eval_limits(self, model: nn.Module) -> None:
        ev = self.cfg.eval
        heads = model.roi_heads if hasattr(model, "roi_heads") else model
        heads.score_thresh = ev.score_thresh
        heads.detections_per_img = ev.max_detections

    @staticmethod
    def check_pair(student: nn.Module, teacher: nn.Module) -> None:
        """FPN levels pair up whatever the class counts: nothing to check."""

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Hook the taps once: the student's record during its own training forward."""
        custom = self.cfg.student.taps
        self._student_taps = FeatureTaps(student, custom) if custom else student_taps(student)
        if teacher is not None and self.cfg.teacher is not None and self.cfg.teacher.taps:
            self._teacher_taps = FeatureTaps(teacher, self.cfg.teacher.taps)

    def tap_channels(self, model: nn.Module, taps: list[str] | None, sample: list[Tensor]) -> dict[str, int]:
        """Channels per tapped level (FPN: from the model; custom taps: from one forward)."""
        if not taps:
            return detector_channels(model)
        return tap_channels(model, taps, sample)

    # ------------------------------------------------------------------ forward passes
    def student_forward(self, student: nn.Module, images: list[Tensor], targets: list[dict]):
        losses = student(images, targets)  # torchvision: dict of task losses in training mode
        return losses, self._student_taps.features()

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
        if self._teacher_taps is None:
            return teacher_features(teacher, images)  # transform + backbone/FPN: no head, no NMS
        teacher(images)
        return self._teacher_taps.features()

    @staticmethod
    def to_device(batch, device: torch.device):
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]
        return images, targets

    @staticmethod
    def batch_size(batch) -> int:
        return len(batch[0])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, dataset: CocoDetection) -> dict[str, float]:
        """COCO box metrics on ``loader`` (this rank's shard), boxes mapped to the original frame."""
        was_training = model.training
        model.eval()
        predictions, image_ids = [], []
        for batch in loader:
            images, targets = self.to_device(batch, self.info.device)
            for image, target, output in zip(images, targets, model(images)):
                orig_h, orig_w = (int(v) for v in target["orig_size"])
                scale = torch.tensor([orig_w / image.shape[-1], orig_h / image.shape[-2]] * 2,
                                     device=output["boxes"].device)
                predictions.append({k: v.cpu() for k, v in
                                    {"boxes": output["boxes"] * scale, "scores": output["scores"],
                                     "labels": output["labels"]}.items()})
                image_ids.append(int(target["image_id"]))
        model.train(was_training)
        gathered = gather_objects((predictions, image_ids), self.info)
        metrics: dict[str, float] = {}
        if self.info.is_main:
            seen: dict[int, Any] = {}
            for preds, ids in gathered:  # the padded sampler repeats a few images: keep one copy
                for pred, image_id in zip(preds, ids):
                    seen.setdefault(image_id, pred)
            metrics = evaluate_detections(dataset.ann_file, list(seen.values()), list(seen),
                                          dataset.label_to_cat_id)
        return gather_objects(metrics, self.info)[0]
