"""A complete distillation method in one file (not a test module): adding a method is this
file plus its registration. ``tests/conftest.py`` imports it, so the method contract test
(``tests/test_method_contract.py``) covers it like any shipped method.

``toy_l1``: per level, a 1x1 conv aligns the student to the teacher's channels (after resizing
it to the teacher's grid) and the loss is ``weight * mean |F_T - align(F_S)|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods import LevelResult, LevelwiseMethod, MethodOptions, register
from acamkd.methods.base import check_weight


@dataclass(kw_only=True)
class ToyL1Options(MethodOptions):
    """Options of ``toy_l1`` (plus ``check_finite`` from :class:`MethodOptions`)."""

    weight: float = 1.0  # scale of the L1 loss (>= 0)

    def validate(self) -> None:
        super().validate()
        check_weight("weight", self.weight)


@register("toy_l1", options=ToyL1Options)
class ToyL1(LevelwiseMethod):
    """Weighted L1 between the teacher feature and the 1x1-aligned student feature, per level."""

    options: ToyL1Options

    def build_level(self, teacher_channels: int, student_channels: int, options: ToyL1Options) -> nn.Module:
        return nn.Conv2d(student_channels, teacher_channels, 1)

    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                         align_corners=False)
        aligned = level(student_feat)  # (B, C_t, H, W)
        diff = (teacher_feat - aligned).abs()
        return LevelResult(losses={"l1": self.options.weight * diff.mean()},
                           stats={"abs_diff_max": diff.detach().amax()},
                           tensors={"aligned_student": aligned})
