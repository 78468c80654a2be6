"""ASCM masks, mask-weighted feature losses and the Dice diversity, as single vectorised
expressions (spec sections 2 and 3). No loop over masks; callers pass fp32 tensors.

Layouts: a family of ``M`` masks over ``K`` units is ``(B, M, K)``: ``K = C`` for channel
masks, ``K = HW`` for spatial masks. The loss of one family needs only the squared error
summed over the *other* axis (``sq_err`` ``(B, K)``), because
``sum_{k,p} (w[k] d[k,p])^2 = sum_k w[k]^2 sum_p d[k,p]^2``. So the ``(B, M, C, HW)``
product of every mask with the difference is never formed.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CHANNEL_MASK_FORMS",
    "MASK_NORMS",
    "EPS",
    "channel_masks",
    "spatial_masks",
    "masked_mse",
    "pairwise_dice",
    "mean_pairwise_dice",
]

CHANNEL_MASK_FORMS = ("paper", "elementwise", "article")
MASK_NORMS = ("mass", "energy")
# Floor on loss and Dice denominators: sigmoid masks are > 0, but a mask family can underflow
# to exact zeros in fp32 (logits below about -88); the floor turns 0/0 into 0 instead of NaN.
EPS = 1e-12


def channel_masks(pooled: Tensor, units: Tensor, form: str) -> Tensor:
    """Channel masks ``(B, M, C)`` from the pooled fused feature ``v`` ``(B, C)``.

    ``paper``: ``sigmoid(a[m] * v[k])``, units ``a`` ``(M,)``.
    ``elementwise``: ``sigmoid(A[m, k] * v[k])``, units ``(M, C)``.
    ``article``: ``sigmoid(<v, U_m>) * sigmoid(U[m, k])``, units ``(M, C)``.
    """
    if form == "paper":
        return torch.sigmoid(units[None, :, None] * pooled[:, None, :])
    if form == "elementwise":
        return torch.sigmoid(units[None, :, :] * pooled[:, None, :])
    if form == "article":
        return torch.sigmoid(pooled @ units.t())[:, :, None] * torch.sigmoid(units)[None]
    raise ValueError(f"channel_mask must be one of {CHANNEL_MASK_FORMS}, got {form!r}")


def spatial_masks(tokens: Tensor, units: Tensor) -> Tensor:
    """Spatial masks ``(B, M, N)``: ``sigmoid(sum_k u[m, k] z[b, p, k])``; tokens ``(B, N, C)``."""
    return torch.sigmoid(torch.matmul(units, tokens.transpose(1, 2)))


def masked_mse(sq_err: Tensor, masks: Tensor, other_size: int, norm: str) -> Tensor:
    """``mean_b mean_m sum_k w^2 e[k] / (other_size * sum_k w^norm_power)``.

    sq_err ``(B, K)``: squared difference summed over the other axis (``other_size`` long).
    masks ``(B, M, K)``. ``norm="mass"`` divides by ``sum w`` (paper), ``"energy"`` by
    ``sum w^2`` (scale-invariant in the mask).
    """
    w2 = masks.square()
    numerator = torch.matmul(w2, sq_err.unsqueeze(-1)).squeeze(-1)  # (B, M)
    if norm == "mass":
        denominator = masks.sum(-1)
    elif norm == "energy":
        denominator = w2.sum(-1)
    else:
        raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {norm!r}")
    return (numerator / (denominator * other_size).clamp_min(EPS)).mean()


def pairwise_dice(masks: Tensor) -> Tensor:
    """Soft Dice of every pair of masks, ``(B, M, M)``: ``2<X,Y> / (|X|^2 + |Y|^2)``."""
    gram = torch.matmul(masks, masks.transpose(1, 2))  # (B, M, M)
    energy = torch.diagonal(gram, dim1=1, dim2=2)  # (B, M)
    return 2.0 * gram / (energy[:, :, None] + energy[:, None, :]).clamp_min(EPS)


def mean_pairwise_dice(masks: Tensor) -> Tensor:
    """``mean_b mean_{i != j} Dice(M_i, M_j)`` over masks ``(B, M, K)``; 0 when ``M == 1``."""
    num_masks = masks.shape[1]
    if num_masks < 2:
        return masks.new_zeros(())
    dice = pairwise_dice(masks)
    # Sum the off-diagonal entries through a 0/1 mask rather than "total - trace": the trace
    # is 1 per image with a gradient that cancels only in exact arithmetic, and torch.compile
    # (inductor, torch 2.14 CPU) returned garbage gradients for the subtraction form.
    off = 1.0 - torch.eye(num_masks, dtype=dice.dtype, device=dice.device)
    off_diagonal = (dice * off).sum((1, 2))
    return (off_diagonal / (num_masks * (num_masks - 1))).mean()
