"""Tap grids of the registered models (FPN levels of a detector, a segmenter's logits) for a given input size.

The level names, strides and padding come from the model registry (:mod:`acamkd.models.registry`:
``levels`` and ``size_divisor`` of each :class:`~acamkd.models.registry.ModelSpec`). Detectors pad
images to a multiple of 32 first (torchvision's ``GeneralizedRCNNTransform`` and mmdet both do),
then each stride-2 stage rounds up: 800x1333 -> 800x1344, P3 = 100x168, Faster R-CNN's P2 = 200x336
= 67,200 positions. Segmenters are not padded: 512x1024 -> 64x128.

This module imports no torch at import: the registry is read when a function is called, so a CLI
parser can take its ``--detector`` choices from :data:`LAYOUT_CHOICES` without loading any model code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["DETECTOR_LEVELS", "LAYOUT_CHOICES", "SEGMENTER", "LazyNames", "fpn_level_shapes", "layout",
           "layout_names", "parse_image_size"]

SEGMENTER = "segmenter"  # alias for the layout every registered segmenter shares ({"logits": 8}, no padding)


def _registry():
    from acamkd.models import registry  # imports torch and torchvision: on demand only

    return registry


def _segmenter_layout() -> tuple[dict[str, int], int]:
    reg = _registry()
    layouts = {name: (dict(reg.get_model_spec(name).levels), reg.get_model_spec(name).size_divisor)
               for name in reg.list_models("segmentation")}
    if not layouts:
        raise ValueError(f"--detector {SEGMENTER!r}: no segmenter is registered")
    distinct = {repr(v) for v in layouts.values()}
    if len(distinct) > 1:
        raise ValueError(f"--detector {SEGMENTER!r} is ambiguous: the registered segmenters have different taps "
                         f"({layouts}); name one of {list(layouts)}")
    return next(iter(layouts.values()))


def layout_names() -> list[str]:
    """Names :func:`fpn_level_shapes` accepts: every registered detector, ``"segmenter"``, every segmenter."""
    reg = _registry()
    return [*reg.list_models("detection"), SEGMENTER, *reg.list_models("segmentation")]


def layout(name: str) -> tuple[dict[str, int], int]:
    """``(level name -> stride, size_divisor)`` of the registered model ``name`` (or ``"segmenter"``).

    Raises ``ValueError`` naming ``--detector``, close matches and the known names for an unknown name.
    """
    if name == SEGMENTER:
        return _segmenter_layout()
    reg = _registry()
    try:
        spec = reg.get_model_spec(name)
    except reg.UnknownModelError:
        raise ValueError(f"--detector must be a registered model or {SEGMENTER!r}, got {name!r}"
                         f"{reg.did_you_mean(name, layout_names())}") from None
    return dict(spec.levels), spec.size_divisor


def __getattr__(name: str) -> Any:
    """``DETECTOR_LEVELS``: ``{model: {level: stride}}`` for every registered detector plus ``"segmenter"``
    (the segmenters' shared layout), read from the registry on access."""
    if name == "DETECTOR_LEVELS":
        reg = _registry()
        levels = {arch: dict(reg.get_model_spec(arch).levels) for arch in reg.list_models("detection")}
        levels[SEGMENTER] = _segmenter_layout()[0]
        return levels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LazyNames(Sequence[str]):
    """A sequence of names computed (again) on each use, for argparse ``choices``: the registry is
    read only when a value is checked or help is printed, not when the parser is built (give the
    argument a ``metavar``, else argparse lists the choices at ``add_argument`` time)."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names

    def __getitem__(self, index):  # type: ignore[override]
        return list(self._names())[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names()))

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __repr__(self) -> str:
        return f"LazyNames({self._names.__name__})"


LAYOUT_CHOICES = LazyNames(layout_names)  # --detector choices: every registered model and "segmenter"


def parse_image_size(text: str) -> tuple[int, int]:
    """``"800x1333"`` -> ``(800, 1333)`` (height x width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image must look like HEIGHTxWIDTH, e.g. 800x1333, got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--image sides must be positive, got {text!r}")
    return height, width


def fpn_level_shapes(detector: str, height: int, width: int,
                     size_divisor: int | None = None) -> dict[str, tuple[int, int]]:
    """Level name -> (h, w) of the default taps of registered model ``detector`` (or ``"segmenter"``)
    for a ``height x width`` image: padded to a multiple of ``size_divisor`` (None: the model's own,
    32 for detectors, 1 for segmenters), then ceil-divided by each level's stride (each stride-2
    stage rounds up, and nested ceil halvings equal one ceil division). ``ValueError`` for an unknown name."""
    levels, own_divisor = layout(detector)
    size_divisor = own_divisor if size_divisor is None else size_divisor
    padded_h = math.ceil(height / size_divisor) * size_divisor
    padded_w = math.ceil(width / size_divisor) * size_divisor
    return {name: (math.ceil(padded_h / stride), math.ceil(padded_w / stride)) for name, stride in levels.items()}
