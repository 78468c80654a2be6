"""Image decoding shared by the dataset loaders, and what to do with a file that will not decode."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["ON_BAD_IMAGE", "BadImageError", "read_rgb_image"]

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
