"""Image decoding shared by the dataset loaders, and what to do with a file that will not decode."""
from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["ON_BAD_IMAGE", "BadImageError", "read_rgb_image", "load_skipping_bad"]

logger = logging.getLogger("acamkd.data")
T = TypeVar("T")

# on_bad_image: "error" raises naming the file; "skip" moves on and counts it.
ON_BAD_IMAGE = ("error", "skip")


class BadImageError(RuntimeError):
    """An image (or label) file that exists but cannot be decoded, or decodes to the wrong size."""


def read_rgb_image(path: str) -> Tensor:
    """Decode ``path`` with PIL into float32 ``(3, H, W)`` RGB in ``[0, 1]``.

    Grayscale, palette, CMYK and RGBA files are converted to RGB. The EXIF orientation is
    *not* applied: COCO boxes are in the stored pixel frame (as pycocotools/torchvision read it).
    Any failure while decoding raises :class:`BadImageError` naming ``path``.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated/corrupt files fail here and not later
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}). "
                            f"Re-download/re-extract the file, or pass on_bad_image='skip'.") from e
    arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def load_skipping_bad(dataset: Any, index: int, load: Callable[[int], T], path_of: Callable[[int], str],
                      where: str) -> T:
    """``load(index)``, or with ``dataset.on_bad_image == "skip"`` the next loadable position
    (``index+1, index+2, ...`` wrapping around, so the answer is deterministic).

    ``dataset`` provides ``__len__``, ``on_bad_image``, ``_bad`` (positions known to be bad) and
    ``skipped`` (path -> reason); each bad file is recorded and logged once. ``where`` names the
    data folder in the error raised when nothing at all decodes.
    """
    n = len(dataset)
    index = operator.index(index)
    if not -n <= index < n:
        raise IndexError(f"{type(dataset).__name__} index {index} out of range for {n} samples")
    index %= n
    for step in range(n):
        j = (index + step) % n
        if j in dataset._bad:
            continue
        try:
            return load(j)
        except BadImageError as e:
            if dataset.on_bad_image == "error":
                raise
            dataset._bad.add(j)
            dataset.skipped[path_of(j)] = str(e)
            logger.warning("%s: skipping unreadable sample (%d skipped so far): %s",
                           type(dataset).__name__, len(dataset.skipped), e)
    raise BadImageError(f"{type(dataset).__name__}: none of the {n} samples under {where} could be "
                        f"decoded; see dataset.skipped for the reasons")
