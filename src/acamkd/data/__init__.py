"""Datasets (COCO detection, Cityscapes segmentation), paired transforms and collate functions.

Datasets return ``(image, target)``: image float32 ``(3, H, W)`` RGB in ``[0, 1]``; target a
torchvision-style detection dict (labels ``1..K``, 0 = background) or an int64 ``(H, W)``
label map (255 = ignore). Problems are logged on the ``acamkd.data`` logger.
"""
from acamkd.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    IGNORE_INDEX,
    CityscapesSegmentation,
    labelids_to_trainids,
)
from acamkd.data.coco import CocoDetection
from acamkd.data.images import BadImageError, read_rgb_image
from acamkd.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    ResizeKeepRatio,
    detection_collate,
    segmentation_collate,
)

__all__ = [
    "CocoDetection", "CityscapesSegmentation", "BadImageError", "read_rgb_image",
    "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "IGNORE_INDEX", "labelids_to_trainids",
    "Compose", "ResizeKeepRatio", "Resize", "RandomHorizontalFlip", "Normalize", "RandomScale", "RandomCrop",
    "detection_collate", "segmentation_collate", "IMAGENET_MEAN", "IMAGENET_STD",
]
