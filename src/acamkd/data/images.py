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

__all__ = ["ON_BAD_IMAGE", "BadImageError", "read_rgb_image", "load_skipping_bad", "tile_rawmode"]

logger = logging.getLogger("acamkd.data")
T = TypeVar("T")

# on_bad_image: "error" raises naming the file; "skip" moves on and counts it.
ON_BAD_IMAGE = ("error", "skip")

# How each Pillow mode becomes RGB in [0, 1] (PIL.Image.MODES, Pillow 10-13):
# 8 bits per channel, Pillow's own conversion to RGB (alpha dropped: the colour as stored) ...
_VIA_CONVERT = frozenset({"1", "L", "LA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# ... palette modes through RGBA (the same colours; converting a palette with per-entry
# transparency straight to RGB makes Pillow warn) ...
_VIA_RGBA = frozenset({"P", "PA"})
# ... 16-bit grayscale (any byte order): value / 65535 ...
_GRAY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# ... 32-bit integers: 16-bit data from formats that hold no more (Pillow opens a 16-bit PGM,
# rescaled to 0..65535, and older Pillow versions a 16-bit PNG, as "I"); any other "I" file is refused.
_INT_AS_16BIT_FORMATS = frozenset({"PNG", "PPM"})
_GUIDE = ("Save it as 8-bit RGB or grayscale (PNG, JPEG) or as a 16-bit grayscale PNG, or pass "
          "on_bad_image='skip' (data.on_bad_image=skip) to leave it out.")


class BadImageError(RuntimeError):
    """An image (or label) file that exists but cannot be decoded, or decodes to the wrong size,
    or is stored in a way that has no defined RGB value in ``[0, 1]`` (its mode is named)."""


def tile_rawmode(im: Image.Image) -> tuple[str | None, Any]:
    """``(codec, rawmode)`` of the first tile of an *unloaded* image: how Pillow will unpack the
    stored samples (e.g. ``("zip", "I;16B")`` for a 16-bit PNG, ``("ppm", ("L", 1023))`` for a PGM
    whose maxval Pillow rescales to 65535). ``(None, None)`` when the plugin gives no tile."""
    if not im.tile:
        return None, None
    tile = im.tile[0]
    codec, args = tile[0], tile[3]
    if codec == "ppm":
        return codec, args  # (rawmode, maxval)
    return codec, args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else args


def _refuse(path: str, mode: str, why: str) -> BadImageError:
    return BadImageError(f"{path}: image mode {mode!r} {why}, so it cannot be read as RGB in [0, 1] "
                         f"without guessing. {_GUIDE}")


def _decoded_values(im: Image.Image, path: str, rawmode: Any) -> np.ndarray:
    """A loaded PIL image -> uint8 ``(H, W, 3)`` RGB (to divide by 255), or float32 ``(H, W)`` grey
    already in ``[0, 1]``; :class:`BadImageError` naming ``path`` and the mode when the stored
    values have no defined scale."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in _VIA_CONVERT:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    if mode in _VIA_RGBA:
        return np.array(im.convert("RGBA"), dtype=np.uint8)[..., :3]
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA (the straight grey)
        return np.array(im.convert("LA").convert("RGB"), dtype=np.uint8)
    if mode in _GRAY16:
        full = 4095.0 if rawmode == "I;12" else 65535.0  # a 12-bit TIFF is unpacked unscaled into 16 bits
        return np.asarray(im).astype(np.float32) / np.float32(full)
    if mode == "I":
        if im.format not in _INT_AS_16BIT_FORMATS:
            raise _refuse(path, mode, f"(32-bit integers, from a {im.format or 'unknown-format'} file) has no "
                                      f"agreed brightness range")
        gray = np.asarray(im)
        lo, hi = (int(gray.min()), int(gray.max())) if gray.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise _refuse(path, mode, f"holds values {lo}..{hi}, outside the 16-bit range 0..65535 of a "
                                      f"{im.format} file")
        return gray.astype(np.float32) / np.float32(65535.0)
    if mode == "F":
        gray = np.array(im, dtype=np.float32)
        finite = bool(np.isfinite(gray).all())
        lo, hi = (float(gray.min()), float(gray.max())) if gray.size and finite else (0.0, 0.0)
        if not finite or lo < 0.0 or hi > 1.0:
            what = "non-finite values (nan/inf)" if not finite else f"values in [{lo:g}, {hi:g}]"
            raise _refuse(path, mode, f"(32-bit float) holds {what}; only floats already in [0, 1] are "
                                      f"read as they are")
        return gray
    raise _refuse(path, mode, "is not one acamkd knows how to convert")


def read_rgb_image(path: str) -> Tensor:
    """Decode ``path`` with PIL into float32 ``(3, H, W)`` RGB in ``[0, 1]``.

    Every mode Pillow opens is either read with its values or refused:

    * 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and the
      alpha variants ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``RGBX``): Pillow's conversion to
      RGB, divided by 255; alpha is dropped (the stored colour, not composited on a background);
      a palette image gives its palette colours.
    * 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): value / 65535 (a 12-bit TIFF:
      / 4095). 16-bit *colour* PNG/TIFF/PPM files are opened by Pillow as 8-bit ``RGB``/``RGBA``
      (the high byte of each sample), so they read at 8-bit precision: within 1/257 of value / 65535.
    * ``I`` (32-bit integers): from PNG or PGM (16-bit data; Pillow rescales a PGM's maxval to
      65535) value / 65535; from any other format (a 32-bit TIFF) refused: no agreed range.
    * ``F`` (32-bit float): read as is when every value is finite and in ``[0, 1]``, else refused.

    A refusal is :class:`BadImageError` naming ``path`` and the mode. A multi-frame file (TIFF,
    GIF, APNG) gives its first frame. The EXIF orientation is *not* applied: COCO boxes are in the
    stored pixel frame (as pycocotools/torchvision read it). Any failure while decoding raises
    :class:`BadImageError` naming ``path``.
    """
    try:
        with Image.open(path) as im:
            _, rawmode = tile_rawmode(im)
            im.load()  # decode now (the first frame), so truncated/corrupt files fail here and not later
            arr = _decoded_values(im, path, rawmode)  # (H, W, 3) uint8 or (H, W) float32 in [0, 1]
    except BadImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}). "
                            f"Re-download/re-extract the file, or pass on_bad_image='skip'.") from e
    if arr.dtype == np.uint8:
        chw = torch.from_numpy(arr).permute(2, 0, 1)
        return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    return torch.from_numpy(arr).expand(3, *arr.shape).contiguous()  # grey -> (3, H, W)


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
