"""ACAM-KD: Adaptive and Cooperative Attention Masking (Lan & Tian, ICCV 2025).

Per tapped level (spec ``../shared/spec/ACAM-KD.md``, sections 1-3):

1. align the student to the teacher's channels (``f_align``, 1x1 conv),
2. STCA-FF: teacher query, aligned-student key/value cross-attention -> fused ``(B, C, H, W)``,
3. ASCM: ``M`` channel masks ``(B, M, C)`` and ``M`` spatial masks ``(B, M, H, W)`` from it,
4. mask-weighted feature losses ``alpha * (L^c + L^s)`` and the Dice diversity
   ``lam * L_div``.

Everything here is training-only: after distillation only the student is kept.
The fast path lives in :mod:`acamkd.ops`; plain and materialised references that tests and
benchmarks compare against live in :mod:`acamkd.methods.acam_reference`.
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import (
    LevelResult,
    LevelwiseMethod,
    level_key,
    MethodOptions,
    check_choice,
    check_feature_pair,
    check_finite,
    check_int,
    check_weight,
)
from acamkd.methods.registry import register
from acamkd.ops.attention import cross_attention_tokens
from acamkd.ops.masking import (
    CHANNEL_MASK_FORMS,
    MASK_NORMS,
    channel_masks,
    masked_mse,
    mean_pairwise_dice,
    spatial_masks,
)

__all__ = ["ACAM", "ACAMLevel", "ACAMLevelOutput", "ACAMOptions", "QUERY_SIDES", "MASK_FAMILIES"]

QuerySide = Literal["teacher", "student"]
ChannelMaskForm = Literal["paper", "elementwise", "article"]
MaskNorm = Literal["mass", "energy"]
MaskFamily = Literal["both", "spatial", "channel"]
AttentionLayout = Literal["split", "single"]

QUERY_SIDES = typing.get_args(QuerySide)
ATTENTION_LAYOUTS = {"split": True, "single": False}  # -> split_value_heads
MASK_FAMILIES = typing.get_args(MaskFamily)
assert typing.get_args(ChannelMaskForm) == CHANNEL_MASK_FORMS and typing.get_args(MaskNorm) == MASK_NORMS
assert typing.get_args(AttentionLayout) == tuple(ATTENTION_LAYOUTS)


@dataclass(kw_only=True)
class ACAMOptions(MethodOptions):
    """ACAM-KD's options (``method.options`` in a config); the paper's settings are the defaults
    (M = 6 for COCO, 19 for Cityscapes; alpha = lambda = 1). Meanings: :class:`ACAMLevel`.

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    num_masks: int = 6  # M: spatial and channel masks per family (>= 1)
    alpha: float = 1.0  # weight of the masked feature losses L^c + L^s (>= 0)
    lam: float = 1.0  # lambda: weight of the Dice diversity loss (>= 0)
    query: QuerySide = "teacher"  # STCA-FF: which side asks (Table 9 ablation: student)
    channel_mask: ChannelMaskForm = "paper"  # channel-mask form: sigmoid(a_m v) | elementwise | article
    mask_norm: MaskNorm = "mass"  # masked-loss normaliser: sum w (paper) | sum w^2 (scale-invariant)
    masks: MaskFamily = "both"  # mask families built: both | spatial | channel (ablations)
    init_std: float = 0.01  # std of the mask units' N(0, std) init: masks start near 0.5 (>= 0)
    attention_layout: AttentionLayout = "split"  # speed only, never values: q/k/v layout for the fused kernels

    def validate(self) -> None:
        super().validate()
        check_int("num_masks", self.num_masks, 1)
        for name in ("alpha", "lam", "init_std"):
            check_weight(name, getattr(self, name))
        check_choice("query", self.query, QUERY_SIDES)
        check_choice("channel_mask", self.channel_mask, CHANNEL_MASK_FORMS)
        check_choice("mask_norm", self.mask_norm, MASK_NORMS)
        check_choice("masks", self.masks, MASK_FAMILIES)
        check_choice("attention_layout", self.attention_layout, tuple(ATTENTION_LAYOUTS))

    def level_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`ACAMLevel` (every option but ``check_finite``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "check_finite"}


@dataclass
class ACAMLevelOutput:
    """What one level computes. ``losses`` holds weighted scalars: ``channel`` and
    ``spatial`` (each ``alpha * L``; only the families switched on) and ``diversity``
    (``lam * L_div``). ``stats`` holds detached scalars for the training log."""

    losses: dict[str, Tensor]
    channel_masks: Tensor | None  # (B, M, C)
    spatial_masks: Tensor | None  # (B, M, H, W)
    fused: Tensor  # (B, C, H, W)
    aligned_student: Tensor  # (B, C, H, W)
    stats: dict[str, Tensor] = field(default_factory=dict)


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (tests run the math in fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ACAMLevel(nn.Module):
    """ACAM-KD on one tapped level: ``level(teacher_feat, student_feat) -> ACAMLevelOutput``.

    ``teacher_feat`` is ``(B, C_t, H, W)``, ``student_feat`` ``(B, C_s, H_s, W_s)``. When the
    grids differ the student feature is resized to the teacher's grid (bilinear,
    ``align_corners=False``) *before* the alignment conv, so losses and masks live on the
    teacher's grid.

    Switches (spec section 6): ``query`` ("teacher": teacher asks, student answers; "student"
    swaps the roles), ``channel_mask`` ("paper" ``sigmoid(a[m] v)``, "elementwise"
    ``sigmoid(A[m,k] v[k])``, "article" ``sigmoid(<v,U_m>) sigmoid(U_m)``), ``mask_norm``
    ("mass": loss divided by ``sum w``, as in the paper; "energy": by ``sum w^2``), ``masks``
    ("both", or only "spatial" / "channel": the other family is not built at all).
    ``attention_layout`` changes speed only, never values: how q/k/v are laid out for the fused
    attention kernels ("split" v into heads sharing q/k, the default, or one "single" head); see
    :func:`acamkd.ops.attention.cross_attention_tokens`.

    Numerics: the alignment, the feature difference, the masks and every loss are computed in
    fp32 even under autocast; only the attention (projections + SDPA) runs in the autocast
    dtype, which is what lets the fused bf16 kernels run.
    """

    def __init__(
        self,
        teacher_channels: int,
        student_channels: int,
        num_masks: int = 6,
        alpha: float = 1.0,
        lam: float = 1.0,
        query: QuerySide = "teacher",
        channel_mask: ChannelMaskForm = "paper",
        mask_norm: MaskNorm = "mass",
        masks: MaskFamily = "both",
        init_std: float = 0.01,
        attention_layout: AttentionLayout = "split",
    ) -> None:
        super().__init__()
        self.teacher_channels = check_int("teacher_channels", teacher_channels, 2)
        self.student_channels = check_int("student_channels", student_channels, 1)
        self.num_masks = check_int("num_masks", num_masks, 1)
        self.alpha = check_weight("alpha", alpha)
        self.lam = check_weight("lam", lam)
        self.query = check_choice("query", query, QUERY_SIDES)
        self.channel_mask = check_choice("channel_mask", channel_mask, CHANNEL_MASK_FORMS)
        self.mask_norm = check_choice("mask_norm", mask_norm, MASK_NORMS)
        self.masks = check_choice("masks", masks, MASK_FAMILIES)
        init_std = check_weight("init_std", init_std)
        self.attention_layout = check_choice("attention_layout", attention_layout, tuple(ATTENTION_LAYOUTS))

        channels, qk_channels = self.teacher_channels, self.teacher_channels // 2
        self.align = nn.Conv2d(self.student_channels, channels, 1)  # f_align: C_s -> C_t
        self.query_proj = nn.Conv2d(channels, qk_channels, 1)  # W_q: C -> C/2
        # W_k: C -> C/2 without bias: a key bias adds q_i . b_k to every logit of row i, which
        # the softmax over j removes, so it would be a parameter with an identically zero grad.
        self.key_proj = nn.Conv2d(channels, qk_channels, 1, bias=False)
        self.value_proj = nn.Conv2d(channels, channels, 1)  # W_v: C -> C
        # Mask units start small (N(0, init_std), as MasKD's mask tokens): masks start near 0.5.
        if self.masks in ("both", "channel"):
            shape = (self.num_masks,) if self.channel_mask == "paper" else (self.num_masks, channels)
            self.channel_units = nn.Parameter(torch.randn(shape) * init_std)
        else:
            self.register_parameter("channel_units", None)
        if self.masks in ("both", "spatial"):
            self.spatial_units = nn.Parameter(torch.randn(self.num_masks, channels) * init_std)
        else:
            self.register_parameter("spatial_units", None)

    def extra_repr(self) -> str:
        return (f"teacher_channels={self.teacher_channels}, student_channels={self.student_channels}, "
                f"num_masks={self.num_masks}, alpha={self.alpha}, lam={self.lam}, query={self.query!r}, "
                f"channel_mask={self.channel_mask!r}, mask_norm={self.mask_norm!r}, masks={self.masks!r}, "
                f"attention_layout={self.attention_layout!r}")

    @staticmethod
    def _linear(conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
        return conv.weight.flatten(1), conv.bias  # (C_out, C_in), (C_out,)

    def forward(self, teacher_feat: Tensor, student_feat: Tensor, check_inputs: bool = True) -> ACAMLevelOutput:
        if check_inputs:
            check_feature_pair(teacher_feat, student_feat, self.teacher_channels, self.student_channels)
            check_finite({"teacher_feat": teacher_feat, "student_feat": student_feat})
        B, C, H, W = teacher_feat.shape
        N = H * W
        if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            student_feat = F.interpolate(student_feat, size=(H, W), mode="bilinear", align_corners=False)
        device_type = teacher_feat.device.type

        with torch.autocast(device_type, enabled=False):
            teacher_tokens = _upcast(teacher_feat).flatten(2).transpose(1, 2)  # (B, N, C) view
            student_tokens = _upcast(student_feat).flatten(2).transpose(1, 2)  # (B, N, C_s) view
            aligned = F.linear(student_tokens, *self._linear(self.align))  # (B, N, C) fp32
            diff_sq = (teacher_tokens - aligned).square()  # (B, N, C) fp32

        # STCA-FF under the caller's autocast (bf16 fused kernels on GPU).
        query_src, context_src = (teacher_tokens, aligned) if self.query == "teacher" else (aligned, teacher_tokens)
        fused = cross_attention_tokens(query_src, context_src, *self._linear(self.query_proj),
                                       *self._linear(self.key_proj), *self._linear(self.value_proj),
                                       split_value_heads=ATTENTION_LAYOUTS[self.attention_layout])  # (B, N, C)

        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        channel_m = spatial_m = None
        with torch.autocast(device_type, enabled=False):
            fused32 = _upcast(fused)
            diversity = fused32.new_zeros(())
            if self.channel_units is not None:
                channel_m = channel_masks(fused32.mean(1), self.channel_units, self.channel_mask)  # (B, M, C)
                losses["channel"] = self.alpha * masked_mse(diff_sq.sum(1), channel_m, N, self.mask_norm)
                channel_dice = mean_pairwise_dice(channel_m)
                diversity = diversity + channel_dice
                stats["channel_mask_mean"] = channel_m.detach().mean()
                stats["channel_dice"] = channel_dice.detach()
            if self.spatial_units is not None:
                spatial_m = spatial_masks(fused32, self.spatial_units)  # (B, M, N)
                losses["spatial"] = self.alpha * masked_mse(diff_sq.sum(2), spatial_m, C, self.mask_norm)
                spatial_dice = mean_pairwise_dice(spatial_m)
                diversity = diversity + spatial_dice
                stats["spatial_mask_mean"] = spatial_m.detach().mean()
                stats["spatial_dice"] = spatial_dice.detach()
            losses["diversity"] = self.lam * diversity

        return ACAMLevelOutput(
            losses=losses,
            channel_masks=channel_m,
            spatial_masks=None if spatial_m is None else spatial_m.unflatten(2, (H, W)),
            fused=fused.transpose(1, 2).unflatten(2, (H, W)),
            aligned_student=aligned.transpose(1, 2).unflatten(2, (H, W)),
            stats=stats,
        )


@register("acam", options=ACAMOptions)
class ACAM(LevelwiseMethod):
    """ACAM-KD over several tapped levels: one independent :class:`ACAMLevel` per level.

    ``ACAM(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (``student_channels`` defaults to the teacher's; options: :class:`ACAMOptions` or its fields
    as keywords). The call ``ACAM(teacher_feats, student_feats, batch=None)`` returns a dict of
    weighted scalar losses keyed ``"<level>.<kind>"`` (kind: ``channel``, ``spatial``,
    ``diversity``); the engine sums them; ``batch`` is not used. :meth:`statistics` gives, from
    the last call and without another pass, per level the mean spatial and channel masks and
    their mean pairwise Dice (the spec's "known risk", mask collapse, must show in every
    training log). :meth:`inspect` returns ``{level: ACAMLevelOutput}`` (masks, fused features)
    for pictures. Input checks, loss keys and statistics: :class:`~acamkd.methods.base.LevelwiseMethod`.

    ``check_finite=True`` checks all inputs for NaN/inf with one host sync per call.
    """

    options: ACAMOptions

    def build_level(self, teacher_channels: int, student_channels: int, options: ACAMOptions) -> ACAMLevel:
        return ACAMLevel(teacher_channels, student_channels, **options.level_kwargs())

    def forward_level(self, level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        out = level(teacher_feat, student_feat, check_inputs=False)  # the base checked them
        return LevelResult(out.losses, out.stats, out)

    def level(self, name: str) -> ACAMLevel:
        return self.levels[level_key(name)]

    def inspect(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, ACAMLevelOutput]:
        """Per-level masks, fused and aligned features (no grad), for pictures and analysis."""
        return super().inspect(teacher_feats, student_feats, batch)
