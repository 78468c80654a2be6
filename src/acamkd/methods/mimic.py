"""Feature mimicking (FitNet-style): the student's aligned feature regresses the teacher's.

Per tapped level (spec ``../shared/spec/baselines.md``, "Feature mimicking")::

    L = w * mean over (B, C, H, W) of (n(F_T) - n(f_align(F_S)))^2

``f_align`` is a 1x1 conv ``C_s -> C_t`` with bias (ACAM-KD's ``align``); when the grids differ
the student feature is first resized to the teacher's grid (bilinear, ``align_corners=False``).
``n`` is the identity (``feature_norm="none"``, FitNet) or, with ``feature_norm="standardise"``,
the per-image, per-channel standardisation over the positions of
:func:`acamkd.ops.normalise.standardise` (PKD's normalisation; the loss is then
``w * 2 (1 - r)`` averaged over images and channels, ``r`` the Pearson correlation of a
channel's two maps: PKD's loss at ``w = loss_weight / 2``).
The spec fixes no authors' code for this baseline, so ``w`` is unverified; the default 1.0 and
where it comes from are in ``docs/methods.md`` ("Feature mimicking").

Everything here is training-only: after distillation only the student is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import LevelResult, LevelwiseMethod, MethodOptions, check_choice, check_weight, upcast
from acamkd.methods.registry import register
from acamkd.ops.normalise import FEATURE_NORMS, standardise

__all__ = ["Mimic", "MimicOptions", "mimic_level_loss"]


@dataclass(kw_only=True)
class MimicOptions(MethodOptions):
    """Options of ``mimic`` (``method.options`` in a config; plus ``check_finite``).

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    weight: float = 1.0  # w: scale of every level's MSE (>= 0); docs/methods.md says where 1.0 comes from
    feature_norm: Literal["none", "standardise"] = "none"  # none (FitNet) | standardise (PKD's normalisation)

    def validate(self) -> None:
        super().validate()
        check_weight("weight", self.weight)
        check_choice("feature_norm", self.feature_norm, FEATURE_NORMS)


def mimic_level_loss(align: nn.Conv2d, teacher_feat: Tensor, student_feat: Tensor,
                     feature_norm: str = "none") -> tuple[Tensor, Tensor]:
    """The unweighted MSE of one level and the aligned student (standardised, with the teacher,
    under ``feature_norm="standardise"``).

    ``teacher_feat`` ``(B, C_t, H, W)``, ``student_feat`` ``(B, C_s, H_s, W_s)`` (resized to
    ``(H, W)`` first when the grids differ), ``align`` a 1x1 conv ``C_s -> C_t``. Returns
    ``(mse, aligned)``: a 0-dim tensor and ``(B, C_t, H, W)``, both fp32 (fp64 for fp64 inputs)
    whatever the autocast state, because fp16 squares of feature differences overflow and bf16
    sums over a whole feature map lose the small terms.
    """
    if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                     align_corners=False)
    with torch.autocast(teacher_feat.device.type, enabled=False):
        student = upcast(student_feat)
        weight, bias = align.weight, align.bias
        if weight.dtype != student.dtype:  # an fp32 conv on fp64 inputs (or the reverse): the inputs' precision
            weight, bias = weight.to(student.dtype), None if bias is None else bias.to(student.dtype)
        aligned = F.conv2d(student, weight, bias)  # (B, C_t, H, W)
        teacher = upcast(teacher_feat).to(aligned.dtype)
        if feature_norm == "standardise":
            teacher, aligned = standardise(teacher, (2, 3)), standardise(aligned, (2, 3))
        mse = (teacher - aligned).square().mean()
    return mse, aligned


@register("mimic", options=MimicOptions)
class Mimic(LevelwiseMethod):
    """FitNet-style feature mimicking over several tapped levels: one 1x1 alignment conv per level.

    ``Mimic(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (options: :class:`MimicOptions` or its fields as keywords). The call
    ``Mimic(teacher_feats, student_feats, batch=None)`` returns ``{"<level>.mse": w * MSE}``,
    each a 0-dim fp32 tensor (the inputs may be fp16/bf16 or come from an autocast region);
    ``batch`` is not used. :meth:`statistics` gives per level the unweighted MSE of the last
    call (``"<level>.mse"``); :meth:`inspect` gives ``{level: {"aligned_student": (B, C_t, H, W)}}``.
    Input checks (level names, shapes, devices, NaN/inf) and their errors:
    :class:`~acamkd.methods.base.LevelwiseMethod`.
    """

    options: MimicOptions

    def build_level(self, teacher_channels: int, student_channels: int, options: MimicOptions) -> nn.Module:
        return nn.Conv2d(student_channels, teacher_channels, 1)  # f_align: C_s -> C_t, with bias

    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        mse, aligned = mimic_level_loss(level, teacher_feat, student_feat, self.options.feature_norm)
        return LevelResult(losses={"mse": self.options.weight * mse}, stats={"mse": mse.detach()},
                           tensors={"aligned_student": aligned})
