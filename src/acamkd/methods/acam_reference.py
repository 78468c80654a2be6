"""Two reference implementations of one ACAM-KD level, the yardsticks of tests and benchmarks.

Both read the parameters and switches of an :class:`~acamkd.methods.acam.ACAMLevel` and
return the same :class:`~acamkd.methods.acam.ACAMLevelOutput`, so the fast path can be
compared with them value for value and gradient for gradient. Neither uses :mod:`acamkd.ops`.

* :func:`acam_level_plain`: a line-by-line transcription of the spec's equations, with loops
  over images, masks and mask pairs. For correctness only (slow, materialises attention).
* :func:`acam_level_vectorised`: what a straightforward vectorised implementation does (as the
  seed article's listing): one batched matmul materialising the ``(B, HW, HW)`` attention
  per level, every mask broadcast against the feature difference. The honest speed baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from acamkd.methods.acam import ACAMLevel, ACAMLevelOutput

__all__ = ["acam_level_plain", "acam_level_vectorised"]

# Same denominator floor as the fast path (see acamkd.ops.masking.EPS): part of the math.
_EPS = 1e-12


def _resize_and_project(level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor):
    """Shared prologue: resize student to the teacher grid, align, project with the 1x1 convs."""
    H, W = teacher_feat.shape[-2:]
    if student_feat.shape[-2:] != (H, W):
        student_feat = F.interpolate(student_feat, size=(H, W), mode="bilinear", align_corners=False)
    aligned = level.align(student_feat)  # F_S' (B, C, H, W)
    if level.query == "teacher":
        query_src, context_src = teacher_feat, aligned
    else:
        query_src, context_src = aligned, teacher_feat
    Q = level.query_proj(query_src)  # (B, C/2, H, W)
    K = level.key_proj(context_src)  # (B, C/2, H, W)
    V = level.value_proj(context_src)  # (B, C, H, W)
    return aligned, Q, K, V


def acam_level_plain(level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor) -> ACAMLevelOutput:
    """The spec's equations, one image, one mask and one mask pair at a time."""
    B, C, H, W = teacher_feat.shape
    N, M = H * W, level.num_masks
    aligned, Q, K, V = _resize_and_project(level, teacher_feat, student_feat)
    c_q = Q.shape[1]

    # STCA-FF: A = softmax_j(Q_i . K_j / sqrt(C/2)); F_fused[:, i] = sum_j A[i, j] V[:, j]
    fused_images = []
    for b in range(B):
        q = Q[b].reshape(c_q, N)
        k = K[b].reshape(c_q, N)
        v = V[b].reshape(C, N)
        logits = q.t() @ k / math.sqrt(c_q)  # (N, N): row i = query position
        A = torch.softmax(logits, dim=1)  # softmax over student positions j
        fused_images.append(v @ A.t())  # (C, N)
    fused = torch.stack(fused_images)  # (B, C, N)

    # ASCM
    pooled = fused.mean(dim=2)  # v: (B, C)
    channel_m = spatial_m = None
    if level.channel_units is not None:
        units = level.channel_units
        rows = []
        for b in range(B):
            per_mask = []
            for m in range(M):
                if level.channel_mask in ("paper", "elementwise"):
                    # units[m]: the scalar a[m] (paper) or the row A[m, :] (elementwise)
                    per_mask.append(torch.sigmoid(units[m] * pooled[b]))
                else:  # article
                    per_mask.append(torch.sigmoid(torch.dot(pooled[b], units[m])) * torch.sigmoid(units[m]))
            rows.append(torch.stack(per_mask))
        channel_m = torch.stack(rows)  # (B, M, C)
    if level.spatial_units is not None:
        spatial_m = torch.stack([
            torch.stack([torch.sigmoid(level.spatial_units[m] @ fused[b]) for m in range(M)]) for b in range(B)
        ])  # (B, M, N)

    # Losses on D = F_T - f_align(F_S)
    D = (teacher_feat - aligned).reshape(B, C, N)
    losses = {}

    def norm_of(w: Tensor) -> Tensor:
        return w.sum() if level.mask_norm == "mass" else (w * w).sum()

    def dice_mean(masks: Tensor) -> Tensor:
        if M < 2:
            return masks.new_zeros(())
        total = masks.new_zeros(())
        for b in range(B):
            for i in range(M):
                for j in range(M):
                    if i == j:
                        continue
                    x, y = masks[b, i], masks[b, j]
                    denominator = (x * x).sum() + (y * y).sum()
                    total = total + 2 * (x * y).sum() / torch.clamp(denominator, min=_EPS)
        return total / (B * M * (M - 1))

    diversity = fused.new_zeros(())
    if channel_m is not None:
        total = fused.new_zeros(())
        for b in range(B):
            for m in range(M):
                w = channel_m[b, m]  # (C,)
                numerator = ((w[:, None] * D[b]) ** 2).sum()
                total = total + numerator / torch.clamp(norm_of(w) * N, min=_EPS)
        losses["channel"] = level.alpha * total / (B * M)
        diversity = diversity + dice_mean(channel_m)
    if spatial_m is not None:
        total = fused.new_zeros(())
        for b in range(B):
            for m in range(M):
                w = spatial_m[b, m]  # (N,)
                numerator = ((w[None, :] * D[b]) ** 2).sum()
                total = total + numerator / torch.clamp(norm_of(w) * C, min=_EPS)
        losses["spatial"] = level.alpha * total / (B * M)
        diversity = diversity + dice_mean(spatial_m)
    losses["diversity"] = level.lam * diversity

    return ACAMLevelOutput(
        losses=losses,
        channel_masks=channel_m,
        spatial_masks=None if spatial_m is None else spatial_m.reshape(B, M, H, W),
        fused=fused.reshape(B, C, H, W),
        aligned_student=aligned,
    )


def acam_level_vectorised(level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor) -> ACAMLevelOutput:
    """Materialised attention (one bmm per level) and broadcast masks: the speed baseline."""
    B, C, H, W = teacher_feat.shape
    N = H * W
    aligned, Q, K, V = _resize_and_project(level, teacher_feat, student_feat)
    c_q = Q.shape[1]
    q = Q.flatten(2).transpose(1, 2)  # (B, N, C/2)
    k = K.flatten(2)  # (B, C/2, N)
    v = V.flatten(2).transpose(1, 2)  # (B, N, C)
    attention = torch.softmax(torch.bmm(q, k) / math.sqrt(c_q), dim=-1)  # (B, N, N)
    fused = torch.bmm(attention, v).transpose(1, 2)  # (B, C, N)

    D = (teacher_feat - aligned).flatten(2)  # (B, C, N)
    losses = {}
    diversity = fused.new_zeros(())
    channel_m = spatial_m = None

    def pair_dice(masks: Tensor) -> Tensor:  # (B, M, K) -> mean off-diagonal Dice
        M = masks.shape[1]
        if M < 2:
            return masks.new_zeros(())
        gram = torch.bmm(masks, masks.transpose(1, 2))
        sq = torch.diagonal(gram, dim1=1, dim2=2)
        dice = 2 * gram / (sq[:, :, None] + sq[:, None, :]).clamp_min(_EPS)
        off = ~torch.eye(M, dtype=torch.bool, device=masks.device)
        return dice[:, off].mean()

    def normaliser(masks: Tensor) -> Tensor:
        return masks.sum(-1) if level.mask_norm == "mass" else masks.pow(2).sum(-1)

    if level.channel_units is not None:
        pooled = fused.mean(-1)  # (B, C)
        units = level.channel_units
        if level.channel_mask == "paper":
            channel_m = torch.sigmoid(torch.einsum("m,bc->bmc", units, pooled))
        elif level.channel_mask == "elementwise":
            channel_m = torch.sigmoid(units[None] * pooled[:, None])
        else:
            channel_m = torch.sigmoid(torch.einsum("bc,mc->bm", pooled, units))[..., None] * torch.sigmoid(units)[None]
        weighted = (channel_m[:, :, :, None] * D[:, None]) ** 2  # (B, M, C, N)
        per_mask = weighted.sum((2, 3)) / (normaliser(channel_m) * N).clamp_min(_EPS)
        losses["channel"] = level.alpha * per_mask.mean()
        diversity = diversity + pair_dice(channel_m)
    if level.spatial_units is not None:
        spatial_m = torch.sigmoid(torch.einsum("mc,bcn->bmn", level.spatial_units, fused))  # (B, M, N)
        weighted = (spatial_m[:, :, None, :] * D[:, None]) ** 2  # (B, M, C, N)
        per_mask = weighted.sum((2, 3)) / (normaliser(spatial_m) * C).clamp_min(_EPS)
        losses["spatial"] = level.alpha * per_mask.mean()
        diversity = diversity + pair_dice(spatial_m)
    losses["diversity"] = level.lam * diversity

    return ACAMLevelOutput(
        losses=losses,
        channel_masks=channel_m,
        spatial_masks=None if spatial_m is None else spatial_m.reshape(B, -1, H, W),
        fused=fused.reshape(B, C, H, W),
        aligned_student=aligned,
    )
