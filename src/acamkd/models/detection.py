"""torchvision RetinaNet / Faster R-CNN / FCOS with FPN over ResNet backbones, built for distillation.

What differs from torchvision's own builders (``retinanet_resnet50_fpn`` etc.):

* **No resize inside the model.** ``model.transform`` is a :class:`DetectionTransform`: it
  normalises (ImageNet mean/std) and pads the batch to a multiple of 32 like torchvision's
  ``GeneralizedRCNNTransform`` but does *not* resize. Images reach the model already resized
  by the data pipeline (``acamkd.data.transforms.ResizeKeepRatio(min_size, max_size)``), so a
  teacher and a student built here get the identical ``images.tensors`` for the same input
  list and their FPN levels line up; ``image_sizes`` are the input sizes, so predictions
  (and the boxes of targets) are in the frame of the input tensors.
* **No background detections.** RetinaNet and FCOS score class column 0 (background, since
  ``num_classes = K + 1``) with a sigmoid like any class; here it is masked out before the
  top-k (:class:`ForegroundRetinaNet`, :class:`ForegroundFCOS`), so predictions carry labels
  ``1..K`` only and no detection slot goes to a box no category can score.
* Weights only from local files (``pretrained``: torchvision ImageNet ResNet state dict;
  ``checkpoint``: a full detector state dict, strict). Nothing downloads.

Layers follow torchvision's v1 builders: RetinaNet and FCOS tap C3-C5 (``returned_layers``
2, 3, 4) and add P6/P7 with ``LastLevelP6P7(256, 256)``, i.e. P6 from the FPN's P5 output, so
torchvision's COCO ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn`` checkpoints load as they
are; ``extra_blocks_from="c5"`` builds the v2 / mmdetection RetinaNet layout (P6 from C5).
Faster R-CNN taps C2-C5 and adds P6 by ``LastLevelMaxPool``. FPN levels are named by stride:
``p2``..``p6`` (Faster R-CNN), ``p3``..``p7`` (RetinaNet, FCOS), ``p_k`` having stride ``2**k``.

The three architectures are registered in :mod:`acamkd.models.registry` at the end of this file
(:class:`~acamkd.models.registry.ModelSpec`: builder, backbones, levels, taps, teacher pass, eval
limits); :func:`build_detector` builds any registered detector, and :data:`DETECTOR_ARCHS` is read
from the registry.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from acamkd.models.registry import ModelSpec, get_model_spec, list_models, register_model
from acamkd.models.taps import FeatureTaps
from acamkd.models.weights import load_state_dict_file, load_weights_strict

__all__ = [
    "DETECTOR_ARCHS",
    "DETECTOR_BACKBONES",
    "DetectionTransform",
    "build_detector",
    "build_fpn_detector",
    "detector_channels",
    "detector_taps",
    "set_detector_eval_limits",
    "student_taps",
    "teacher_features",
]

# DETECTOR_ARCHS (every registered detection model, in registration order) is read from the
# registry on access: see __getattr__ at the end of this file.
DETECTOR_BACKBONES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
    "resnext101_64x4d": torchvision.models.resnext101_64x4d,  # the paper's X101 teacher (mmdet's x101_64x4d)
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SIZE_DIVISIBLE = 32  # DetectionTransform pads the batch to a multiple of this (torchvision's default)


class DetectionTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` without the resize: normalise, pad to ``size_divisible``.

    ``min_size``/``max_size`` are kept as attributes for the data pipeline to read (the
    resize is its job); ``image_sizes`` are the input sizes, so predictions come back in
    the input frame.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(normalize(mean={self.image_mean}, std={self.image_std}), no resize "
                f"(data pipeline resizes to min_size={self.min_size}, max_size={self.max_size}), "
                f"pad to multiple of {self.size_divisible})")


class _ForegroundOnly:
    """``postprocess_detections`` that never emits label 0 (background) from a sigmoid head.

    torchvision's RetinaNet/FCOS score every class column with a sigmoid, the background column
    0 included (``num_classes = K + 1``): an untrained head gives it as many boxes as any
    class, and a trained one still can when ``score_thresh`` is 0. Those boxes fill the top-k
    and ``detections_per_img`` slots and have no category to be scored as. Here column 0 gets
    logit -inf (score 0) before the top-k, so it never passes ``score_thresh >= 0``; what
    would still pass a negative threshold is dropped after NMS.
    """

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        logits = []
        for level in head_outputs["cls_logits"]:  # (N, HWA, K + 1) per level
            level = level.clone()
            level[..., 0] = float("-inf")
            logits.append(level)
        detections = super().postprocess_detections({**head_outputs, "cls_logits": logits}, anchors,
                                                    image_shapes)
        for det in detections:
            foreground = det["labels"] != 0
            if not bool(foreground.all()):
                det.update({k: v[foreground] for k, v in det.items()})
        return detections


class ForegroundRetinaNet(_ForegroundOnly, RetinaNet):
    """torchvision ``RetinaNet`` whose detections never carry the background label 0."""


class ForegroundFCOS(_ForegroundOnly, FCOS):
    """torchvision ``FCOS`` whose detections never carry the background label 0."""


def _choose(kind: str, value: str, known: Sequence[str]) -> str:
    if value not in known:
        close = difflib.get_close_matches(str(value), known, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown detector {kind} {value!r}: known are {list(known)}{hint}")
    return value


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    **options: Any,
) -> nn.Module:
    """Build the registered detector ``arch`` (``retinanet``, ``fasterrcnn``, ``fcos``, ...) over ``backbone``.

    ``num_classes`` = K + 1: index 0 is background, dataset labels are 1..K (the detection specs'
    ``background_class`` convention). ``pretrained``/``checkpoint``: local weight files; ``min_size``,
    ``max_size`` and ``options`` go to the spec's builder (for the torchvision family see
    :func:`build_fpn_detector`). Raises :class:`~acamkd.models.registry.UnknownModelError` (a
    ``ValueError``) for an unknown or non-detection ``arch``, ``ValueError`` for a backbone ``arch``
    does not take (both name close matches).
    """
    spec = get_model_spec(arch, task="detection")
    spec.check_backbone(backbone)
    return spec.build(backbone, num_classes, pretrained=pretrained, checkpoint=checkpoint, min_size=min_size,
                      max_size=max_size, **options)


def build_fpn_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    pretrained: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    *,
    trainable_backbone_layers: int | None = None,
    frozen_bn: bool | None = None,
    extra_blocks_from: str | None = None,
    resize_inside: bool = False,
    checkpoint_key: str | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    size_divisible: int = SIZE_DIVISIBLE,
    **kwargs: Any,
) -> nn.Module:
    """The torchvision family's builder: ``arch`` ("retinanet" | "fasterrcnn" | "fcos") with an FPN over ``backbone``.

    ``num_classes`` = K + 1: index 0 is background, dataset labels are 1..K. ``pretrained``: a
    local torchvision ImageNet ResNet state dict for the backbone (``fc.*`` ignored, strict
    otherwise). ``checkpoint``: a local full-detector state dict, loaded strictly after
    ``pretrained`` (flat, or nested under ``checkpoint_key`` / the first of ``model``,
    ``student``, ``state_dict``, ``model_state_dict``, ``module``). ``trainable_backbone_layers``
    (0..5) defaults to torchvision's: 3 with ``pretrained``, else 5. ``frozen_bn`` defaults to
    torchvision's rule: FrozenBatchNorm2d in the backbone with ``pretrained``, BatchNorm2d from
    random init; checkpoints load across both. ``extra_blocks_from``: "p5" (default, torchvision
    v1) or "c5" (v2 / mmdet) for RetinaNet/FCOS. ``resize_inside=True`` keeps torchvision's
    resizing transform (then teacher and student must share ``min_size``/``max_size``).
    Other ``kwargs`` go to the torchvision class (``score_thresh``, ``box_score_thresh``, ...).
    """
    _choose("architecture", arch, tuple(_FPN_LEVELS))
    _choose("backbone", backbone, list(DETECTOR_BACKBONES))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (K classes + background), got {num_classes!r}")
    if extra_blocks_from is not None and arch == "fasterrcnn":
        raise ValueError("extra_blocks_from applies to retinanet/fcos (P6/P7); Faster R-CNN's P6 is a max-pool of P5")
    extra_from = _choose("extra_blocks_from", extra_blocks_from or "p5", ("p5", "c5"))
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if pretrained is not None else 5
    if frozen_bn is None:
        frozen_bn = pretrained is not None

    net = DETECTOR_BACKBONES[backbone](weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    net.fc = nn.Identity()  # the classifier is not part of a detector
    if pretrained is not None:
        state = {k: v for k, v in load_state_dict_file(pretrained).items() if not k.startswith("fc.")}
        load_weights_strict(net, state, os.fspath(pretrained),
                            f"torchvision {backbone} (ImageNet classifier, fc ignored)")
    if arch == "fasterrcnn":
        body = _resnet_fpn_extractor(net, trainable_backbone_layers)  # C2-C5, extra LastLevelMaxPool
    else:
        c5_channels = net.inplanes  # 512 (BasicBlock) or 2048 (Bottleneck)
        extra = LastLevelP6P7(256, 256) if extra_from == "p5" else LastLevelP6P7(c5_channels, 256)
        body = _resnet_fpn_extractor(net, trainable_backbone_layers, returned_layers=[2, 3, 4], extra_blocks=extra)

    # Faster R-CNN's softmax box head already leaves out the background column
    model_cls = {"retinanet": ForegroundRetinaNet, "fasterrcnn": FasterRCNN, "fcos": ForegroundFCOS}[arch]
    transform_args = {"min_size": min_size, "max_size": max_size, "image_mean": list(image_mean),
                      "image_std": list(image_std), "size_divisible": size_divisible}
    model = model_cls(body, num_classes=num_classes, **transform_args, **kwargs)
    if not resize_inside:
        model.transform = DetectionTransform(**transform_args)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint, key=checkpoint_key)
        load_weights_strict(model, state, os.fspath(checkpoint),
                            f"{arch} with {backbone} FPN backbone and num_classes={num_classes}")
    return model


def _fpn(model: nn.Module) -> BackboneWithFPN:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, BackboneWithFPN):
        raise TypeError(f"{type(model).__name__}: expected a torchvision detector whose .backbone is a "
                        f"BackboneWithFPN, got {type(backbone).__name__}; pass taps to FeatureTaps yourself")
    return backbone


def detector_taps(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Default taps of a torchvision FPN detector: every FPN output level, named by stride.

    Returns ``(taps, rename)`` for :class:`FeatureTaps`: ``{"backbone": "backbone"}`` and e.g.
    ``{"backbone.0": "p3", "backbone.1": "p4", "backbone.2": "p5", "backbone.p6": "p6",
    "backbone.p7": "p7"}`` (RetinaNet/FCOS) or ``p2``..``p6`` with ``"backbone.pool": "p6"``.
    """
    fpn = _fpn(model)
    rename: dict[str, str] = {}
    level = 0
    for layer, key in fpn.body.return_layers.items():
        match = re.fullmatch(r"layer(\d)", str(layer))
        if match is None:
            raise TypeError(f"detector_taps: cannot tell the stride of backbone layer {layer!r} (ResNet "
                            f"'layerK' expected); pass taps to FeatureTaps yourself")
        level = int(match.group(1)) + 1  # ResNet layerK has stride 2**(K+1)
        rename[f"backbone.{key}"] = f"p{level}"
    extra = fpn.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7):
        rename.update({"backbone.p6": f"p{level + 1}", "backbone.p7": f"p{level + 2}"})
    elif isinstance(extra, LastLevelMaxPool):
        rename["backbone.pool"] = f"p{level + 1}"
    elif extra is not None:
        raise TypeError(f"detector_taps: unknown FPN extra block {type(extra).__name__}")
    return {"backbone": "backbone"}, rename


def detector_channels(model: nn.Module) -> dict[str, int]:
    """``level -> channels`` of the default taps (all FPN levels have ``backbone.out_channels``)."""
    channels = _fpn(model).out_channels
    return {name: channels for name in detector_taps(model)[1].values()}


def student_taps(model: nn.Module) -> FeatureTaps:
    """Hooks recording the FPN levels during the model's normal (training) forward.

    ``taps = student_taps(student)``; ``losses = student(images, targets)``;
    ``feats = taps.features()`` -> ``{"p3": ..., ...}`` with gradients: one forward in all.
    Pass the unwrapped model (hooks fire through a DDP wrapper too).
    """
    return FeatureTaps(model, *detector_taps(model))


@torch.no_grad()
def teacher_features(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """FPN levels of ``model`` for ``images``: ``model.transform`` then ``model.backbone`` only.

    No head, no NMS, no grad, eval mode (the model's mode is restored afterwards). Level names
    are those of :func:`student_taps`.
    """
    rename = detector_taps(model)[1]
    was_training = model.training
    if was_training:
        model.eval()
    try:
        image_list, _ = model.transform(images)
        feats = model.backbone(image_list.tensors)
    finally:
        if was_training:
            model.train()
    return {rename[f"backbone.{key}"]: value for key, value in feats.items()}


def set_detector_eval_limits(model: nn.Module, score_thresh: float, max_detections: int) -> None:
    """Set what an eval-mode forward keeps: boxes scoring at least ``score_thresh``, at most
    ``max_detections`` per image (Faster R-CNN: on ``model.roi_heads``; RetinaNet/FCOS: on the model)."""
    heads = model.roi_heads if hasattr(model, "roi_heads") else model
    heads.score_thresh = score_thresh
    heads.detections_per_img = max_detections


# ------------------------------------------------------------------------------ registration
# Default FPN levels (name -> stride) of each torchvision architecture built above.
_P3_P7 = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}  # C3-C5 + LastLevelP6P7
_FPN_LEVELS: dict[str, dict[str, int]] = {
    "retinanet": _P3_P7,
    "fasterrcnn": {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64},  # C2-C5 + LastLevelMaxPool
    "fcos": _P3_P7,
}
_DESCRIPTIONS = {
    "retinanet": "torchvision RetinaNet, FPN P3-P7 over a ResNet (one-stage, focal loss)",
    "fasterrcnn": "torchvision Faster R-CNN, FPN P2-P6 over a ResNet (two-stage, RPN + RoI heads)",
    "fcos": "torchvision FCOS, FPN P3-P7 over a ResNet (one-stage, anchor-free)",
}
for _arch, _levels in _FPN_LEVELS.items():
    register_model(ModelSpec(
        name=_arch, task="detection", backbones=tuple(DETECTOR_BACKBONES),
        build=functools.partial(build_fpn_detector, _arch), levels=_levels, size_divisor=SIZE_DIVISIBLE,
        background_class=True, default_taps=detector_taps, tap_channels=detector_channels,
        teacher_features=teacher_features, set_eval_limits=set_detector_eval_limits,
        description=_DESCRIPTIONS[_arch]))
del _arch, _levels


def __getattr__(name: str) -> Any:
    """``DETECTOR_ARCHS``: every registered detection model, read from the registry on access."""
    if name == "DETECTOR_ARCHS":
        return tuple(list_models("detection"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
