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

The paper's masks collapse (``../shared/spec/mask-collapse.md``). Paper mode stays the default
and is computed exactly as before; switches that cannot collapse (``mask_activation``,
``mask_grad``, ``mass_beta``/``mass_rho``, ``fusion_student_grad``) are documented on
:class:`ACAMLevel`, and :class:`ACAM` makes a collapse impossible to miss
(:meth:`ACAM.health_warnings`) and measurable (:meth:`ACAM.statistics` with ``diagnostics``).
"""
from __future__ import annotations

import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.base import (
    LevelResult,
    LevelwiseMethod,
    MethodOptions,
    OptionError,
    check_choice,
    check_feature_pair,
    check_finite,
    check_int,
    check_weight,
    level_key,
    upcast,
)
from acamkd.methods.registry import register
from acamkd.ops.attention import cross_attention_tokens
from acamkd.ops.normalise import FEATURE_NORMS, standardise
from acamkd.ops.masking import (
    CHANNEL_MASK_FORMS,
    EPS,
    MASK_ACTIVATIONS,
    MASK_NORMS,
    channel_masks,
    error_correlation,
    mask_masses,
    mass_floor,
    masked_mse,
    mean_pairwise_dice,
    participation_ratio,
    partition_gain,
    reverse_gradient,
    spatial_masks,
)

__all__ = ["ACAM", "ACAMLevel", "ACAMLevelOutput", "ACAMOptions", "PAPER_MODE", "DEFAULT_MODE", "QUERY_SIDES",
           "MASK_FAMILIES", "MASK_SOURCES",
           "MASK_GRADS", "ADVERSARIAL_MASS_BETA", "resolve_mass_beta", "level_stride", "box_cover"]

QuerySide = Literal["teacher", "student"]
ChannelMaskForm = Literal["paper", "elementwise", "article"]
MaskNorm = Literal["mass", "energy"]
MaskFamily = Literal["both", "spatial", "channel"]
MaskSource = Literal["cooperative", "teacher", "uniform"]
AttentionLayout = Literal["split", "single"]
MaskActivation = Literal["sigmoid", "partition"]
MaskGrad = Literal["descend", "adversarial", "detach"]
FeatureNorm = Literal["none", "standardise"]

QUERY_SIDES = typing.get_args(QuerySide)
ATTENTION_LAYOUTS = {"split": True, "single": False}  # -> split_value_heads
MASK_FAMILIES = typing.get_args(MaskFamily)
MASK_SOURCES = typing.get_args(MaskSource)
MASK_GRADS = typing.get_args(MaskGrad)
assert typing.get_args(ChannelMaskForm) == CHANNEL_MASK_FORMS and typing.get_args(MaskNorm) == MASK_NORMS
assert typing.get_args(AttentionLayout) == tuple(ATTENTION_LAYOUTS)
assert typing.get_args(MaskActivation) == MASK_ACTIVATIONS
assert typing.get_args(FeatureNorm) == FEATURE_NORMS

# The paper's values of the switches that ACAM-KD's options add (docs/methods.md, "Switches against
# mask collapse"): ACAMLevel's defaults, and what configs/*/*_acam_paper.yaml pin.
PAPER_MODE: dict[str, Any] = {"mask_norm": "mass", "mask_activation": "sigmoid", "mask_grad": "descend",
                              "mass_beta": None, "fusion_student_grad": True, "feature_norm": "none"}
# Where ACAMOptions (build("acam"), the configs, the demo) departs from the paper by default: chosen by
# the no-collapse study (docs/methods.md, "The default mode"; docs/results.md). The paper mode is
# ACAMOptions(**PAPER_MODE).
DEFAULT_MODE: dict[str, Any] = {"feature_norm": "standardise", "mask_grad": "adversarial", "fusion_student_grad": False}

# mass_beta when left unset (None): off (0) for "descend" and "detach", 10 for "adversarial" (the
# value the mask-collapse study ran with: rho 0.3, beta 10, masks ended at mean 0.43).
ADVERSARIAL_MASS_BETA = 10.0


def resolve_mass_beta(mass_beta: float | None, mask_grad: str) -> float:
    """The floor weight in force: ``mass_beta`` if given, else ``ADVERSARIAL_MASS_BETA`` under
    ``mask_grad="adversarial"`` and 0 (no floor, the paper) otherwise."""
    if mass_beta is None:
        return ADVERSARIAL_MASS_BETA if mask_grad == "adversarial" else 0.0
    return float(mass_beta)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(name, f"must be true or false, got {value!r}")
    return value


def _check_switches(mask_activation: Any, mask_grad: Any, mass_rho: Any, mass_beta: Any,
                    fusion_student_grad: Any, diagnostics: Any) -> float:
    """Check the anti-collapse switches (:class:`OptionError` naming the option); returns the
    floor weight in force (:func:`resolve_mass_beta`)."""
    check_choice("mask_activation", mask_activation, MASK_ACTIVATIONS)
    check_choice("mask_grad", mask_grad, MASK_GRADS)
    rho = check_weight("mass_rho", mass_rho)
    if rho > 1.0:
        raise OptionError("mass_rho", f"must be in [0, 1] (a mean mask value), got {mass_rho!r}")
    if mass_beta is not None:
        check_weight("mass_beta", mass_beta)
    _check_bool("fusion_student_grad", fusion_student_grad)
    _check_bool("diagnostics", diagnostics)
    beta = resolve_mass_beta(mass_beta, mask_grad)
    if mask_grad == "adversarial" and beta <= 0.0:
        raise OptionError("mass_beta", "must be > 0 with mask_grad='adversarial' (without the floor the "
                                       "Dice term switches masks off), or null for the default "
                                       f"{ADVERSARIAL_MASS_BETA}; got {mass_beta!r}")
    return beta


@dataclass(kw_only=True)
class ACAMOptions(MethodOptions):
    """ACAM-KD's options (``method.options`` in a config). The paper's settings (M = 6 for COCO, 19
    for Cityscapes; alpha = lambda = 1, teacher query, the paper's channel masks, mass
    normalisation) are the defaults, except three switches against mask collapse set by the
    no-collapse study (:data:`DEFAULT_MODE`): ``feature_norm="standardise"``,
    ``mask_grad="adversarial"`` (with the mass floor ``rho = 0.3``, ``beta = 10``) and
    ``fusion_student_grad=False``. ``ACAMOptions(**PAPER_MODE)`` is the paper exactly (ACAMLevel's
    own defaults). Meanings: :class:`ACAMLevel`; why: ``docs/methods.md``, "The default mode".

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    num_masks: int = 6  # M: spatial and channel masks per family (>= 1)
    alpha: float = 1.0  # weight of the masked feature losses L^c + L^s (>= 0)
    lam: float = 1.0  # lambda: weight of the Dice diversity loss (>= 0)
    query: QuerySide = "teacher"  # STCA-FF: which side asks (Table 9 ablation: student)
    channel_mask: ChannelMaskForm = "paper"  # channel-mask form: sigmoid(a_m v) | elementwise | article
    mask_norm: MaskNorm = "mass"  # masked-loss normaliser: sum w (paper) | sum w^2 (scale-invariant)
    masks: MaskFamily = "both"  # mask families built: both | spatial | channel (ablations)
    mask_source: MaskSource = "cooperative"  # masks from: STCA-FF (paper) | the teacher alone | none: all 1 (ablations)
    init_std: float = 0.01  # std of the mask units' N(0, std) init: masks start near 0.5 (>= 0)
    attention_layout: AttentionLayout = "split"  # speed only, never values: q/k/v layout for the fused kernels
    # Switches against mask collapse (ACAMLevel; docs/methods.md). Defaults: DEFAULT_MODE (the study), PAPER_MODE the paper.
    mask_activation: MaskActivation = "sigmoid"  # sigmoid (paper) | partition: softmax across the M masks per unit
    mask_grad: MaskGrad = "adversarial"  # masks in the masked loss: descend (paper) | adversarial (default) | detach
    mass_rho: float = 0.3  # mass floor level: beta * sum_m relu(rho - mean w_m)^2 (in [0, 1])
    mass_beta: float | None = None  # mass floor weight; None: 0 (paper, detach) / 10 (adversarial)
    fusion_student_grad: bool = False  # True (paper): the student's gradient also flows through STCA-FF
    diagnostics: bool = True  # extra ACAM.statistics(): masses, participation, error correlation, boxes
    feature_norm: FeatureNorm = "standardise"  # none (paper) | standardise (default): per image and channel (PKD)

    def validate(self) -> None:
        super().validate()
        check_int("num_masks", self.num_masks, 1)
        for name in ("alpha", "lam", "init_std"):
            check_weight(name, getattr(self, name))
        check_choice("query", self.query, QUERY_SIDES)
        check_choice("channel_mask", self.channel_mask, CHANNEL_MASK_FORMS)
        check_choice("mask_norm", self.mask_norm, MASK_NORMS)
        check_choice("masks", self.masks, MASK_FAMILIES)
        check_choice("mask_source", self.mask_source, MASK_SOURCES)
        check_choice("attention_layout", self.attention_layout, tuple(ATTENTION_LAYOUTS))
        _check_switches(self.mask_activation, self.mask_grad, self.mass_rho, self.mass_beta,
                        self.fusion_student_grad, self.diagnostics)
        check_choice("feature_norm", self.feature_norm, FEATURE_NORMS)

    def level_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`ACAMLevel` (every option but ``check_finite``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "check_finite"}


@dataclass
class ACAMLevelOutput:
    """What one level computes. ``losses`` holds weighted scalars: ``channel`` and
    ``spatial`` (each ``alpha * gain * L``, gain 1 but under ``partition``; only the families
    switched on), ``diversity`` (``lam * L_div``) and, when the floor is on, ``mass_floor``
    (``beta * floor``). ``stats`` holds detached scalars for the training log.
    ``channel_error`` / ``spatial_error`` (detached, only with ``diagnostics``) are the student's
    squared error per channel ``sum_p d[k,p]^2`` and per position ``sum_k d[k,p]^2``."""

    losses: dict[str, Tensor]
    channel_masks: Tensor | None  # (B, M, C)
    spatial_masks: Tensor | None  # (B, M, H, W)
    fused: Tensor  # (B, C, H, W)
    aligned_student: Tensor  # (B, C, H, W); standardised under feature_norm="standardise"
    stats: dict[str, Tensor] = field(default_factory=dict)
    channel_error: Tensor | None = None  # (B, C), detached; diagnostics only
    spatial_error: Tensor | None = None  # (B, H, W), detached; diagnostics only


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

    Switches against mask collapse (defaults: the paper; ``docs/methods.md``). Per family,
    ``e[b,k]`` is the student's squared error per unit (``k`` a channel or a position), ``R`` the
    size of the other axis, ``L(w) = mean_{b,m} sum_k w^2 e / (R N(w))`` the masked loss with
    ``N(w) = sum_k w`` ("mass") or ``sum_k w^2`` ("energy"):

    * ``mask_activation``: "sigmoid" (paper) | "partition": ``w[b,m,k] = softmax_m(logit[b,m,k])``
      at every unit (spatial: every position; channel: every channel), so ``sum_m w[b,m,k] = 1``:
      no unit can lose its weight, whatever the parameters. The masked losses are multiplied by
      :func:`~acamkd.ops.masking.partition_gain` (``M/2`` under "mass", 1 under "energy") so the
      starting loss is the paper's (sigmoid masks start at ~1/2, partition masks at 1/M).
    * ``mask_grad``: how the masks enter the masked loss.
      "descend" (paper): one loss, every parameter descends it.
      "detach": the loss is ``alpha gain L(sg(w))`` (``sg``: stop-gradient): the masks are
      constants there; the mask units and STCA-FF are trained by the Dice term and the floor only.
      "adversarial": the student side descends ``alpha gain L(sg(w))`` (the same value as
      "descend"); the mask side ascends ``A = alpha mean_{b,m} sum_k w^2 ê / sum_k w^2`` with
      ``ê[b,k] = sg(e[b,k] / mean_k e[b,k])`` (the energy-normalised masked loss on the error
      normalised per image: scale-free in the mask *and* in the features, so its balance with
      the Dice term and the floor, both scale-free, does not depend on the level's feature
      scale; per image its gradient is the energy loss's times ``R / mean_k e``), through a
      gradient reversal on ``w`` (a zero-valued term ``A - sg(A)`` with ``A`` computed on
      ``reverse_gradient(w)``) while descending the Dice term and the floor. Ascending a
      scale-free loss cannot shrink the masks (its value does not depend on their scale); it
      moves mask weight to where the student's error is largest; the floor keeps the ascent
      (which concentrates masks) and the Dice term from switching masks off. The reversed
      gradient reaches everything upstream of the masks: the *mask branch*
      (:meth:`mask_branch_parameters`: the mask units and STCA-FF's ``query_proj`` /
      ``key_proj`` / ``value_proj``, whose output is used for nothing but the masks' logits)
      and, when ``fusion_student_grad`` is True, the aligned student through the keys/values
      (the student then plays on the mask side inside STCA-FF; its direct path through ``d``
      still descends). ``fusion_student_grad=False`` gives a clean two-player split.
    * ``mass_rho``, ``mass_beta``: the mass floor ``beta * mean_b sum_m relu(rho - mean_k w)^2``
      summed over the families, returned as loss ``mass_floor`` when ``beta > 0``. ``mass_beta``
      None means 0 (paper, detach) or ``ADVERSARIAL_MASS_BETA`` = 10 (adversarial, which
      refuses 0). Under "partition" the family mean is ``1/M``: choose ``rho < 1/M`` there.
    * ``fusion_student_grad``: True (paper): the aligned student's gradient flows through
      STCA-FF's keys/values (queries under ``query="student"``); False: it enters STCA-FF
      detached, so the student is trained only through ``d``.
    * ``diagnostics``: also return the detached per-unit errors for :meth:`ACAM.statistics`.
    * ``mask_source`` (the ablation rows of the paper's Table 10 and ours): "cooperative" (the
      paper: the masks read STCA-FF's fused feature); "teacher" (the teacher-only adaptive mask:
      the masks read the teacher feature alone, ``fused = F_T``, no STCA-FF is built, learned
      online under the same ``mask_grad``); "uniform" (every mask is 1, no mask units and no
      STCA-FF: each family's masked loss is then the plain aligned MSE ``mean (F_T - F_S')^2`` under
      any ``mask_norm``, so ``masks="channel"`` equals ``mimic`` with ``weight=alpha`` and the same
      ``feature_norm``; no Dice term (reported 0) and no floor; ``mask_activation`` and
      ``mask_grad`` have nothing to act on).
    * ``feature_norm``: "none" (paper) | "standardise": the teacher feature and the aligned
      student are standardised per image and channel over the positions
      (:func:`acamkd.ops.normalise.standardise`, PKD's normalisation) right after the alignment;
      everything after (STCA-FF, the masks, the losses, ``aligned_student``) sees the
      standardised pair, so the per-unit errors are ``2 (1 - r)`` per element whatever the
      teacher's feature scale.

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
        mask_source: MaskSource = "cooperative",
        init_std: float = 0.01,
        attention_layout: AttentionLayout = "split",
        mask_activation: MaskActivation = "sigmoid",
        mask_grad: MaskGrad = "descend",
        mass_rho: float = 0.3,
        mass_beta: float | None = None,
        fusion_student_grad: bool = True,
        diagnostics: bool = True,
        feature_norm: FeatureNorm = "none",
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
        self.mask_source = check_choice("mask_source", mask_source, MASK_SOURCES)
        init_std = check_weight("init_std", init_std)
        self.attention_layout = check_choice("attention_layout", attention_layout, tuple(ATTENTION_LAYOUTS))
        self.mass_beta = _check_switches(mask_activation, mask_grad, mass_rho, mass_beta, fusion_student_grad,
                                         diagnostics)  # the weight in force (None resolved)
        self.mask_activation, self.mask_grad = mask_activation, mask_grad
        self.mass_rho = float(mass_rho)
        self.fusion_student_grad, self.diagnostics = fusion_student_grad, diagnostics
        self.feature_norm = check_choice("feature_norm", feature_norm, FEATURE_NORMS)
        # Loss gain: 1.0 except under partition (M/2 with mass, 1 with energy); uniform masks are 1.
        self.loss_gain = (partition_gain(self.num_masks, self.mask_norm)
                          if mask_activation == "partition" and self.mask_source != "uniform" else 1.0)

        channels, qk_channels = self.teacher_channels, self.teacher_channels // 2
        self.align = nn.Conv2d(self.student_channels, channels, 1)  # f_align: C_s -> C_t
        if self.mask_source == "cooperative":  # STCA-FF exists only to make the masks' input
            self.query_proj = nn.Conv2d(channels, qk_channels, 1)  # W_q: C -> C/2
            # W_k: C -> C/2 without bias: a key bias adds q_i . b_k to every logit of row i, which
            # the softmax over j removes, so it would be a parameter with an identically zero grad.
            self.key_proj = nn.Conv2d(channels, qk_channels, 1, bias=False)
            self.value_proj = nn.Conv2d(channels, channels, 1)  # W_v: C -> C
        else:
            for name in ("query_proj", "key_proj", "value_proj"):
                self.register_module(name, None)
        # Mask units start small (N(0, init_std), as MasKD's mask tokens): masks start near 0.5.
        learned = self.mask_source != "uniform"
        if self.masks in ("both", "channel") and learned:
            shape = (self.num_masks,) if self.channel_mask == "paper" else (self.num_masks, channels)
            self.channel_units = nn.Parameter(torch.randn(shape) * init_std)
        else:
            self.register_parameter("channel_units", None)
        if self.masks in ("both", "spatial") and learned:
            self.spatial_units = nn.Parameter(torch.randn(self.num_masks, channels) * init_std)
        else:
            self.register_parameter("spatial_units", None)

    def extra_repr(self) -> str:
        return (f"teacher_channels={self.teacher_channels}, student_channels={self.student_channels}, "
                f"num_masks={self.num_masks}, alpha={self.alpha}, lam={self.lam}, query={self.query!r}, "
                f"channel_mask={self.channel_mask!r}, mask_norm={self.mask_norm!r}, masks={self.masks!r}, "
                f"mask_source={self.mask_source!r}, "
                f"attention_layout={self.attention_layout!r}, mask_activation={self.mask_activation!r}, "
                f"mask_grad={self.mask_grad!r}, mass_rho={self.mass_rho}, mass_beta={self.mass_beta}, "
                f"fusion_student_grad={self.fusion_student_grad}, feature_norm={self.feature_norm!r}")

    def mask_branch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the mask branch: everything but the alignment conv.

        The mask units and STCA-FF's three projections exist only to produce the masks' logits
        (the fused feature feeds nothing else); ``align`` produces the student side's ``d`` and
        is trained with the student. Under ``mask_grad="adversarial"`` these parameters ascend
        the (energy-normalised) masked loss and descend the Dice term and the floor.
        """
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("align.")]

    @staticmethod
    def _linear(conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
        return conv.weight.flatten(1), conv.bias  # (C_out, C_in), (C_out,)

    def _masked_loss(self, sq_err: Tensor, masks: Tensor, other_size: int) -> Tensor:
        """The weighted masked loss of one family under ``mask_grad`` (see the class docstring).

        sq_err ``(B, K)``, masks ``(B, M, K)``. The value is ``alpha * gain * L(w)`` in every mode;
        only the gradients differ.
        """
        scale = self.alpha * self.loss_gain  # == alpha exactly in paper mode (gain 1.0)
        if self.mask_grad == "descend" or self.mask_source == "uniform":  # (constant masks: all modes agree)
            return scale * masked_mse(sq_err, masks, other_size, self.mask_norm)
        student_side = scale * masked_mse(sq_err, masks.detach(), other_size, self.mask_norm)
        if self.mask_grad == "detach":
            return student_side
        # adversarial: the mask side ascends the energy-normalised loss on the error normalised
        # per image (scale-free in the mask and in the features); the term's value is 0.
        error = sq_err.detach()
        error = error / error.mean(-1, keepdim=True).clamp_min(EPS)  # e / mean_k e: mean 1 per image
        adversary = self.alpha * masked_mse(error, reverse_gradient(masks), 1, "energy")
        return student_side + (adversary - adversary.detach())

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
            teacher_tokens = upcast(teacher_feat).flatten(2).transpose(1, 2)  # (B, N, C) view
            student_tokens = upcast(student_feat).flatten(2).transpose(1, 2)  # (B, N, C_s) view
            aligned = F.linear(student_tokens, *self._linear(self.align))  # (B, N, C) fp32
            if self.feature_norm == "standardise":  # per image and channel, over the N positions
                teacher_tokens, aligned = standardise(teacher_tokens, 1), standardise(aligned, 1)
            diff_sq = (teacher_tokens - aligned).square()  # (B, N, C) fp32

        if self.mask_source == "cooperative":  # STCA-FF under the caller's autocast (bf16 fused kernels on GPU)
            fusion_student = aligned if self.fusion_student_grad else aligned.detach()
            query_src, context_src = ((teacher_tokens, fusion_student) if self.query == "teacher"
                                      else (fusion_student, teacher_tokens))
            fused = cross_attention_tokens(query_src, context_src, *self._linear(self.query_proj),
                                           *self._linear(self.key_proj), *self._linear(self.value_proj),
                                           split_value_heads=ATTENTION_LAYOUTS[self.attention_layout])  # (B, N, C)
        else:  # "teacher": the masks read the teacher feature alone; "uniform": no masks to read
            fused = teacher_tokens  # (B, N, C)

        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        channel_m = spatial_m = channel_err = spatial_err = None
        with torch.autocast(device_type, enabled=False):
            fused32 = upcast(fused)
            diversity = fused32.new_zeros(())
            floor = fused32.new_zeros(())
            uniform = self.mask_source == "uniform"
            if self.masks in ("both", "channel"):
                channel_m = (fused32.new_ones(B, self.num_masks, C) if uniform else  # (B, M, C)
                             channel_masks(fused32.mean(1), self.channel_units, self.channel_mask,
                                           self.mask_activation))
                channel_err = diff_sq.sum(1)  # (B, C)
                losses["channel"] = self._masked_loss(channel_err, channel_m, N)
                channel_dice = mean_pairwise_dice(channel_m)
                if not uniform:  # constant masks: nothing to diversify or to keep from collapsing
                    diversity = diversity + channel_dice
                    if self.mass_beta > 0:
                        floor = floor + mass_floor(channel_m, self.mass_rho)
                stats["channel_mask_mean"] = channel_m.detach().mean()
                stats["channel_dice"] = channel_dice.detach()
            if self.masks in ("both", "spatial"):
                spatial_m = (fused32.new_ones(B, self.num_masks, N) if uniform else  # (B, M, N)
                             spatial_masks(fused32, self.spatial_units, self.mask_activation))
                spatial_err = diff_sq.sum(2)  # (B, N)
                losses["spatial"] = self._masked_loss(spatial_err, spatial_m, C)
                spatial_dice = mean_pairwise_dice(spatial_m)
                if not uniform:
                    diversity = diversity + spatial_dice
                    if self.mass_beta > 0:
                        floor = floor + mass_floor(spatial_m, self.mass_rho)
                stats["spatial_mask_mean"] = spatial_m.detach().mean()
                stats["spatial_dice"] = spatial_dice.detach()
            losses["diversity"] = self.lam * diversity
            if self.mass_beta > 0 and not uniform:
                losses["mass_floor"] = self.mass_beta * floor

        keep_errors = self.diagnostics
        return ACAMLevelOutput(
            losses=losses,
            channel_masks=channel_m,
            spatial_masks=None if spatial_m is None else spatial_m.unflatten(2, (H, W)),
            fused=fused.transpose(1, 2).unflatten(2, (H, W)),
            aligned_student=aligned.transpose(1, 2).unflatten(2, (H, W)),
            stats=stats,
            channel_error=channel_err.detach() if keep_errors and channel_err is not None else None,
            spatial_error=(spatial_err.detach().unflatten(1, (H, W))
                           if keep_errors and spatial_err is not None else None),
        )


def level_stride(input_size: tuple[int, int], grid: tuple[int, int]) -> float:
    """A level's stride from the input size and its feature grid: the power of two nearest to
    ``sqrt((H_in / H) * (W_in / W))`` (exact for strided convs, whose grid is ``ceil(H_in / s)``:
    P7 at 800x1344 has 7x11 cells, ratios 114 and 122, stride 128)."""
    ratio = math.sqrt(input_size[0] / grid[0] * input_size[1] / grid[1])
    return float(2.0 ** round(math.log2(ratio)))


def box_cover(boxes_in_cells: list[Tensor], grid: tuple[int, int], device: torch.device,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, H, W)`` 0/1: cell ``(i, j)`` is covered when it overlaps a box (boxes ``(N_b, 4)``
    xyxy in cell units; cell ``j`` spans ``[j, j + 1)``): columns ``floor(x1) .. ceil(x2) - 1``, rows
    likewise, i.e. the cells a box truly overlaps. (FGD's foreground rule, :func:`acamkd.methods.fgd.fgd_masks`,
    includes ``ceil(x2)`` too, one cell more; this is only the diagnostics' box-mass share.)
    One ``(H, N_b) @ (N_b, W)`` matmul per image, no host sync."""
    H, W = grid
    rows = torch.arange(H, device=device, dtype=dtype)
    cols = torch.arange(W, device=device, dtype=dtype)
    covers = []
    for boxes in boxes_in_cells:
        boxes = boxes.to(device=device, dtype=dtype)
        in_x = ((cols[None] < boxes[:, 2:3]) & (cols[None] + 1 > boxes[:, 0:1])).to(dtype)  # (N_b, W)
        in_y = ((rows[None] < boxes[:, 3:4]) & (rows[None] + 1 > boxes[:, 1:2])).to(dtype)  # (N_b, H)
        covers.append((in_y.t() @ in_x > 0).to(dtype))
    return torch.stack(covers)


class _GradProbe(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient to ``record``. The gradient reaching
    the probe's output is the gradient of the method's losses alone: the task loss uses the tap
    output (the probe's input), never the probe's output."""

    @staticmethod
    def forward(ctx, x: Tensor, record) -> Tensor:  # noqa: D102
        ctx.record = record
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        ctx.record(grad)
        return grad, None


class _LevelHealth:
    """Per-level running state for :meth:`ACAM.health_warnings`, as device tensors (no host sync
    until the warnings are asked for)."""

    def __init__(self) -> None:
        self.low_mask: dict[str, Tensor] = {}  # family -> consecutive forwards with mean < threshold
        self.mask_mean: dict[str, Tensor] = {}  # family -> the last mean
        self.grad_starts: list[Tensor] = []  # the first grad norms (baseline window)
        self.grad_baseline: Tensor | None = None  # median of grad_starts once full
        self.grad_low: Tensor | None = None  # consecutive backwards with norm < fraction * baseline
        self.grad_norm: Tensor | None = None  # the last completed backward's norm
        self.backwards = 0

    def observe_masks(self, family: str, mean: Tensor, threshold: float) -> None:
        mean = mean.detach().float()
        count = self.low_mask.get(family)
        if count is None or count.device != mean.device:
            count = torch.zeros((), dtype=torch.float32, device=mean.device)
        self.low_mask[family] = (count + 1) * (mean < threshold)
        self.mask_mean[family] = mean

    def observe_grad(self, grad: Tensor, window: int, fraction: float) -> None:
        norm = torch.linalg.vector_norm(upcast(grad.detach()))  # fp32 (fp64 stays fp64)
        self.grad_norm = norm
        self.backwards += 1
        if self.grad_baseline is None:
            self.grad_starts.append(norm)
            if len(self.grad_starts) >= window:
                self.grad_baseline = torch.stack(self.grad_starts).median()
                self.grad_low = torch.zeros((), dtype=torch.float32, device=norm.device)
            return
        self.grad_low = (self.grad_low.to(norm.device) + 1) * (norm < fraction * self.grad_baseline.to(norm.device))


@dataclass
class _DiagnosticInputs:
    """What the last forward leaves for :meth:`ACAM.statistics` (detached)."""

    channel_masks: Tensor | None  # (B, M, C)
    spatial_masks: Tensor | None  # (B, M, H, W)
    channel_error: Tensor | None  # (B, C)
    spatial_error: Tensor | None  # (B, H, W)
    boxes: list[Tensor] | None  # per image (N_b, 4) xyxy in cells of this level, or None


@register("acam", options=ACAMOptions)
class ACAM(LevelwiseMethod):
    """ACAM-KD over several tapped levels: one independent :class:`ACAMLevel` per level.

    ``ACAM(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (``student_channels`` defaults to the teacher's; options: :class:`ACAMOptions` or its fields
    as keywords). The call ``ACAM(teacher_feats, student_feats, batch=None)`` returns a dict of
    weighted scalar losses keyed ``"<level>.<kind>"`` (kind: ``channel``, ``spatial``,
    ``diversity``, and ``mass_floor`` when the floor is on); the engine sums them; ``batch``
    (a :class:`~acamkd.methods.batch.DistillBatch`) is read only by the box diagnostics.
    :meth:`statistics` gives, from the last call and without another pass, per level the mean
    spatial and channel masks and their mean pairwise Dice (the spec's "known risk", mask
    collapse, must show in every training log), the norm of the distillation gradient at the
    student feature after a backward, and with ``diagnostics=True`` more (see :meth:`statistics`).
    :meth:`health_warnings` names levels whose masks or distillation gradient have died.
    :meth:`inspect` returns ``{level: ACAMLevelOutput}`` (masks, fused features) for pictures.
    Input checks, loss keys and statistics: :class:`~acamkd.methods.base.LevelwiseMethod`.

    ``check_finite=True`` checks all inputs for NaN/inf with one host sync per call.

    Under ``torch.compile`` the gradient probe and the bookkeeping run eagerly
    (``torch.compiler.disable``): a graph break at the start and one at the end of the call.
    """

    options: ACAMOptions

    # Health thresholds (class attributes; an instance may override them).
    collapse_threshold: ClassVar[float] = 1e-2  # a family's mean mask below this counts as collapsed
    collapse_patience: ClassVar[int] = 20  # ... for this many consecutive training forwards
    grad_baseline_window: ClassVar[int] = 5  # baseline: median norm of the first 5 backwards
    grad_fade_fraction: ClassVar[float] = 1e-3  # faded: norm < 1e-3 x baseline
    grad_fade_patience: ClassVar[int] = 20  # ... for this many consecutive backwards

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._health = {name: _LevelHealth() for name in self.level_names}
        self._diagnostic_inputs: dict[str, _DiagnosticInputs] = {}
        self._input_size: tuple[int, int] | None = None
        self._reported: set[tuple[str, str]] = set()

    def build_level(self, teacher_channels: int, student_channels: int, options: ACAMOptions) -> ACAMLevel:
        return ACAMLevel(teacher_channels, student_channels, **options.level_kwargs())

    def forward_level(self, level: ACAMLevel, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        out = level(teacher_feat, student_feat, check_inputs=False)  # the base checked them
        return LevelResult(out.losses, out.stats, out)

    def forward(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, Tensor]:
        """Weighted scalar losses keyed ``"<level>.<kind>"``; remembers the statistics, the
        inputs of the diagnostics and the health state (training forwards only)."""
        if torch.is_grad_enabled():
            student_feats = self._attach_probes(student_feats)
        results = self._run(teacher_feats, student_feats, batch)
        losses = {f"{name}.{kind}": value for name, res in results.items() for kind, value in res.losses.items()}
        self._last_stats = {f"{name}.{key}": value for name, res in results.items() for key, value in res.stats.items()}
        self._observe(results, batch)
        return losses

    def level(self, name: str) -> ACAMLevel:
        return self.levels[level_key(name)]

    def inspect(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, ACAMLevelOutput]:
        """Per-level masks, fused and aligned features (no grad), for pictures and analysis."""
        return super().inspect(teacher_feats, student_feats, batch)

    # ------------------------------------------------------------------ health (item: warnings)
    @torch.compiler.disable
    def _attach_probes(self, student_feats: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Each level's student feature through a :class:`_GradProbe` that records the norm of
        the gradient the method's losses send to it (only features that require grad)."""
        if not isinstance(student_feats, Mapping):
            return student_feats  # the base raises the error
        probed = dict(student_feats)
        for name in self.level_names:
            feat = probed.get(name)
            if isinstance(feat, Tensor) and feat.requires_grad:
                health = self._health[name]
                record = functools.partial(health.observe_grad, window=self.grad_baseline_window,
                                           fraction=self.grad_fade_fraction)
                probed[name] = _GradProbe.apply(feat, record)
        return probed

    @torch.compiler.disable
    def _observe(self, results: dict[str, LevelResult], batch: Any) -> None:
        """After a forward: update the mask-collapse counters (training forwards) and keep what
        the diagnostics need (detached references, no computation)."""
        if torch.is_grad_enabled():
            for name, res in results.items():
                for family in ("spatial", "channel"):
                    mean = res.stats.get(f"{family}_mask_mean")
                    if mean is not None:
                        self._health[name].observe_masks(family, mean, self.collapse_threshold)
        if not self.options.diagnostics:
            return
        inputs = {}
        for name, res in results.items():
            out: ACAMLevelOutput = res.tensors
            boxes = None
            if out.spatial_masks is not None and getattr(batch, "boxes", None) is not None:
                stride = level_stride(batch.input_size, tuple(out.spatial_masks.shape[-2:]))
                boxes = batch.boxes_at_stride(stride)
            inputs[name] = _DiagnosticInputs(
                channel_masks=None if out.channel_masks is None else out.channel_masks.detach(),
                spatial_masks=None if out.spatial_masks is None else out.spatial_masks.detach(),
                channel_error=out.channel_error, spatial_error=out.spatial_error, boxes=boxes)
        self._diagnostic_inputs = inputs

    def health_warnings(self) -> list[str]:
        """Messages naming each level whose masks or distillation gradient have died; one host sync.

        A level warns when a mask family's mean has stayed below ``collapse_threshold`` (1e-2)
        for ``collapse_patience`` (20) consecutive training forwards, or when the norm of the
        distillation gradient at its student feature has stayed below ``grad_fade_fraction``
        (1e-3) times its start (median of the first ``grad_baseline_window`` = 5 backwards) for
        ``grad_fade_patience`` (20) consecutive backwards. Each warning is returned once, and
        again only after its condition was seen to clear at an earlier call. The engine calls
        this at logging time and logs each message with ``logger.warning``.
        """
        checks: list[tuple[str, str, list[Tensor]]] = []  # (level, kind, [count, value, baseline])
        for name in self.level_names:
            health = self._health[name]
            for family, count in health.low_mask.items():
                checks.append((name, family, [count, health.mask_mean[family]]))
            if health.grad_low is not None:
                checks.append((name, "grad", [health.grad_low, health.grad_norm, health.grad_baseline]))
        if not checks:
            return []
        flat = [t.detach().to(torch.float64).to(checks[0][2][0].device) for _, _, ts in checks for t in ts]
        values = torch.stack(flat).tolist()  # one host sync
        messages, i = [], 0
        for name, kind, tensors in checks:
            got, i = values[i:i + len(tensors)], i + len(tensors)
            patience = self.grad_fade_patience if kind == "grad" else self.collapse_patience
            key = (name, kind)
            if got[0] < patience:
                self._reported.discard(key)
                continue
            if key in self._reported:
                continue
            self._reported.add(key)
            if kind == "grad":
                messages.append(
                    f"ACAM-KD level {name!r}: the distillation gradient at the student feature has faded to "
                    f"{got[1]:.3g}, below {self.grad_fade_fraction:g} x its start ({got[2]:.3g}, median of the first "
                    f"{self.grad_baseline_window} backwards) for the last {int(got[0])} backwards: distillation "
                    f"has stopped teaching this level (mask collapse? see docs/methods.md, 'Switches against "
                    f"mask collapse')")
            else:
                messages.append(
                    f"ACAM-KD level {name!r}: {kind} masks collapsed: mean {got[1]:.3g} < {self.collapse_threshold:g} "
                    f"for the last {int(got[0])} training calls; the masked losses fade with them "
                    f"(paper mode's known failure; mask_activation='partition' or mask_grad='adversarial' "
                    f"cannot collapse, see docs/methods.md)")
        return messages

    # ------------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, float]:
        """``"<level>.<stat>"`` -> float from the last forward, with one host sync.

        Always: ``{spatial,channel}_mask_mean``, ``{spatial,channel}_dice`` (families built), and
        ``distill_grad_norm`` (``|dL_distill / dF_S|`` over the level's student feature, from the
        last *completed* backward; absent before the first). With ``diagnostics=True``, per family
        ``f``: ``f_mask_min_mass`` / ``f_mask_max_mass`` (min / max over masks of
        ``mean_{b,k} w[b,m,k]``), ``f_participation`` (``mean_b (sum_m mass)^2 / (M sum_m mass^2)``
        with ``mass[b,m] = mean_k w[b,m,k]``; 1 = equal masses, 1/M = one mask holds all),
        ``f_error_corr`` (``mean_{b,m}`` Pearson correlation over units of the mask with the
        student's squared error per unit); and, for a batch with boxes, ``spatial_box_mass_share``
        (mean over masks of the share of the mask's mass in cells covered by a ground-truth box),
        ``spatial_box_mass_share_max`` (the max over masks) and ``box_area_share`` (the share of
        covered cells; a mask that ignores the boxes has mass share = area share). The stride of a
        level is :func:`level_stride` of ``batch.input_size`` and the grid. Computed here, from
        the last forward's detached masks and errors, under no_grad: a few elementwise passes
        over ``(B, M, K)`` per family, only when called (logging time).
        """
        entries: dict[str, Tensor] = dict(self._last_stats)
        if self.options.diagnostics and self._diagnostic_inputs:
            with torch.no_grad():
                entries.update(self._diagnostics())
        for name in self.level_names:
            norm = self._health[name].grad_norm
            if norm is not None:
                entries[f"{name}.distill_grad_norm"] = norm
        if not entries:
            return {}
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in entries.values()))
        device = next(iter(entries.values())).device
        values = torch.stack([v.detach().to(device=device, dtype=dtype) for v in entries.values()]).tolist()
        return dict(zip(entries, values))  # one host sync above

    def _diagnostics(self) -> dict[str, Tensor]:
        stats: dict[str, Tensor] = {}
        for name, d in self._diagnostic_inputs.items():
            families = (("channel", d.channel_masks, d.channel_error),
                        ("spatial", None if d.spatial_masks is None else d.spatial_masks.flatten(2),
                         None if d.spatial_error is None else d.spatial_error.flatten(1)))
            for family, masks, error in families:
                if masks is None:
                    continue
                masses = mask_masses(masks)  # (B, M)
                batch_masses = masses.mean(0)  # (M,)
                stats[f"{name}.{family}_mask_min_mass"] = batch_masses.min()
                stats[f"{name}.{family}_mask_max_mass"] = batch_masses.max()
                stats[f"{name}.{family}_participation"] = participation_ratio(masses)
                if error is not None:
                    stats[f"{name}.{family}_error_corr"] = error_correlation(masks, error)
            if d.boxes is not None and d.spatial_masks is not None:
                masks = d.spatial_masks.flatten(2)  # (B, M, N)
                cover = box_cover(d.boxes, tuple(d.spatial_masks.shape[-2:]), masks.device, masks.dtype).flatten(1)
                inside = (masks * cover[:, None]).sum((0, 2))  # (M,)
                share = inside / masks.sum((0, 2)).clamp_min(EPS)
                stats[f"{name}.spatial_box_mass_share"] = share.mean()
                stats[f"{name}.spatial_box_mass_share_max"] = share.max()
                stats[f"{name}.box_area_share"] = cover.mean()
        return stats
