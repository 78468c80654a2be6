"""Transforms on ``(image, target)`` pairs, and the two collate functions.

``image`` is float32 ``(3, H, W)``; ``target`` is one of

* a detection dict (``boxes`` (N, 4) xyxy pixels, ``labels``, ``area``, ``iscrowd``, optional
  ``masks`` (N, H, W), plus per-image keys that pass through unchanged),
* a segmentation label map ``(H, W)`` integer tensor (255 = ignore),
* ``None`` (inference).

Every geometric transform moves the target with the image, so boxes and label maps stay in
the frame of the tensor the model sees. Randomness comes only from torch's global RNG
(``torch.rand``/``torch.randint``), so a seeded run (and DataLoader's per-worker seeding)
is reproducible. Resizing is bilinear without antialiasing for images (what torchvision's
``GeneralizedRCNNTransform`` and mmdet/mmseg do, so pretrained teachers see familiar input)
and nearest for label maps and masks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Compose", "ResizeKeepRatio", "Resize", "RandomHorizontalFlip", "Normalize", "RandomScale", "RandomCrop",
    "detection_collate", "segmentation_collate", "IMAGENET_MEAN", "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-instance keys of a detection target: filtered together when a crop removes boxes.
_INSTANCE_KEYS = ("boxes", "labels", "area", "iscrowd", "masks")
_MIN_BOX_SIZE = 1e-3  # same rule as the datasets: thinner boxes are dropped after a crop

Target = Union[dict[str, Any], Tensor, None]


def _check_image(image: Any, who: str) -> tuple[int, int]:
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise TypeError(f"{who}: image must be a (C, H, W) tensor, got {shape}")
    if not image.is_floating_point():
        raise TypeError(f"{who}: image must be floating point (the datasets give float32 in [0, 1]), "
                        f"got {image.dtype}")
    return int(image.shape[-2]), int(image.shape[-1])


def _check_target(target: Any, hw: tuple[int, int], who: str) -> None:
    if target is None or isinstance(target, dict):
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"{who}: target must be a detection dict, a (H, W) label tensor or None, "
                        f"got {type(target).__name__}")
    if tuple(target.shape) != hw:
        raise ValueError(f"{who}: label map has shape {tuple(target.shape)}, image is {hw} (H, W)")


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of ``(..., H, W)`` integer/bool maps, values kept exactly (ids < 2**24)."""
    lead = x.shape[:-2]
    if x.numel() == 0:  # e.g. masks of an image with no instances
        return x.new_zeros(*lead, *size)
    flat = x.reshape(1, math.prod(lead), *x.shape[-2:]).float()  # (1, L, H, W)
    out = F.interpolate(flat, size=size, mode="nearest")
    return out.reshape(*lead, *size).to(x.dtype)


def _resize_pair(image: Tensor, target: Target, size: tuple[int, int]) -> tuple[Tensor, Target]:
    """Resize to ``size`` (H', W'): bilinear image, nearest labels/masks, boxes scaled per axis."""
    h, w = image.shape[-2:]
    if (h, w) == size:
        return image, target
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if isinstance(target, Tensor):
        return image, _resize_nearest(target, size)
    if isinstance(target, dict):
        sy, sx = size[0] / h, size[1] / w
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * target["boxes"].new_tensor([sx, sy, sx, sy])
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            target["masks"] = _resize_nearest(target["masks"], size)
    return image, target


class Compose:
    """Apply transforms in order: ``image, target = t(image, target)`` for each."""

    def __init__(self, transforms: Sequence[Callable[[Tensor, Target], tuple[Tensor, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ResizeKeepRatio:
    """Detection resize, aspect kept: ``scale = min(min_size / short, max_size / long)``.

    The torchvision / mmdet rule (short side to ``min_size`` unless the long side would pass
    ``max_size``). ``min_size`` may be a sequence: one is drawn per call (multi-scale training).
    Output sides are ``int(side * scale + 0.5)``; boxes scale by the realised per-axis ratios.
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333) -> None:
        sizes = (min_size,) if isinstance(min_size, (int, float)) else tuple(min_size)
        if not sizes or any(not isinstance(s, (int, float)) or s <= 0 for s in sizes):
            raise ValueError(f"ResizeKeepRatio: min_size must be a positive number or a non-empty sequence "
                             f"of them, got {min_size!r}")
        if not isinstance(max_size, (int, float)) or max_size <= 0:
            raise ValueError(f"ResizeKeepRatio: max_size must be positive, got {max_size!r}")
        self.min_sizes = sizes
        self.max_size = max_size

    def output_size(self, h: int, w: int, min_size: float) -> tuple[int, int]:
        scale = min(min_size / min(h, w), self.max_size / max(h, w))
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        hw = _check_image(image, "ResizeKeepRatio")
        _check_target(target, hw, "ResizeKeepRatio")
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        return _resize_pair(image, target, self.output_size(*hw, min_size))

    def __repr__(self) -> str:
        ms = self.min_sizes[0] if len(self.min_sizes) == 1 else self.min_sizes
        return f"ResizeKeepRatio(min_size={ms}, max_size={self.max_size})"


class Resize:
    """Resize to a fixed ``(height, width)`` (evaluation; aspect not kept). Boxes scale per axis.

    For segmentation evaluation prefer scoring logits upsampled to the *original* label
    (resizing a label map with nearest is lossy); this transform is for inputs.
    """

    def __init__(self, height: int, width: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Resize: {name} must be an integer >= 1, got {v!r}")
        self.size = (height, width)

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        hw = _check_image(image, "Resize")
        _check_target(target, hw, "Resize")
        return _resize_pair(image, target, self.size)

    def __repr__(self) -> str:
        return f"Resize(height={self.size[0]}, width={self.size[1]})"


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``: boxes ``x -> W - x`` (xyxy, swapping x1/x2),
    label maps and masks mirrored. One ``torch.rand`` draw per call, flipped or not."""

    def __init__(self, p: float = 0.5) -> None:
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        hw = _check_image(image, "RandomHorizontalFlip")
        _check_target(target, hw, "RandomHorizontalFlip")
        if not bool(torch.rand(()) < self.p):
            return image, target
        width = hw[1]
        image = image.flip(-1)
        if isinstance(target, Tensor):
            target = target.flip(-1)
        elif isinstance(target, dict):
            target = dict(target)
            if "boxes" in target:
                b = target["boxes"]  # (N, 4) xyxy
                target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(image - mean) / std`` per channel (ImageNet statistics by default); target untouched.

    Not for torchvision detectors, which normalise inside their own transform.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"Normalize: mean has {len(self.mean)} values, std has {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"Normalize: std must be > 0, got {self.std}")

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        _check_image(image, "Normalize")
        if image.shape[0] != len(self.mean):
            raise ValueError(f"Normalize: image has {image.shape[0]} channels, mean/std have {len(self.mean)}")
        mean = image.new_tensor(self.mean)[:, None, None]  # (C, 1, 1)
        std = image.new_tensor(self.std)[:, None, None]
        return (image - mean) / std, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomScale:
    """Rescale both sides by one factor drawn uniformly from ``[min_scale, max_scale]``
    (segmentation training; mmseg's ``ratio_range``). Bilinear image, nearest labels."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0) -> None:
        if not (isinstance(min_scale, (int, float)) and isinstance(max_scale, (int, float))
                and 0 < min_scale <= max_scale and math.isfinite(max_scale)):
            raise ValueError(f"RandomScale: need 0 < min_scale <= max_scale, got {min_scale!r}, {max_scale!r}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        h, w = _check_image(image, "RandomScale")
        _check_target(target, (h, w), "RandomScale")
        s = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        return _resize_pair(image, target, size)

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Random ``(height, width)`` crop. A smaller image is first padded at the bottom/right
    with 0 (image) and ``ignore_index`` (label map), so the output is always the crop size and
    padding is never scored. Detection targets: boxes shifted, clipped, and dropped when
    thinner than 1e-3 px (with their labels/area/iscrowd/masks)."""

    def __init__(self, height: int, width: int, ignore_index: int = 255) -> None:
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RandomCrop: {name} must be an integer >= 1, got {v!r}")
        self.height, self.width, self.ignore_index = height, width, int(ignore_index)

    def __call__(self, image: Tensor, target: Target = None) -> tuple[Tensor, Target]:
        h, w = _check_image(image, "RandomCrop")
        _check_target(target, (h, w), "RandomCrop")
        pad_h, pad_w = max(self.height - h, 0), max(self.width - w, 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            if isinstance(target, Tensor):
                target = F.pad(target, (0, pad_w, 0, pad_h), value=self.ignore_index)
            elif isinstance(target, dict) and "masks" in target:
                target = dict(target)
                target["masks"] = F.pad(target["masks"], (0, pad_w, 0, pad_h), value=0)
            h, w = h + pad_h, w + pad_w
        top = int(torch.randint(h - self.height + 1, ()).item())
        left = int(torch.randint(w - self.width + 1, ()).item())
        image = image[:, top:top + self.height, left:left + self.width]
        if isinstance(target, Tensor):
            target = target[top:top + self.height, left:left + self.width]
        elif isinstance(target, dict):
            target = self._crop_instances(target, top, left)
        return image, target

    def _crop_instances(self, target: dict[str, Any], top: int, left: int) -> dict[str, Any]:
        target = dict(target)
        if "masks" in target:
            target["masks"] = target["masks"][:, top:top + self.height, left:left + self.width]
        if "boxes" not in target:
            return target
        b = target["boxes"] - target["boxes"].new_tensor([left, top, left, top])  # (N, 4)
        b[:, 0::2] = b[:, 0::2].clamp(0, self.width)
        b[:, 1::2] = b[:, 1::2].clamp(0, self.height)
        keep = ((b[:, 2] - b[:, 0]) > _MIN_BOX_SIZE) & ((b[:, 3] - b[:, 1]) > _MIN_BOX_SIZE)  # (N,)
        if "area" in target:  # scale the (segment) area by the visible fraction of the box
            old = target["boxes"]
            old_area = ((old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])).clamp_min(1e-12)
            new_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            target["area"] = target["area"] * (new_area / old_area)
        target["boxes"] = b
        for key in _INSTANCE_KEYS:
            if key in target:
                target[key] = target[key][keep]
        return target

    def __repr__(self) -> str:
        return f"RandomCrop(height={self.height}, width={self.width}, ignore_index={self.ignore_index})"


def _unzip(batch: Sequence[tuple[Any, Any]], who: str) -> tuple[list, list]:
    if len(batch) == 0:
        raise ValueError(f"{who}: empty batch")
    images, targets = [], []
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{who}: batch[{i}] must be an (image, target) pair, got {type(item).__name__}")
        images.append(item[0])
        targets.append(item[1])
    return images, targets


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])``: images keep their own sizes
    (torchvision detectors batch and pad them inside)."""
    return _unzip(batch, "detection_collate")


def segmentation_collate(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``[(image (3, H, W), label (H, W)), ...] -> (images (B, 3, H, W), labels (B, H, W))``.

    All items must share one size (crop in training; batch size 1 for native-size evaluation).
    """
    images, labels = _unzip(batch, "segmentation_collate")
    for i, (img, lab) in enumerate(zip(images, labels)):
        if not isinstance(img, Tensor) or not isinstance(lab, Tensor):
            raise TypeError(f"segmentation_collate: batch[{i}] must hold two tensors, got "
                            f"{type(img).__name__}, {type(lab).__name__}")
        if img.dim() != 3 or lab.dim() != 2 or tuple(img.shape[-2:]) != tuple(lab.shape):
            raise ValueError(f"segmentation_collate: batch[{i}] has image {tuple(img.shape)} and label "
                             f"{tuple(lab.shape)}; expected (C, H, W) and (H, W) of the same H, W")
    sizes = [tuple(img.shape) for img in images]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"[{i}] {s}" for i, s in enumerate(sizes))
        raise ValueError(f"segmentation_collate: images in one batch must share a size, got {listed}. "
                         f"Add RandomCrop(height, width) to the training transforms, or evaluate with "
                         f"batch_size=1.")
    return torch.stack(images), torch.stack(labels)
