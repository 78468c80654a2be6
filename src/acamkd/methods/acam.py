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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import DistillMethod, check_level_names
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

__all__ = ["ACAM", "ACAMLevel", "ACAMLevelOutput", "QUERY_SIDES", "MASK_FAMILIES"]

QUERY_SIDES = ("teacher", "student")
ATTENTION_LAYOUTS = {"split": True, "single": False}  # -> split_value_heads
MASK_FAMILIES = ("both", "spatial", "channel")


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


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_feature_pair(teacher_feat: Any, student_feat: Any, teacher_channels: int, student_channels: int,
                       where: str = "") -> None:
    """Shape, dtype and batch checks for one level's inputs; errors name the argument."""
    prefix = f"{where}: " if where else ""
    for name, feat, channels in (("teacher_feat", teacher_feat, teacher_channels),
                                 ("student_feat", student_feat, student_channels)):
        if not isinstance(feat, Tensor):
            raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(feat).__name__}")
        if feat.dim() != 4:
            raise ValueError(f"{prefix}{name} must be 4-D (B, C, H, W), got shape {tuple(feat.shape)}")
        if not feat.is_floating_point():
            raise TypeError(f"{prefix}{name} must be a floating-point tensor, got {feat.dtype}")
        if feat.shape[1] != channels:
            raise ValueError(f"{prefix}{name} has {feat.shape[1]} channels, the level was built for {channels}")
        if feat.shape[2] < 1 or feat.shape[3] < 1:
            raise ValueError(f"{prefix}{name} has an empty grid {tuple(feat.shape[2:])}")
    if teacher_feat.shape[0] != student_feat.shape[0]:
        raise ValueError(f"{prefix}batch mismatch: teacher_feat has batch {teacher_feat.shape[0]}, "
                         f"student_feat has batch {student_feat.shape[0]}")
    if teacher_feat.shape[0] < 1:
        raise ValueError(f"{prefix}teacher_feat has an empty batch")
    if teacher_feat.device != student_feat.device:
        raise ValueError(f"{prefix}teacher_feat is on {teacher_feat.device}, student_feat on {student_feat.device}")


def check_finite(named: Mapping[str, Tensor]) -> None:
    """One host sync for all tensors; on failure name each tensor holding NaN/inf."""
    if not named:
        return
    # max and min propagate NaN and carry +-inf: both finite <=> every element finite. Two
    # plain reductions, cheaper than isfinite's elementwise temporaries.
    flags = torch.stack([torch.isfinite(torch.stack([t.amax(), t.amin()]).float()).all() for t in named.values()])
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(named, flags.tolist()) if not ok]
    raise ValueError(f"non-finite values (NaN or inf) in {bad}")


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
        query: str = "teacher",
        channel_mask: str = "paper",
        mask_norm: str = "mass",
        masks: str = "both",
        init_std: float = 0.01,
        attention_layout: str = "split",
    ) -> None:
        super().__init__()
        self.teacher_channels = _positive_int("teacher_channels", teacher_channels, 2)
        self.student_channels = _positive_int("student_channels", student_channels, 1)
        self.num_masks = _positive_int("num_masks", num_masks, 1)
        self.alpha = _weight("alpha", alpha)
        self.lam = _weight("lam", lam)
        self.query = _choice("query", query, QUERY_SIDES)
        self.channel_mask = _choice("channel_mask", channel_mask, CHANNEL_MASK_FORMS)
        self.mask_norm = _choice("mask_norm", mask_norm, MASK_NORMS)
        self.masks = _choice("masks", masks, MASK_FAMILIES)
        init_std = _weight("init_std", init_std)
        self.attention_layout = _choice("attention_layout", attention_layout, tuple(ATTENTION_LAYOUTS))

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


def _module_key(name: str) -> str:
    return name.replace(".", "__")


@register("acam")
class ACAM(DistillMethod):
    """ACAM-KD over several tapped levels: one independent :class:`ACAMLevel` per level.

    ``ACAM(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, **level_options)``
    (``student_channels`` defaults to the teacher's). The call
    ``ACAM(teacher_feats, student_feats, batch=None)`` returns a dict of weighted scalar
    losses keyed ``"<level>.<kind>"`` (kind: ``channel``, ``spatial``, ``diversity``); the
    engine sums them. :meth:`statistics` gives, from the last call and without another pass,
    per level the mean spatial and channel masks and their mean pairwise Dice (the spec's
    "known risk", mask collapse, must show in every training log). :meth:`inspect` returns
    the per-level tensors (masks, fused features) for pictures.

    ``check_finite=True`` checks all inputs for NaN/inf with one host sync per call.
    """

    def __init__(
        self,
        teacher_channels: Mapping[str, int],
        student_channels: Mapping[str, int] | None = None,
        check_finite: bool = True,
        **level_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(teacher_channels, Mapping) or not teacher_channels:
            raise ValueError(f"teacher_channels must be a non-empty dict of level name -> channels, "
                             f"got {teacher_channels!r}")
        student_channels = dict(teacher_channels) if student_channels is None else dict(student_channels)
        if sorted(student_channels) != sorted(teacher_channels):
            raise ValueError(f"student_channels levels {sorted(student_channels)} differ from "
                             f"teacher_channels levels {sorted(teacher_channels)}")
        non_strings = [name for name in teacher_channels if not isinstance(name, str)]
        if non_strings:
            raise TypeError(f"teacher_channels: level names must be strings (the loss keys are "
                            f"'<level>.<kind>'), got {non_strings!r}")
        self.level_names = list(teacher_channels)
        keys = [_module_key(n) for n in self.level_names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"level names {self.level_names} collide once '.' is replaced by '__'")
        self.check_finite = bool(check_finite)
        levels = {}
        for name, key in zip(self.level_names, keys):
            try:
                levels[key] = ACAMLevel(teacher_channels[name], student_channels[name], **level_options)
            except (TypeError, ValueError) as err:
                raise type(err)(f"ACAM level {name!r}: {err}") from None
        self.levels = nn.ModuleDict(levels)
        self._last_stats: dict[str, Tensor] = {}

    def level(self, name: str) -> ACAMLevel:
        return self.levels[_module_key(name)]

    def _run(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor]) -> dict[str, ACAMLevelOutput]:
        check_level_names(self.level_names, teacher_feats, student_feats, "ACAM")
        for name in self.level_names:
            level = self.level(name)
            check_feature_pair(teacher_feats[name], student_feats[name], level.teacher_channels,
                               level.student_channels, where=f"level {name!r}")
        if self.check_finite:
            named = {f"teacher_feats[{n!r}]": teacher_feats[n] for n in self.level_names}
            named.update({f"student_feats[{n!r}]": student_feats[n] for n in self.level_names})
            check_finite(named)
        return {name: self.level(name)(teacher_feats[name], student_feats[name], check_inputs=False)
                for name in self.level_names}

    def forward(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, Tensor]:
        outputs = self._run(teacher_feats, student_feats)
        losses = {f"{name}.{kind}": value for name, out in outputs.items() for kind, value in out.losses.items()}
        self._last_stats = {f"{name}.{key}": value for name, out in outputs.items() for key, value in out.stats.items()}
        return losses

    def statistics(self) -> dict[str, float]:
        if not self._last_stats:
            return {}
        values = torch.stack(list(self._last_stats.values())).tolist()  # one host sync
        return dict(zip(self._last_stats, values))

    @torch.no_grad()
    def inspect(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor]) -> dict[str, ACAMLevelOutput]:
        """Per-level masks, fused and aligned features (no grad), for pictures and analysis."""
        return self._run(teacher_feats, student_feats)
