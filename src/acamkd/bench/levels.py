"""FPN level grids of the paper's detectors (and a segmenter's logits grid) for a given input size.

Images are padded to a multiple of 32 first (torchvision's ``GeneralizedRCNNTransform`` and
mmdet both do), then each stride-2 stage rounds up: 800x1333 -> 800x1344, P3 = 100x168,
Faster R-CNN's P2 = 200x336 = 67,200 positions. Segmenters are not padded: 512x1024 -> 64x128.
"""
from __future__ import annotations

import math

__all__ = ["DETECTOR_LEVELS", "fpn_level_shapes", "parse_image_size"]

# level name -> stride. RetinaNet: P3-P7 (P6/P7 from stride-2 convs); Faster R-CNN: P2-P6
# (P6 is a stride-2 max-pool of P5). Both ceil-divide, so stride arithmetic with ceil is exact.
DETECTOR_LEVELS: dict[str, dict[str, int]] = {
    "retinanet": {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128},
    "fasterrcnn": {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64},
    # Segmenters (DeepLabV3 / PSPNet at output stride 8): one tap, the class logits, no padding.
    "segmenter": {"logits": 8},
}
_NO_PADDING = {"segmenter"}


def parse_image_size(text: str) -> tuple[int, int]:
    """``"800x1333"`` -> ``(800, 1333)`` (height x width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image must look like HEIGHTxWIDTH, e.g. 800x1333, got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--image sides must be positive, got {text!r}")
    return height, width


def fpn_level_shapes(detector: str, height: int, width: int, size_divisor: int = 32) -> dict[str, tuple[int, int]]:
    """Level name -> (h, w) of that detector's FPN outputs for an ``height x width`` image."""
    if detector not in DETECTOR_LEVELS:
        raise ValueError(f"--detector must be one of {sorted(DETECTOR_LEVELS)}, got {detector!r}")
    if detector in _NO_PADDING:
        size_divisor = 1
    padded_h = math.ceil(height / size_divisor) * size_divisor
    padded_w = math.ceil(width / size_divisor) * size_divisor
    shapes = {}
    for name, stride in DETECTOR_LEVELS[detector].items():
        h, w = padded_h, padded_w
        for _ in range(int(math.log2(stride))):  # each stride-2 step rounds up
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        shapes[name] = (h, w)
    return shapes
