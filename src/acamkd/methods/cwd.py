"""CWD: channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for
Dense Prediction"), as MMRazor implements it (``open-mmlab/mmrazor`` @ 90c7af1,
``mmrazor/models/losses/cwd.py``, ``ChannelWiseDivergence``; identical in branch ``0.x``).

Per tapped level, every channel of every image becomes a distribution over the ``H W`` positions
(a softmax with temperature ``tau``), and the student's distribution is pulled towards the
teacher's with a KL divergence::

    p_T[n, c, :] = softmax_hw(F_T[n, c] / tau)        p_S[n, c, :] = softmax_hw(f(F_S)[n, c] / tau)
    L = w * tau^2 / (N C) * sum_{n, c} KL(p_T[n, c] || p_S[n, c])
      = w * tau^2 / (N C) * sum_{n, c, p} p_T (log p_T - log p_S)

``f`` is a 1x1 conv ``C_s -> C_t`` (with bias) only when the channel counts differ, else the
identity (MMRazor's CWD configs distil 256 -> 256 FPN outputs and equal-class logits without a
connector). When the grids differ the student is first resized to the teacher's grid (bilinear,
``align_corners=False``), as ``mimic`` and ACAM do; MMRazor asserts equal grids.

The published constants are in :data:`PUBLISHED_CONSTANTS` and ``docs/methods.md`` ("CWD"): the
defaults are the detection (FPN) ones, ``tau = 1``, ``w = 10``; the segmentation-logits config
uses ``w = 5``, which a segmentation config gets by default (``CWDOptions.task_defaults``; building
the method directly in Python keeps ``w = 10`` unless given).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import LevelResult, LevelwiseMethod, MethodOptions, OptionError, check_weight, upcast
from acamkd.methods.registry import register

__all__ = ["CWD", "CWDLevel", "CWDOptions", "PUBLISHED_CONSTANTS", "cwd_level_loss"]

#: The constants of MMRazor's CWD configs (open-mmlab/mmrazor @ 90c7af1):
#: ``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py`` (5 FPN outputs, inherited by
#: ``cwd_fpn_retina_r101_retina_r50_1x_coco.py``) and
#: ``configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py``
#: (logits of ``decode_head.conv_seg``; branch 0.x's config has the same values).
PUBLISHED_CONSTANTS: dict[str, dict[str, float]] = {
    "detection_fpn": {"tau": 1.0, "weight": 10.0},
    "segmentation_logits": {"tau": 1.0, "weight": 5.0},
}


@dataclass(kw_only=True)
class CWDOptions(MethodOptions):
    """Options of ``cwd`` (``method.options`` in a config; plus ``check_finite``).

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    tau: float = 1.0  # softmax temperature over positions (> 0); MMRazor configs: 1 (detection and segmentation)
    weight: float = 10.0  # w (>= 0): MMRazor FPN configs 10; segmentation-logits config 5 (task_defaults)

    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "segmentation": {"weight": PUBLISHED_CONSTANTS["segmentation_logits"]["weight"]}}

    def validate(self) -> None:
        super().validate()
        check_weight("tau", self.tau)
        if self.tau <= 0:
            raise OptionError("tau", f"must be > 0 (a softmax temperature), got {self.tau!r}")
        check_weight("weight", self.weight)


class CWDLevel(nn.Module):
    """One level's trainable part: ``align``, a 1x1 conv ``C_s -> C_t`` with bias when the channel
    counts differ, else ``None`` (no parameters)."""

    def __init__(self, teacher_channels: int, student_channels: int) -> None:
        super().__init__()
        self.align = (nn.Conv2d(student_channels, teacher_channels, 1)
                      if student_channels != teacher_channels else None)


def cwd_level_loss(align: nn.Conv2d | None, teacher_feat: Tensor, student_feat: Tensor,
                   tau: float) -> tuple[Tensor, Tensor]:
    """The unweighted CWD loss of one level, ``tau^2 / (N C) * sum_{n,c} KL(p_T || p_S)``, and the
    aligned student.

    ``teacher_feat`` ``(N, C_t, H, W)``; ``student_feat`` ``(N, C_s, H_s, W_s)`` (resized to
    ``(H, W)`` first when the grids differ); ``align`` a 1x1 conv ``C_s -> C_t`` or ``None`` when
    ``C_s == C_t``. Returns ``(loss, aligned)``: a 0-dim tensor and ``(N, C_t, H, W)``, both fp32
    (fp64 for fp64 inputs) whatever the autocast state: fp16 log-softmax over a whole map loses
    the small probabilities, and the sum over ``N C H W`` terms needs fp32 accumulation.
    """
    if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                     align_corners=False)
    with torch.autocast(teacher_feat.device.type, enabled=False):
        student = upcast(student_feat)
        if align is not None:
            weight, bias = align.weight, align.bias
            if weight.dtype != student.dtype:  # an fp32 conv on fp64 inputs (or the reverse)
                weight, bias = weight.to(student.dtype), None if bias is None else bias.to(student.dtype)
            student = F.conv2d(student, weight, bias)  # (N, C_t, H, W)
        teacher = upcast(teacher_feat).to(student.dtype)
        N, C = teacher.shape[:2]
        logits_t = teacher.flatten(2) / tau  # (N, C, HW)
        logits_s = student.flatten(2) / tau
        log_p_t = F.log_softmax(logits_t, dim=-1)
        log_p_s = F.log_softmax(logits_s, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # sum over n, c, positions
        loss = kl * (tau * tau) / (N * C)
    return loss, student


@register("cwd", options=CWDOptions)
class CWD(LevelwiseMethod):
    """Channel-wise distillation over several tapped levels (FPN outputs or segmentation logits).

    ``CWD(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (options: :class:`CWDOptions` or its fields as keywords). The call
    ``CWD(teacher_feats, student_feats, batch=None)`` returns ``{"<level>.cwd": w * L}``, each a
    0-dim fp32 tensor (fp64 for fp64 inputs; fp16/bf16 inputs and autocast regions are computed in
    fp32); ``batch`` is not used. :meth:`statistics` gives per level the unweighted loss of the
    last call (``"<level>.cwd"``); :meth:`inspect` gives ``{level: {"aligned_student": (N, C_t, H, W),
    "teacher_distribution": ..., "student_distribution": ...}}`` (the per-channel spatial softmaxes).
    Input checks (level names, shapes, devices, NaN/inf) and their errors:
    :class:`~acamkd.methods.base.LevelwiseMethod`.
    """

    options: CWDOptions

    def build_level(self, teacher_channels: int, student_channels: int, options: CWDOptions) -> nn.Module:
        return CWDLevel(teacher_channels, student_channels)

    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        tau = self.options.tau
        loss, aligned = cwd_level_loss(level.align, teacher_feat, student_feat, tau)
        tensors: dict[str, Tensor] = {"aligned_student": aligned}
        if not torch.is_grad_enabled():  # inspect() (no grad): the distributions too; training skips them
            teacher = upcast(teacher_feat).to(aligned.dtype)
            tensors["teacher_distribution"] = F.softmax(teacher.flatten(2) / tau, dim=-1).view_as(aligned)
            tensors["student_distribution"] = F.softmax(aligned.flatten(2) / tau, dim=-1).view_as(aligned)
        return LevelResult(losses={"cwd": self.options.weight * loss}, stats={"cwd": loss.detach()},
                           tensors=tensors)
