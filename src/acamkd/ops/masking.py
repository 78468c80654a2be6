"""ASCM masks, mask-weighted feature losses and the Dice diversity, as single vectorised
expressions (spec sections 2 and 3). No loop over masks; callers pass fp32 tensors.

Layouts: a family of ``M`` masks over ``K`` units is ``(B, M, K)``: ``K = C`` for channel
masks, ``K = HW`` for spatial masks. The loss of one family needs only the squared error
summed over the *other* axis (``sq_err`` ``(B, K)``), because
``sum_{k,p} (w[k] d[k,p])^2 = sum_k w[k]^2 sum_p d[k,p]^2``. So the ``(B, M, C, HW)``
product of every mask with the difference is never formed.

Switches against mask collapse (``docs/methods.md``, "Switches against mask collapse"):
``activation="partition"`` (a softmax across the ``M`` masks at every unit, with
:func:`partition_gain`), :func:`mass_floor` and :func:`reverse_gradient`. Cheap detached
diagnostics of a mask family: :func:`mask_masses`, :func:`participation_ratio`,
:func:`error_correlation`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CHANNEL_MASK_FORMS",
    "MASK_NORMS",
    "MASK_ACTIVATIONS",
    "EPS",
    "channel_mask_logits",
    "channel_masks",
    "spatial_masks",
    "masked_mse",
    "partition_gain",
    "mass_floor",
    "reverse_gradient",
    "pairwise_dice",
    "mean_pairwise_dice",
    "mask_masses",
    "participation_ratio",
    "error_correlation",
]

CHANNEL_MASK_FORMS = ("paper", "elementwise", "article")
MASK_NORMS = ("mass", "energy")
MASK_ACTIVATIONS = ("sigmoid", "partition")
# Floor on loss and Dice denominators: sigmoid masks are > 0, but a mask family can underflow
# to exact zeros in fp32 (logits below about -88); the floor turns 0/0 into 0 instead of NaN.
EPS = 1e-12


def channel_mask_logits(pooled: Tensor, units: Tensor, form: str) -> Tensor:
    """The channel masks' logits ``(B, M, C)`` (what ``partition`` takes a softmax of).

    ``paper``: ``a[m] * v[k]``; ``elementwise``: ``A[m, k] * v[k]``; ``article``: the log of its
    mask, ``log sigmoid(<v, U_m>) + log sigmoid(U[m, k])`` (the article mask is a product of two
    sigmoids; its softmax across masks is that product normalised across masks).
    """
    if form == "paper":
        return units[None, :, None] * pooled[:, None, :]
    if form == "elementwise":
        return units[None, :, :] * pooled[:, None, :]
    if form == "article":
        return F.logsigmoid(pooled @ units.t())[:, :, None] + F.logsigmoid(units)[None]
    raise ValueError(f"channel_mask must be one of {CHANNEL_MASK_FORMS}, got {form!r}")


def _check_activation(activation: str) -> None:
    if activation not in MASK_ACTIVATIONS:
        raise ValueError(f"mask_activation must be one of {MASK_ACTIVATIONS}, got {activation!r}")


def channel_masks(pooled: Tensor, units: Tensor, form: str, activation: str = "sigmoid") -> Tensor:
    """Channel masks ``(B, M, C)`` from the pooled fused feature ``v`` ``(B, C)``.

    ``activation="sigmoid"`` (paper):
    ``paper``: ``sigmoid(a[m] * v[k])``, units ``a`` ``(M,)``.
    ``elementwise``: ``sigmoid(A[m, k] * v[k])``, units ``(M, C)``.
    ``article``: ``sigmoid(<v, U_m>) * sigmoid(U[m, k])``, units ``(M, C)``.

    ``activation="partition"``: ``softmax_m`` of :func:`channel_mask_logits` at every channel,
    so ``sum_m M^c[b, m, k] = 1`` for every image and channel.
    """
    _check_activation(activation)
    if activation == "partition":
        return torch.softmax(channel_mask_logits(pooled, units, form), dim=1)
    if form == "paper":
        return torch.sigmoid(units[None, :, None] * pooled[:, None, :])
    if form == "elementwise":
        return torch.sigmoid(units[None, :, :] * pooled[:, None, :])
    if form == "article":
        return torch.sigmoid(pooled @ units.t())[:, :, None] * torch.sigmoid(units)[None]
    raise ValueError(f"channel_mask must be one of {CHANNEL_MASK_FORMS}, got {form!r}")


def spatial_masks(tokens: Tensor, units: Tensor, activation: str = "sigmoid") -> Tensor:
    """Spatial masks ``(B, M, N)`` from tokens ``(B, N, C)``, logits ``s[b,m,p] = sum_k u[m,k] z[b,p,k]``.

    ``activation="sigmoid"`` (paper): ``sigmoid(s)``. ``"partition"``: ``softmax_m(s)`` at every
    position, so ``sum_m M^s[b, m, p] = 1``.
    """
    _check_activation(activation)
    logits = torch.matmul(units, tokens.transpose(1, 2))
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)


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


def partition_gain(num_masks: int, norm: str) -> float:
    """The factor that puts a ``partition`` family's masked loss at the paper mode's start scale.

    For a constant mask ``w = c`` the masked loss of one mask is ``c * E`` under ``mass``
    (``sum c^2 e / (R sum c) = c sum e / (R K)``, ``E`` the plain MSE) and ``E`` under ``energy``.
    At init the paper's sigmoid masks are ~``1/2``, partition masks ~``1/M``: the gain is
    ``(1/2) / (1/M) = M / 2`` under ``mass`` and ``1`` under ``energy`` (exact for uniform masks,
    i.e. mask units at 0; close to it for the default ``init_std = 0.01``).
    """
    if norm == "mass":
        return num_masks / 2.0
    if norm == "energy":
        return 1.0
    raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {norm!r}")


def mass_floor(masks: Tensor, rho: float) -> Tensor:
    """``mean_b sum_m relu(rho - mean_k w[b, m, k])^2`` over masks ``(B, M, K)`` (unweighted).

    Zero while every mask of every image keeps a mean of at least ``rho``; below it, a quadratic
    pull back up whose gradient does not vanish as the mask shrinks (``2 (rho - mean w) / K`` per unit).
    """
    return torch.relu(rho - masks.mean(-1)).square().sum(1).mean()


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky's gradient reversal)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """``x`` unchanged; in the backward pass everything upstream of ``x`` receives ``-dL/dx``."""
    return _ReverseGradient.apply(x)


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


# ------------------------------------------------------------------------------ diagnostics
def mask_masses(masks: Tensor) -> Tensor:
    """Per-image mass of every mask, ``(B, M)``: ``mass[b, m] = mean_k w[b, m, k]``."""
    return masks.mean(-1)


def participation_ratio(masses: Tensor) -> Tensor:
    """``mean_b (sum_m mass[b,m])^2 / (M sum_m mass[b,m]^2)`` over masses ``(B, M)``, in ``[1/M, 1]``.

    1: every mask carries the same mass; ``1/M``: one mask carries all of it (the others are
    off). An all-zero family gives 0 (the denominator is floored at ``EPS``).
    """
    num_masks = masses.shape[1]
    ratio = masses.sum(1).square() / (num_masks * masses.square().sum(1)).clamp_min(EPS)
    return ratio.mean()


def error_correlation(masks: Tensor, sq_err: Tensor) -> Tensor:
    """``mean_{b,m} Pearson_k(w[b, m, :], e[b, :])``: does a mask sit where the student is wrong?

    masks ``(B, M, K)``, sq_err ``(B, K)`` (the student's squared error per unit, summed over the
    other axis). A constant mask or error (e.g. ``K = 1``) contributes 0.
    """
    w = masks - masks.mean(-1, keepdim=True)
    e = (sq_err - sq_err.mean(-1, keepdim=True))[:, None, :]
    covariance = (w * e).sum(-1)
    scale = (w.square().sum(-1) * e.square().sum(-1)).sqrt()
    return (covariance / scale.clamp_min(EPS)).mean()
