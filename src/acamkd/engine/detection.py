"""Detection for the engine (:class:`acamkd.engine.task.Task`): COCO-layout data, the registered
detectors (``acamkd.models.registry``), their FPN levels as taps, COCO box mAP.

What is particular: batches are lists of images (each resized by the data pipeline, padded to a
multiple of 32 by the detector's transform) and target dicts; the teacher runs transform +
backbone/FPN only; evaluation maps boxes from the resized input back to the original image.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from acamkd.config import ModelConfig
from acamkd.data import CocoDetection, Compose, RandomHorizontalFlip, ResizeKeepRatio, detection_collate
from acamkd.engine.distributed import gather_objects
from acamkd.engine.task import Task, real_items
from acamkd.evaluation import evaluate_detections
from acamkd.methods.batch import DistillBatch
from acamkd.models import FeatureTaps

__all__ = ["DetectionTask"]

_NORM = {"auto": None, "bn": False, "frozen_bn": True, "syncbn": False}


class DetectionTask(Task):
    """Adapter between the engine and the registered detectors (``acamkd.models.registry``:
    builder, default FPN taps, cheap teacher pass, evaluation limits) on COCO-layout data."""

    name = "detection"
    drop_last = False  # torchvision detectors train on any batch size
    inherit_prefixes = ("backbone.fpn", "head", "rpn", "roi_heads")  # the paper's neck + head inheritance
    inherit_all_or_nothing = False  # tensor by tensor, as FGD's init_student (FPN and heads have no BatchNorm)
    collate = staticmethod(detection_collate)

    # ------------------------------------------------------------------ data
    def coco_root(self) -> str:
        self.built_in_data()
        data = self.cfg.data
        return os.path.join(data.root, "coco") if data.dataset == "shapes" else data.root

    def _dataset(self, split: str, transforms) -> CocoDetection:
        data = self.cfg.data
        fill = (lambda p: None if p is None else p.replace("{split}", split))
        return CocoDetection(self.coco_root(), split, img_dir=fill(data.img_dir), ann_file=fill(data.ann_file),
                             transforms=transforms, on_bad_image=data.on_bad_image, categories=data.categories)

    def datasets(self) -> tuple[CocoDetection, CocoDetection]:
        data = self.cfg.data
        resize = ResizeKeepRatio(data.min_size, data.max_size)
        train = self._dataset(data.train_split, Compose([resize, RandomHorizontalFlip(data.flip_prob)]))
        return train, self.val_dataset()

    def val_dataset(self) -> CocoDetection:
        data = self.cfg.data
        return self._dataset(data.val_split, ResizeKeepRatio(data.min_size, data.max_size))

    @staticmethod
    def model_classes(dataset: CocoDetection) -> int:
        """Foreground classes (``dataset.num_classes`` counts the background label 0 too)."""
        return dataset.num_classes - 1

    def class_metadata(self, dataset: CocoDetection) -> dict[str, str]:
        """``num_classes`` (foreground K), ``class_names`` and ``category_ids`` (JSON lists indexed by
        label - 1: label ``i`` is ``class_names[i-1]``, category id ``category_ids[i-1]`` of the file)."""
        labels = sorted(dataset.label_to_cat_id)  # 1..K
        return {"task": self.name, "num_classes": str(len(labels)),
                "class_names": json.dumps([dataset.class_names[lab] for lab in labels]),
                "category_ids": json.dumps([dataset.label_to_cat_id[lab] for lab in labels])}

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
        """``num_classes`` foreground classes: the dataset's (``data.categories`` or every category of the
        file). A teacher may say otherwise (``teacher.num_classes``: its checkpoint's classes; only its FPN
        levels are distilled); a student whose ``num_classes`` differs raises ``ValueError``: its labels
        would not map to the data's category ids."""
        if role == "student" and model_cfg.num_classes not in (None, num_classes):
            chosen = (f"the {num_classes} categories of data.categories={self.cfg.data.categories}"
                      if self.cfg.data.categories is not None else f"{num_classes} categories")
            raise ValueError(f"student.num_classes={model_cfg.num_classes} but the data has {chosen}: the "
                             f"student's labels would not match the data's category ids. Set student.num_classes="
                             f"null to follow the data, or choose the categories with data.categories")
        model = self.build_from_registry(
            model_cfg, model_cfg.num_classes or num_classes, min_size=self.cfg.data.min_size,
            max_size=self.cfg.data.max_size, frozen_bn=_NORM[model_cfg.norm],
            trainable_backbone_layers=model_cfg.trainable_layers)
        return self.maybe_sync_batchnorm(model, model_cfg, when=("syncbn",))

    # ------------------------------------------------------------------ forward passes
    def student_forward(self, student: nn.Module, taps: FeatureTaps, images: list[Tensor], targets: list[dict]):
        losses = student(images, targets)  # torchvision: dict of task losses in training mode
        return losses, taps.features()

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

    def distill_batch(self, images: list[Tensor], targets: list[dict]) -> DistillBatch:
        """Boxes are already in the input frame (the pipeline resizes, the transform only pads)."""
        sizes = [tuple(img.shape[-2:]) for img in images]
        divisor = self.spec().size_divisor
        pad = (lambda v: -(-v // divisor) * divisor)
        input_size = (pad(max(h for h, _ in sizes)), pad(max(w for _, w in sizes)))
        return DistillBatch(input_size=input_size, image_sizes=sizes, boxes=[t["boxes"] for t in targets],
                            labels=[t["labels"] for t in targets])

    def random_batch(self, batch_size: int, size: tuple[int, int], num_classes: int,
                     generator: torch.Generator):
        """Random images with two boxes each (labels 1 and 2, or 1 for a one-class model)."""
        h, w = size
        boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]])
        images = [torch.rand(3, h, w, generator=generator) for _ in range(batch_size)]
        targets = [{"boxes": boxes.clone(), "labels": torch.tensor([1, min(2, num_classes)]),
                    "image_id": i, "orig_size": torch.tensor([h, w])} for i in range(batch_size)]
        return images, targets

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, dataset: CocoDetection) -> dict[str, float]:
        """COCO box metrics on ``loader`` (this rank's shard), boxes mapped to the original frame:
        the 12 COCO numbers, then ``AP.<category name>`` per category (labels mapped back to the
        file's category ids by ``dataset.label_to_cat_id``, ``data.categories`` included)."""
        was_training = model.training
        model.eval()
        predictions, image_ids = [], []
        real, seen = real_items(loader), 0
        for batch in loader:
            images, targets = self.to_device(batch, self.info.device)
            keep = max(0, min(len(images), real - seen))  # the sampler's wrap-around padding is not scored
            seen += len(images)
            if not keep:
                continue
            outputs = model(images)[:keep]  # the whole batch: its padding decides the FPN grids
            for image, target, output in zip(images, targets, outputs):
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
        failure: BaseException | None = None
        if self.info.is_main:
            seen_ids: dict[int, Any] = {}
            for preds, ids in gathered:  # one prediction per image id (a skipped bad image's stand-in)
                for pred, image_id in zip(preds, ids):
                    seen_ids.setdefault(image_id, pred)
            # the annotations the dataset checked (the same ones training read), not the raw file again;
            # predictions it cannot map (e.g. background label 0) are dropped and counted, not fatal
            gt = dataset.coco_gt() if hasattr(dataset, "coco_gt") else dataset.ann_file
            try:
                metrics = evaluate_detections(gt, list(seen_ids.values()), list(seen_ids), dataset.label_to_cat_id,
                                              unmapped="drop", per_class=True)
            except Exception as e:  # every rank must leave the gather below, then raise
                failure = e
        metrics, error = gather_objects((metrics, None if failure is None else repr(failure)), self.info)[0]
        if failure is not None:
            raise failure
        if error is not None:
            raise RuntimeError(f"COCO evaluation failed on rank 0: {error}")
        return metrics
