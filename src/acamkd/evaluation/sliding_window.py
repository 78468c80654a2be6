"""Sliding-window inference for segmenters: predict large images window by window.

Cityscapes models are trained on 512x1024 crops and often evaluated on the 1024x2048 image
in overlapping windows (mmseg's ``mode='slide'``). The windows tile the image on a regular
grid of step ``stride``; the last row/column of windows is shifted back so it ends at the
border (no padding, every window lies inside the image); each window's full-resolution logits
are added into the image's canvas and every pixel is divided by the number of windows that
covered it. An image no larger than the window is one window: the whole-image prediction.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["window_starts", "sliding_window_logits"]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side of length ``size``.

    ``ceil((size - window) / stride) + 1`` windows at ``0, stride, 2 stride, ...``, the last one
    moved back to end at ``size``; one window at 0 when ``size <= window``.
    """
    for name, v in (("size", size), ("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"window_starts: {name} must be an integer >= 1, got {v!r}")
    if stride > window:
        raise ValueError(f"window_starts: stride {stride} exceeds window {window}: pixels would be skipped")
    if size <= window:
        return [0]
    count = -(-(size - window) // stride) + 1  # ceil division
    return [min(i * stride, size - window) for i in range(count)]


@torch.no_grad()
def sliding_window_logits(model: Callable[[Tensor], Tensor], images: Tensor, window: Sequence[int],
                          stride: Sequence[int], num_classes: int) -> Tensor:
    """Full-resolution logits ``(B, K, H, W)`` of ``images (B, 3, H, W)``, window by window.

    ``model(crop (B, 3, h, w)) -> (B, K, h, w)`` (a :class:`acamkd.models.segmentation.Segmenter`
    upsamples itself). ``window`` and ``stride`` are ``[height, width]``. The canvas is float32
    whatever the model's dtype, so averaging under autocast loses nothing.
    """
    if images.dim() != 4:
        raise ValueError(f"sliding_window_logits: images must be (B, C, H, W), got {tuple(images.shape)}")
    if len(window) != 2 or len(stride) != 2:
        raise ValueError(f"sliding_window_logits: window and stride are [height, width], got {window}, {stride}")
    B, _, H, W = images.shape
    win_h, win_w = min(int(window[0]), H), min(int(window[1]), W)
    tops = window_starts(H, win_h, min(int(stride[0]), win_h))
    lefts = window_starts(W, win_w, min(int(stride[1]), win_w))
    logits = images.new_zeros((B, num_classes, H, W), dtype=torch.float32)  # (B, K, H, W) sum over windows
    count = images.new_zeros((1, 1, H, W), dtype=torch.float32)             # windows covering each pixel
    for top in tops:
        for left in lefts:
            crop = images[:, :, top:top + win_h, left:left + win_w]
            out = model(crop)  # (B, K, win_h, win_w)
            if out.shape != (B, num_classes, win_h, win_w):
                raise ValueError(f"sliding_window_logits: the model returned {tuple(out.shape)} for a "
                                 f"{tuple(crop.shape)} window; expected {(B, num_classes, win_h, win_w)} "
                                 f"(full-resolution logits with num_classes={num_classes})")
            logits[:, :, top:top + win_h, left:left + win_w] += out.float()
            count[:, :, top:top + win_h, left:left + win_w] += 1
    return logits / count
