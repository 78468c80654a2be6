"""Feature normalisation before a feature-distillation loss (``feature_norm`` of ``acam`` and ``mimic``).

``"standardise"``: every image's every channel is shifted and scaled to zero mean and unit
variance over the positions, ``x_hat[b,c,p] = (x[b,c,p] - mean_p x[b,c]) / sqrt(var_p x[b,c] + eps)``
(biased variance, ``eps = 1e-5``: ``F.instance_norm`` without affine parameters). Applied to
the teacher feature and to the aligned student feature, the squared error of a unit becomes
``2 (1 - r)`` per element for the Pearson correlation ``r`` of the two, so a distillation loss
no longer scales with the teacher's raw feature magnitude (which, for a detector trained from
scratch, differs by 100x across FPN levels and dwarfs the task loss; ``../shared/spec/mask-collapse.md``,
"Loss scale").

Follows PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022; ``PKDLoss.norm`` in open-mmlab/mmrazor
``mmrazor/models/losses/pkd_loss.py``), with two deliberate differences, both in
``docs/methods.md``: PKD pools each channel's statistics over the whole batch (we use each
image alone, so an image's loss does not depend on its batch mates, nor on the batch size or
the number of processes), and divides by ``std + 1e-6`` with the unbiased std (we use
``sqrt(var + 1e-5)``, the instance-norm convention, which stays finite on a constant channel).
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["FEATURE_NORMS", "STANDARDISE_EPS", "standardise"]

FEATURE_NORMS = ("none", "standardise")  # the values of the ``feature_norm`` option
STANDARDISE_EPS = 1e-5  # added to the variance (F.instance_norm's default)


def standardise(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Zero mean, unit variance along ``dim`` (the positions), every other index on its own.

    ``x``: any shape, e.g. ``(B, C, H, W)`` with ``dim=(2, 3)`` or tokens ``(B, N, C)`` with
    ``dim=1``. Returns a tensor of the same shape and dtype; differentiable. A constant slice
    maps to 0 (no NaN). Callers pass fp32 (or fp64) tensors: the variance of fp16 features
    overflows.
    """
    mean = x.mean(dim, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dim, keepdim=True)  # biased, as instance norm
    return centred * (var + STANDARDISE_EPS).rsqrt()
