"""Plain, line-by-line references for :mod:`acamkd.methods.maskd`, written after the authors'
``hunto/MasKD`` @ b5af34f, ``mmrazor/mmrazor/models/losses/maskd.py`` (``dice_coeff``,
``MaskModule.forward_mask`` / ``forward_prob`` / ``forward_train``, ``MasKDLoss.forward``) and
``segmentation/losses/maskd.py`` (the ``eps``), in their order of operations: the masked
features ``(N, M, C, H, W)`` are materialised, every step is a separate line. Slow; for tests only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reference_dice", "reference_masked_feature", "reference_masks", "reference_maskd_loss",
           "reference_token_weights"]


def reference_masks(tokens: Tensor, feat: Tensor) -> Tensor:
    """``tokens`` ``(M, C)``, ``feat`` ``(N, C, H, W)`` -> ``(N, M, H, W)``: ``sigmoid(token @ x)``."""
    N, C, H, W = feat.shape
    mask_token = tokens.expand(N, -1, -1)  # (N, M, C)
    k = feat.reshape(N, -1, H * W)  # (N, C, HW)
    attn = mask_token @ k  # (N, M, HW)
    attn = attn.sigmoid()
    return attn.reshape(N, -1, H, W)


def reference_token_weights(conv3_w: Tensor, conv3_b: Tensor, conv1_w: Tensor, conv1_b: Tensor,
                            feat: Tensor) -> Tensor:
    """The branch: 3x3 conv (padding 1), adaptive average pool to 1x1, 1x1 conv, softmax over
    tokens; ``(N, M)``."""
    h = F.conv2d(feat, conv3_w, conv3_b, padding=1)
    h = F.adaptive_avg_pool2d(h, 1)
    h = F.conv2d(h, conv1_w, conv1_b)  # (N, M, 1, 1)
    return h.softmax(1).flatten(1)


def reference_dice(masks: Tensor) -> Tensor:
    """The authors' ``dice_coeff`` on ``masks`` ``(N, M, H, W)``: pairwise, diagonal masked out."""
    inputs = masks.flatten(2)  # (N, M, HW)
    pred = inputs[:, None, :, :]
    target = inputs[:, :, None, :]
    keep = pred.new_ones(pred.size(0), target.size(1), pred.size(2))
    keep[:, torch.arange(keep.size(1)), torch.arange(keep.size(2))] = 0
    a = torch.sum(pred * target, -1)
    b = torch.sum(pred * pred, -1) + 1e-12
    c = torch.sum(target * target, -1) + 1e-12
    d = (2 * a) / (b + c)
    return (d * keep).sum() / keep.sum()


def reference_masked_feature(masks: Tensor, weights: Tensor | None, feat: Tensor) -> Tensor:
    """Stage 1's replacement of a tap: ``(x[:, None] * mask[:, :, None]) * p`` summed over tokens."""
    out = feat.unsqueeze(1) * masks.unsqueeze(2)  # (N, M, C, H, W)
    if weights is not None:
        out = out * weights[:, :, None, None, None]
    return out.sum(1)


def reference_maskd_loss(masks: Tensor, weights: Tensor | None, aligned_student: Tensor, teacher: Tensor,
                         eps: float = 0.0) -> Tensor:
    """``MasKDLoss.forward`` for one level after the masks are chosen (unweighted by ``loss_weight``)."""
    masked_s = aligned_student.unsqueeze(1) * masks.unsqueeze(2)  # (N, M, C, H, W)
    masked_t = teacher.unsqueeze(1) * masks.unsqueeze(2)
    loss = (masked_s - masked_t) ** 2
    loss = loss.sum((3, 4))  # (N, M, C)
    denominator = masks.sum((2, 3)).unsqueeze(-1) + eps
    denominator[denominator == 0] = 1.0  # ours: an all-zero mask's loss is 0, not the authors' 0/0
    loss = loss / denominator
    if weights is not None:
        loss = (loss.mean(-1) * weights).sum(-1)  # (N,)
    return loss.mean()
