"""Two reference implementations of one ACAM-KD level, the yardsticks of tests and benchmarks.

Both read the parameters and switches of an :class:`~acamkd.methods.acam.ACAMLevel` and
return the same :class:`~acamkd.methods.acam.ACAMLevelOutput`, so the fast path can be
compared with them value for value and gradient for gradient. Neither uses :mod:`acamkd.ops`.

* :func:`acam_level_plain`: a line-by-line transcription of the spec's equations, with loops
  over images, masks and mask pairs. For correctness only (slow, materialises attention).
* :func:`acam_level_vectorised`: what a straightforward vectorised implementation does (as the
  seed article's listing): one batched matmul materialising the ``(B, HW, HW)`` attention
  per level, every mask broadcast against the feature difference. The honest speed baseline.

Both implement every switch of :class:`~acamkd.methods.acam.ACAMLevel`, including those against
mask collapse (``mask_activation``, ``mask_grad``, the mass floor, ``fusion_student_grad``) and
``feature_norm`` (instance normalisation written out), independently of the fast path: the
softmax across masks is written out (``exp / sum``), the
gradient reversal is ``2 sg(w) - w`` (value ``w``, exactly, by Sterbenz's lemma; gradient ``-1``)
rather than an autograd function, and the floor and the partition gain are spelled out.
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


def _instance_standardise(x: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-5)`` over the positions of each image's each channel, in the
    ``(B, C, H, W)`` layout (what ``F.instance_norm`` computes, which refuses 1 x 1 maps in training)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _resize_and_project(level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor):
    """Shared prologue: resize student to the teacher grid, align, standardise the pair
    (``feature_norm``), project with the 1x1 convs. Returns the teacher feature as used after."""
    H, W = teacher_feat.shape[-2:]
    if student_feat.shape[-2:] != (H, W):
        student_feat = F.interpolate(student_feat, size=(H, W), mode="bilinear", align_corners=False)
    aligned = level.align(student_feat)  # F_S' (B, C, H, W)
    if level.feature_norm == "standardise":  # instance norm without affine: per image, per channel
        teacher_feat, aligned = _instance_standardise(teacher_feat), _instance_standardise(aligned)
    if level.mask_source != "cooperative":  # no STCA-FF: masks from F_T alone, or no masks at all
        return teacher_feat, aligned, None, None, None
    # fusion_student_grad=False: STCA-FF reads a constant copy of F_S'.
    fusion_student = aligned if level.fusion_student_grad else aligned.detach()
    if level.query == "teacher":
        query_src, context_src = teacher_feat, fusion_student
    else:
        query_src, context_src = fusion_student, teacher_feat
    Q = level.query_proj(query_src)  # (B, C/2, H, W)
    K = level.key_proj(context_src)  # (B, C/2, H, W)
    V = level.value_proj(context_src)  # (B, C, H, W)
    return teacher_feat, aligned, Q, K, V


def _reversed(x: Tensor) -> Tensor:
    """Value ``x`` (``2x - x`` is exact in floating point), gradient ``-1``: a gradient reversal."""
    return 2 * x.detach() - x


def _gain(level: ACAMLevel) -> float:
    """Partition masks start at 1/M, sigmoid masks at 1/2; a mass-normalised loss is linear in a
    constant mask, an energy-normalised one does not depend on it: gain M/2 resp. 1."""
    if level.mask_activation != "partition" or level.mask_source == "uniform":
        return 1.0
    return level.num_masks / 2 if level.mask_norm == "mass" else 1.0


def acam_level_plain(level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor) -> ACAMLevelOutput:
    """The spec's equations, one image, one mask and one mask pair at a time."""
    B, C, H, W = teacher_feat.shape
    N, M = H * W, level.num_masks
    teacher_feat, aligned, Q, K, V = _resize_and_project(level, teacher_feat, student_feat)
    uniform = level.mask_source == "uniform"

    # STCA-FF: A = softmax_j(Q_i . K_j / sqrt(C/2)); F_fused[:, i] = sum_j A[i, j] V[:, j]
    # (mask_source "teacher" / "uniform": the teacher feature itself)
    fused_images = []
    for b in range(B if Q is not None else 0):
        c_q = Q.shape[1]
        q = Q[b].reshape(c_q, N)
        k = K[b].reshape(c_q, N)
        v = V[b].reshape(C, N)
        logits = q.t() @ k / math.sqrt(c_q)  # (N, N): row i = query position
        A = torch.softmax(logits, dim=1)  # softmax over student positions j
        fused_images.append(v @ A.t())  # (C, N)
    fused = torch.stack(fused_images) if Q is not None else teacher_feat.reshape(B, C, N)  # (B, C, N)

    # ASCM
    pooled = fused.mean(dim=2)  # v: (B, C)
    partition = level.mask_activation == "partition"

    def across_masks_softmax(logits: Tensor) -> Tensor:  # (M, K): at every unit k, over m
        e = torch.exp(logits - logits.max(dim=0, keepdim=True).values)
        return e / e.sum(dim=0, keepdim=True)

    channel_m = spatial_m = None
    if uniform:  # every mask is 1
        if level.masks in ("both", "channel"):
            channel_m = torch.ones(B, M, C, dtype=fused.dtype, device=fused.device)
        if level.masks in ("both", "spatial"):
            spatial_m = torch.ones(B, M, N, dtype=fused.dtype, device=fused.device)
    if level.channel_units is not None:
        units = level.channel_units
        rows = []
        for b in range(B):
            per_mask = []
            for m in range(M):
                if level.channel_mask in ("paper", "elementwise"):
                    # units[m]: the scalar a[m] (paper) or the row A[m, :] (elementwise)
                    logit = units[m] * pooled[b]
                    per_mask.append(logit if partition else torch.sigmoid(logit))
                elif partition:  # article, as a logit: log of the product of the two sigmoids
                    per_mask.append(-F.softplus(-torch.dot(pooled[b], units[m])) - F.softplus(-units[m]))
                else:  # article
                    per_mask.append(torch.sigmoid(torch.dot(pooled[b], units[m])) * torch.sigmoid(units[m]))
            image = torch.stack(per_mask)  # (M, C)
            rows.append(across_masks_softmax(image) if partition else image)
        channel_m = torch.stack(rows)  # (B, M, C)
    if level.spatial_units is not None:
        rows = []
        for b in range(B):
            logits = torch.stack([level.spatial_units[m] @ fused[b] for m in range(M)])  # (M, N)
            rows.append(across_masks_softmax(logits) if partition else torch.sigmoid(logits))
        spatial_m = torch.stack(rows)  # (B, M, N)

    # Losses on D = F_T - f_align(F_S)
    D = (teacher_feat - aligned).reshape(B, C, N)
    losses = {}

    def norm_of(w: Tensor, norm: str) -> Tensor:
        return w.sum() if norm == "mass" else (w * w).sum()

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

    def masked_loss(masks: Tensor, channel_family: bool) -> Tensor:
        """mean_b mean_m sum_{k,p} (w d)^2 / (R norm(w)); w a channel (C,) or spatial (N,) mask."""

        def one(w: Tensor, d: Tensor, norm: str) -> Tensor:  # d: (C, N)
            weighted = w[:, None] * d if channel_family else w[None, :] * d
            other = N if channel_family else C
            return (weighted ** 2).sum() / torch.clamp(norm_of(w, norm) * other, min=_EPS)

        student_side, adversary = fused.new_zeros(()), fused.new_zeros(())
        for b in range(B):
            for m in range(M):
                w = masks[b, m]
                if level.mask_grad == "descend":
                    student_side = student_side + one(w, D[b], level.mask_norm)
                else:  # the masks are constants for the student side
                    student_side = student_side + one(w.detach(), D[b], level.mask_norm)
                if level.mask_grad == "adversarial":  # the mask side ascends the energy form
                    # on the error per unit normalised to mean 1 over the image's units
                    d = D[b].detach()
                    error = (d ** 2).sum(1) if channel_family else (d ** 2).sum(0)  # (C,) or (N,)
                    error = error / torch.clamp(error.mean(), min=_EPS)
                    r = _reversed(w)
                    adversary = adversary + (r * r * error).sum() / torch.clamp((r * r).sum(), min=_EPS)
        loss = level.alpha * _gain(level) * (student_side / (B * M))
        if level.mask_grad == "adversarial":
            adversary = level.alpha * (adversary / (B * M))
            loss = loss + (adversary - adversary.detach())
        return loss

    def floor_of(masks: Tensor) -> Tensor:  # mean_b sum_m relu(rho - mean_k w)^2
        total = masks.new_zeros(())
        for b in range(B):
            for m in range(M):
                total = total + torch.clamp(level.mass_rho - masks[b, m].mean(), min=0) ** 2
        return total / B

    diversity = fused.new_zeros(())
    floor = fused.new_zeros(())
    if channel_m is not None:
        losses["channel"] = masked_loss(channel_m, channel_family=True)
        if not uniform:  # constant masks: no Dice term, no floor
            diversity = diversity + dice_mean(channel_m)
            floor = floor + floor_of(channel_m)
    if spatial_m is not None:
        losses["spatial"] = masked_loss(spatial_m, channel_family=False)
        if not uniform:
            diversity = diversity + dice_mean(spatial_m)
            floor = floor + floor_of(spatial_m)
    losses["diversity"] = level.lam * diversity
    if level.mass_beta > 0 and not uniform:
        losses["mass_floor"] = level.mass_beta * floor

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
    teacher_feat, aligned, Q, K, V = _resize_and_project(level, teacher_feat, student_feat)
    uniform = level.mask_source == "uniform"
    if Q is not None:
        c_q = Q.shape[1]
        q = Q.flatten(2).transpose(1, 2)  # (B, N, C/2)
        k = K.flatten(2)  # (B, C/2, N)
        v = V.flatten(2).transpose(1, 2)  # (B, N, C)
        attention = torch.softmax(torch.bmm(q, k) / math.sqrt(c_q), dim=-1)  # (B, N, N)
        fused = torch.bmm(attention, v).transpose(1, 2)  # (B, C, N)
    else:  # mask_source "teacher" / "uniform": the teacher feature itself
        fused = teacher_feat.flatten(2)  # (B, C, N)

    D = (teacher_feat - aligned).flatten(2)  # (B, C, N)
    losses = {}
    diversity = fused.new_zeros(())
    floor = fused.new_zeros(())
    channel_m = spatial_m = None
    partition = level.mask_activation == "partition"

    def pair_dice(masks: Tensor) -> Tensor:  # (B, M, K) -> mean off-diagonal Dice
        M = masks.shape[1]
        if M < 2:
            return masks.new_zeros(())
        gram = torch.bmm(masks, masks.transpose(1, 2))
        sq = torch.diagonal(gram, dim1=1, dim2=2)
        dice = 2 * gram / (sq[:, :, None] + sq[:, None, :]).clamp_min(_EPS)
        off = ~torch.eye(M, dtype=torch.bool, device=masks.device)
        return dice[:, off].mean()

    def normaliser(masks: Tensor, norm: str) -> Tensor:
        return masks.sum(-1) if norm == "mass" else masks.pow(2).sum(-1)

    def activate(logits: Tensor) -> Tensor:  # (B, M, K): sigmoid, or softmax across masks
        if not partition:
            return torch.sigmoid(logits)
        e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        return e / e.sum(dim=1, keepdim=True)

    def masked_loss(masks: Tensor, per_unit_mask) -> Tensor:
        """``per_unit_mask(masks)``: ``(B, M, C, N)`` broadcast of the masks against D."""
        other = N if per_unit_mask is channel_broadcast else C  # the axis the mask does not cover

        def per_mask(w: Tensor, d: Tensor, norm: str) -> Tensor:  # (B, M)
            return (per_unit_mask(w) * d[:, None]).pow(2).sum((2, 3)) / (normaliser(w, norm) * other).clamp_min(_EPS)

        live = masks if level.mask_grad == "descend" else masks.detach()
        loss = level.alpha * _gain(level) * per_mask(live, D, level.mask_norm).mean()
        if level.mask_grad == "adversarial":
            error = D.detach().pow(2).sum(2 if per_unit_mask is channel_broadcast else 1)  # (B, K)
            error = error / error.mean(-1, keepdim=True).clamp_min(_EPS)
            r = _reversed(masks)
            adversary = level.alpha * ((r.pow(2) * error[:, None]).sum(-1) / r.pow(2).sum(-1).clamp_min(_EPS)).mean()
            loss = loss + (adversary - adversary.detach())
        return loss

    def channel_broadcast(w: Tensor) -> Tensor:
        return w[:, :, :, None]

    def spatial_broadcast(w: Tensor) -> Tensor:
        return w[:, :, None, :]

    def floor_of(masks: Tensor) -> Tensor:
        return (level.mass_rho - masks.mean(-1)).clamp_min(0).pow(2).sum(1).mean()

    M = level.num_masks
    if uniform and level.masks in ("both", "channel"):
        channel_m = fused.new_ones(B, M, C)
        losses["channel"] = masked_loss(channel_m, channel_broadcast)
    if uniform and level.masks in ("both", "spatial"):
        spatial_m = fused.new_ones(B, M, N)
        losses["spatial"] = masked_loss(spatial_m, spatial_broadcast)
    if level.channel_units is not None:
        pooled = fused.mean(-1)  # (B, C)
        units = level.channel_units
        if level.channel_mask == "paper":
            channel_m = activate(torch.einsum("m,bc->bmc", units, pooled))
        elif level.channel_mask == "elementwise":
            channel_m = activate(units[None] * pooled[:, None])
        elif partition:  # the article mask's log as its logit
            channel_m = activate(torch.log(torch.sigmoid(torch.einsum("bc,mc->bm", pooled, units)))[..., None]
                                 + torch.log(torch.sigmoid(units))[None])
        else:
            channel_m = torch.sigmoid(torch.einsum("bc,mc->bm", pooled, units))[..., None] * torch.sigmoid(units)[None]
        losses["channel"] = masked_loss(channel_m, channel_broadcast)
        diversity = diversity + pair_dice(channel_m)
        floor = floor + floor_of(channel_m)
    if level.spatial_units is not None:
        spatial_m = activate(torch.einsum("mc,bcn->bmn", level.spatial_units, fused))  # (B, M, N)
        losses["spatial"] = masked_loss(spatial_m, spatial_broadcast)
        diversity = diversity + pair_dice(spatial_m)
        floor = floor + floor_of(spatial_m)
    losses["diversity"] = level.lam * diversity
    if level.mass_beta > 0 and not uniform:
        losses["mass_floor"] = level.mass_beta * floor

    return ACAMLevelOutput(
        losses=losses,
        channel_masks=channel_m,
        spatial_masks=None if spatial_m is None else spatial_m.reshape(B, -1, H, W),
        fused=fused.reshape(B, C, H, W),
        aligned_student=aligned,
    )
