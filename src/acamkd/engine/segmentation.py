"""Semantic segmentation for the engine: datasets, model builds, forward passes and mIoU.

The counterpart of :mod:`acamkd.engine.detection` with the same methods. What is particular:

* data: Cityscapes layout (the real one, or the built-in ``shapes`` rendered into it); images are
  normalised with ImageNet statistics (segmenters, unlike torchvision detectors, do not normalise
  inside); training images are then randomly rescaled (``data.scale_range``), cropped to
  ``data.crop`` (padded with 0, the mean colour, and the ignore label when smaller) and flipped;
* the task loss is pixel-wise cross-entropy on the upsampled logits, ignore label 255, plus 0.4 x
  that of the auxiliary head where the model has one (ResNet encoders, as in CIRKD);
* the taps are the stride-8 logits (``"logits"``: the ``classifier`` module, M = K masks); the
  teacher runs :meth:`Segmenter.logits` only (no final upsampling);
* evaluation is mIoU from :class:`acamkd.evaluation.SegMetric`, on whole images or in sliding
  windows (``eval.sliding_window``), each image counted once across processes;
* the classes are the data's (:func:`configured_class_names`: ``data.num_classes``,
  ``data.class_names``, ``<root>/classes.txt``, else the dataset's table) and the ignore label is
  ``data.ignore_index``, in the loss, the crop padding, ``DistillBatch``, the metric and the
  per-class ``IoU.<name>`` keys.
"""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.config import DataConfig, ModelConfig
from acamkd.data import (
    CityscapesSegmentation,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    segmentation_collate,
)
from acamkd.data.cityscapes import CITYSCAPES_CLASSES, IGNORE_INDEX
from acamkd.data.classes import segmentation_class_names
from acamkd.engine.task import Task, real_items
from acamkd.evaluation import SegMetric, sliding_window_logits
from acamkd.methods.batch import DistillBatch
from acamkd.models import FeatureTaps

__all__ = ["SegmentationTask", "configured_class_names", "segmentation_loss", "segmentation_task_losses"]

logger = logging.getLogger("acamkd")


def _layout_root_and_table(data: DataConfig) -> tuple[str, list[str]]:
    """The Cityscapes-layout folder of ``data`` and the dataset's own class table (train-id order)."""
    if data.dataset == "shapes":
        from acamkd.data.synthetic import CLASSES  # the built-in data: background + its shape classes

        return os.path.join(data.root, "cityscapes"), ["background"] + [c.name for c in CLASSES]
    return data.root, list(CITYSCAPES_CLASSES)


def configured_class_names(data: DataConfig) -> list[str]:
    """The segmentation classes of ``data`` in train-id order (``K = len``): ``data.class_names``,
    else ``<layout root>/classes.txt``, else the dataset's table (Cityscapes' 19, shapes' 9) when
    ``data.num_classes`` is null or equals its length, else ``class_0..``.

    Raises:
        ValueError: ``data.num_classes`` disagrees with the names or the classes file (named).
    """
    root, table = _layout_root_and_table(data)
    return segmentation_class_names(data.num_classes, data.class_names, root, table)


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the labelled pixels of ``logits (B, K, H, W)`` vs ``labels (B, H, W)``.

    A batch with no labelled pixel (a crop of pure padding) gives 0 with a gradient path, not the
    NaN of ``F.cross_entropy``'s mean over nothing, so the NaN guard only fires on real divergence.
    """
    if logits.shape[0] != labels.shape[0] or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"segmentation_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         f"do not match (expected (B, K, H, W) and (B, H, W))")
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    valid = (labels != ignore_index).sum().clamp_min(1)
    return total / valid


def segmentation_task_losses(student: nn.Module, images: Tensor, labels: Tensor,
                             ignore_index: int = IGNORE_INDEX) -> dict[str, Tensor]:
    """A segmenter's training losses: ``ce`` on its upsampled logits and, with an auxiliary head,
    ``aux_ce`` = ``AUX_WEIGHT`` x that head's cross-entropy. Any other model: its forward's logits.
    Pixels labelled ``ignore_index`` do not count."""
    from acamkd.models.segmentation import AUX_WEIGHT

    if hasattr(student, "forward_train"):
        logits, aux = student.forward_train(images)  # (B, K, H, W) each, upsampled from stride 8
    else:
        logits, aux = student(images), None
    losses = {"ce": segmentation_loss(logits, labels, ignore_index)}
    if aux is not None:
        losses["aux_ce"] = AUX_WEIGHT * segmentation_loss(aux, labels, ignore_index)
    return losses


class SegmentationTask(Task):
    """Adapter between the engine and :func:`acamkd.models.segmentation.build_segmenter` models."""

    name = "segmentation"
    # BatchNorm on the 1x1 pooled maps (ASPP image pooling, PSP bin 1) cannot train on one image:
    # drop an epoch's last, short batch.
    drop_last = True
    # Only the decoder and classifier can match between a teacher and a student of another encoder,
    # and each only as a whole (BatchNorm statistics behind a random conv would be worse than none).
    inherit_prefixes = ("decoder", "classifier")
    inherit_all_or_nothing = True
    collate = staticmethod(segmentation_collate)

    # ------------------------------------------------------------------ data
    @property
    def ignore_index(self) -> int:
        """The label of unlabelled pixels (``data.ignore_index``)."""
        return self.cfg.data.ignore_index

    def _dataset(self, split: str, transforms) -> CityscapesSegmentation:
        data = self.cfg.data
        self.built_in_data()
        root, _ = _layout_root_and_table(data)
        names = configured_class_names(data)
        if split == data.val_split and self.info.is_main:
            logger.info("segmentation classes (%d, ignore label %d): %s", len(names), data.ignore_index,
                        ", ".join(f"{i}={n}" for i, n in enumerate(names)))
        return CityscapesSegmentation(root, split, transforms=transforms, on_bad_image=data.on_bad_image,
                                      num_classes=len(names), class_names=names, ignore_index=data.ignore_index)

    def datasets(self) -> tuple[CityscapesSegmentation, CityscapesSegmentation]:
        data = self.cfg.data
        # Normalise first, so crop padding (0) is the mean colour, as in mmseg (Normalize, then Pad 0);
        # resizing is linear, so its order with the normalisation changes nothing else.
        steps = [Normalize()]
        if data.crop is not None:  # without a crop, images keep their size (they must share one to batch)
            steps += [RandomScale(*data.scale_range), RandomCrop(*data.crop, ignore_index=data.ignore_index)]
        steps.append(RandomHorizontalFlip(data.flip_prob))
        return self._dataset(data.train_split, Compose(steps)), self.val_dataset()

    def val_dataset(self) -> CityscapesSegmentation:
        return self._dataset(self.cfg.data.val_split, Normalize())

    @staticmethod
    def model_classes(dataset: CityscapesSegmentation) -> int:
        """Output channels the dataset needs: every train id is a class (background included)."""
        return dataset.num_classes

    def class_metadata(self, dataset: CityscapesSegmentation) -> dict[str, str]:
        """``num_classes``, ``class_names`` (JSON list, by train id) and ``ignore_index``."""
        return {"task": self.name, "num_classes": str(dataset.num_classes),
                "class_names": json.dumps(dataset.class_names), "ignore_index": str(dataset.ignore_index)}

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
        where = f"{role} ({model_cfg.arch} {model_cfg.backbone})"
        classes = model_cfg.num_classes or num_classes
        if classes != num_classes:
            raise ValueError(f"{role}.num_classes={classes} but the dataset has {num_classes} classes "
                             f"(train ids 0..{num_classes - 1}): the {where} logits would not match the labels. "
                             f"If your data has {classes} classes, set data.num_classes={classes} (and "
                             f"data.class_names, or a classes.txt beside the data); else set {role}.num_classes=null")
        model = self.build_from_registry(model_cfg, classes, aux_head=model_cfg.aux_head)
        # Under DDP each GPU holds 2 of the 16 crops: BatchNorm statistics need the whole batch
        # (mmseg's SyncBN); "auto" does that, "bn" keeps per-process statistics.
        return self.maybe_sync_batchnorm(model, model_cfg, when=("auto", "syncbn"))

    def check_pair(self, student: nn.Module, teacher: nn.Module) -> None:
        """Teacher and student logits are distilled class by class: the class counts must agree."""
        s, t = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
        if s is not None and t is not None and s != t:
            raise ValueError(f"class-count mismatch: teacher logits have {t} classes, student logits {s}; "
                             f"distilling logits needs the same classes in the same order")

    @staticmethod
    def model_input(images: list[Tensor]) -> Tensor:
        return torch.stack(images)

    # ------------------------------------------------------------------ forward passes
    def student_forward(self, student: nn.Module, taps: FeatureTaps, images: Tensor, labels: Tensor):
        """The task losses (:func:`segmentation_task_losses`) and the student's taps."""
        taps.clear()  # forward_train bypasses the forward pre-hook that clears them
        return segmentation_task_losses(student, images, labels, self.ignore_index), taps.features()

    @staticmethod
    def to_device(batch, device: torch.device):
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    @staticmethod
    def batch_size(batch) -> int:
        return batch[0].shape[0]

    def distill_batch(self, images: Tensor, labels: Tensor) -> DistillBatch:
        B, _, H, W = images.shape
        return DistillBatch(input_size=(H, W), image_sizes=[(H, W)] * B, label_map=labels,
                            ignore_index=self.ignore_index)

    def random_batch(self, batch_size: int, size: tuple[int, int], num_classes: int,
                     generator: torch.Generator):
        """Normalised-looking random images and uniformly random labels."""
        h, w = size
        return (torch.randn(batch_size, 3, h, w, generator=generator),
                torch.randint(0, num_classes, (batch_size, h, w), generator=generator))

    # ------------------------------------------------------------------ evaluation
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Full-resolution logits (B, K, H, W): whole image, or sliding windows (``eval.*``)."""
        ev = self.cfg.eval
        if ev.sliding_window:
            return sliding_window_logits(model, images, ev.window, ev.stride, model.num_classes)
        return model(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, dataset: CityscapesSegmentation) -> dict[str, float]:
        """mIoU, aAcc, mAcc (0..1) and ``IoU.<class>`` over the val set, every image counted once."""
        was_training = model.training
        model.eval()
        metric = SegMetric(dataset.num_classes, ignore_index=dataset.ignore_index, device=self.info.device)
        real, seen = real_items(loader), 0  # the sampler's wrap-around padding is not scored
        for batch in loader:
            images, labels = self.to_device(batch, self.info.device)
            keep = max(0, min(images.shape[0], real - seen))
            seen += images.shape[0]
            if keep:
                metric.update(self.predict(model, images[:keep]), labels[:keep])
        model.train(was_training)
        result = metric.all_reduce().compute()  # collective: every rank takes part
        metrics = {k: float(result[k]) for k in ("mIoU", "aAcc", "mAcc")}
        for name, iou in zip(dataset.class_names, result["IoU"]):
            if iou == iou:  # NaN: class absent from both prediction and labels
                metrics[f"IoU.{name}"] = float(iou)
        return metrics
