"""FGD: focal and global distillation (Yang et al., CVPR 2022, "Focal and Global Knowledge
Distillation for Detectors"), following the authors' code: ``yzd-v/FGD`` @ c03a6cf,
``mmdet/distillation/losses/fgd.py`` (``FeatureLoss``; unchanged since f1da292) and its configs
``configs/distillers/fgd/*.py``; MMRazor's port (``open-mmlab/mmrazor`` @ a1c9426,
``mmrazor/models/losses/fgd_loss.py``, ``FGDLoss``) computes the same.

Per tapped level, with ``F_T`` the teacher feature ``(N, C, H, W)`` and ``F_S' = f(F_S)`` the
student's (``f`` a 1x1 conv ``C_s -> C_t`` with bias only when the channel counts differ, else the
identity, as the authors)::

    A_s(F) = H W  softmax_hw(mean_c |F| / T)          (N, H, W)   spatial attention
    A_c(F) = C    softmax_c(mean_hw |F| / T)          (N, C)      channel attention
    L_fg   = sum M_fg A_s(F_T) A_c(F_T) (F_S' - F_T)^2 / N        (the teacher's attention on both sides)
    L_bg   = sum M_bg A_s(F_T) A_c(F_T) (F_S' - F_T)^2 / N
    L_att  = (sum |A_c(F_S') - A_c(F_T)| + sum |A_s(F_S') - A_s(F_T)|) / N
    L_glob = sum ((F_S' + GC_s(F_S')) - (F_T + GC_t(F_T)))^2 / N
    L      = alpha L_fg + beta L_bg + gamma L_att + lambda L_glob

Masks (:func:`fgd_masks`): each box is mapped to the level's grid, ``x1, y1`` floored, ``x2, y2``
ceiled, and the cells ``hmin..hmax`` x ``wmin..wmax`` (inclusive) get ``1 / ((hmax - hmin + 1)
(wmax - wmin + 1))``, the element-wise max where boxes overlap (the smallest box wins);
``M_bg = 1 / N_bg`` on the ``N_bg`` cells no box covers (all 0 when every cell is covered).
The authors map a box as ``x / img_w * W`` (``img_w`` the image's resized, unpadded width from
``img_metas['img_shape']``, ``W`` the padded feature width): ``box_frame="image_shape"`` (the
default) does exactly that with :attr:`DistillBatch.image_sizes`; ``box_frame="stride"`` maps
``x / s`` (:meth:`DistillBatch.boxes_at_stride`, the geometrically exact frame; the two agree
when an image fills the padded input).

``GC`` is a global-context block (GCNet): ``w = softmax_hw(conv_{C->1}(F))``, context
``c = sum_p w_p F[:, :, p]`` ``(N, C)``, ``GC(F) = conv_{C/2->C}(ReLU(LayerNorm(conv_{C->C/2}(c))))``
broadcast over the grid; separate student and teacher blocks, both trained with the student;
``conv_{C->1}`` Kaiming-normal (fan_in, ReLU gain) with zero bias, the last conv all zeros
(the authors' ``reset_parameters``).

Where we differ from the authors (``docs/methods.md``, "FGD"): the four terms are four loss keys
(their sum is the authors' single loss); everything is computed in fp32 (fp64 for fp64 inputs)
whatever the autocast state; the student is resized to the teacher's grid when the grids differ
(the authors assert equal grids); a box corner left of / above the grid clamps to cell 0 (the
authors' negative slice start would count from the far end; their boxes are clipped to the image,
so it never happens there).
Everything here is training-only: after distillation only the student is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acamkd.methods.acam import level_stride
from acamkd.methods.base import (
    LevelResult,
    LevelwiseMethod,
    MethodOptions,
    OptionError,
    check_choice,
    check_weight,
    upcast,
)
from acamkd.methods.batch import DistillBatch
from acamkd.methods.registry import register

__all__ = ["BOX_FRAMES", "FGD", "FGDLevel", "FGDOptions", "PUBLISHED_CONSTANTS", "fgd_attention", "fgd_masks"]

BOX_FRAMES = ("image_shape", "stride")

#: ``(temp, alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd)`` of the authors' configs, yzd-v/FGD @ c03a6cf,
#: ``configs/distillers/fgd/``: RetinaNet (``fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py``,
#: ``fgd_retina_rx101_64x4d_distill_retina_r50/r101_...``), Faster R-CNN and Mask R-CNN
#: (``fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py``, ``fgd_cascade_mask_rcnn_*``,
#: ``fgd_mask_rcnn_r101_*``), FCOS (``fgd_fcos_r101_distill_fcos_r50_2x_coco.py``: temp 0.8), RepPoints
#: (``fgd_reppoints_*``), GFL (``fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco.py``).
PUBLISHED_CONSTANTS: dict[str, dict[str, float]] = {
    "retinanet": {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4, "lambda_fgd": 5e-6},
    "fasterrcnn": {"temp": 0.5, "alpha_fgd": 5e-5, "beta_fgd": 2.5e-5, "gamma_fgd": 5e-5, "lambda_fgd": 5e-7},
    "fcos": {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
    "reppoints": {"temp": 0.5, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4, "lambda_fgd": 8e-6},
    "gfl": {"temp": 0.5, "alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4, "lambda_fgd": 5e-6},
}


@dataclass(kw_only=True)
class FGDOptions(MethodOptions):
    """Options of ``fgd`` (``method.options`` in a config; plus ``check_finite``). The names are
    the authors' config keys; the defaults are their RetinaNet configs' values (other detectors:
    :data:`PUBLISHED_CONSTANTS`, e.g. ``method.options={temp: 0.8, alpha_fgd: 0.0016, ...}`` for FCOS).

    Raises (construction): :class:`~acamkd.methods.base.OptionError` naming the option.
    """

    temp: float = 0.5  # T (> 0): attention temperature (all configs 0.5, FCOS 0.8)
    alpha_fgd: float = 1e-3  # alpha: foreground focal loss (RetinaNet configs)
    beta_fgd: float = 5e-4  # beta: background focal loss
    gamma_fgd: float = 5e-4  # gamma: attention loss (the loss file's default 1e-3 is not used by any RetinaNet config)
    lambda_fgd: float = 5e-6  # lambda: global loss
    box_frame: Literal["image_shape", "stride"] = "image_shape"  # the authors' x / img_w * W, or x / stride

    def validate(self) -> None:
        super().validate()
        check_weight("temp", self.temp)
        if self.temp <= 0:
            raise OptionError("temp", f"must be > 0 (a softmax temperature), got {self.temp!r}")
        for name in ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"):
            check_weight(name, getattr(self, name))
        check_choice("box_frame", self.box_frame, BOX_FRAMES)


def _weights(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of ``module`` in the compute dtype (a differentiable cast: the gradient
    reaches the fp32 parameters when the math runs in fp64, and the reverse)."""
    w, b = module.weight, module.bias
    return (w if w.dtype == dtype else w.to(dtype)), (b if b.dtype == dtype else b.to(dtype))


class _ContextBlock(nn.Module):
    """The global-context block of one side (GCNet's, as the authors' ``conv_mask_*`` and
    ``channel_add_conv_*``): ``(N, C, H, W) -> (N, C)``, the value added at every position."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.add_in = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.LayerNorm([hidden, 1, 1])
        self.add_out = nn.Conv2d(hidden, channels, 1)
        # the authors' reset_parameters: mmcv kaiming_init(mode="fan_in") = Kaiming normal with the
        # ReLU gain and a zero bias; last_zero_init = constant 0 weight and bias.
        nn.init.kaiming_normal_(self.conv_mask.weight, a=0, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.add_out.weight)
        nn.init.zeros_(self.add_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(N, C, H, W)`` in fp32/fp64; the parameters are cast to its dtype."""
        dt = x.dtype
        N, C = x.shape[:2]
        logits = F.conv2d(x, *_weights(self.conv_mask, dt))  # (N, 1, H, W)
        weights = F.softmax(logits.flatten(2), dim=-1)  # (N, 1, HW)
        context = (x.flatten(2) * weights).sum(-1)  # (N, C)
        h = F.conv2d(context[:, :, None, None], *_weights(self.add_in, dt))  # (N, C/2, 1, 1)
        h = F.layer_norm(h, self.norm.normalized_shape, *_weights(self.norm, dt), eps=self.norm.eps)
        return F.conv2d(F.relu(h), *_weights(self.add_out, dt)).view(N, C)


class FGDLevel(nn.Module):
    """One level's trainable parts: ``align`` (1x1 conv ``C_s -> C_t`` with bias when the channel
    counts differ, else ``None``), ``global_student`` and ``global_teacher`` (the two context blocks
    on ``C_t`` channels).

    Raises:
        ValueError: ``teacher_channels < 2`` (the context block's hidden width is ``C_t // 2``).
    """

    def __init__(self, teacher_channels: int, student_channels: int) -> None:
        super().__init__()
        if teacher_channels < 2:
            raise ValueError(f"teacher_channels must be >= 2 for FGD's global context block (hidden width "
                             f"C // 2), got {teacher_channels}")
        self.align = (nn.Conv2d(student_channels, teacher_channels, 1)
                      if student_channels != teacher_channels else None)
        self.global_student = _ContextBlock(teacher_channels)
        self.global_teacher = _ContextBlock(teacher_channels)


def fgd_attention(feat: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """FGD's attention of ``feat`` ``(N, C, H, W)``: spatial ``H W softmax_hw(mean_c |F| / temp)``
    ``(N, H, W)`` and channel ``C softmax_c(mean_hw |F| / temp)`` ``(N, C)`` (each averages 1)."""
    N, C, H, W = feat.shape
    value = feat.abs()
    spatial = (H * W) * F.softmax(value.mean(1).flatten(1) / temp, dim=1).view(N, H, W)
    channel = C * F.softmax(value.mean((2, 3)) / temp, dim=1)
    return spatial, channel


def fgd_masks(boxes: list[Tensor], grid: tuple[int, int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """FGD's foreground (scale) and background masks, ``(N, H, W)`` each, from boxes already in
    cell units (``(n_i, 4)`` xyxy per image, floats: ``x`` in columns, ``y`` in rows).

    Box ``j`` covers cells ``floor(y1)..ceil(y2)`` x ``floor(x1)..ceil(x2)`` (inclusive, cut to the
    grid; a negative start clamps to 0) with ``1 / ((ceil(y2) - floor(y1) + 1)(ceil(x2) - floor(x1) + 1))``
    (uncut extents, as the authors); overlapping boxes keep the max. ``M_bg = 1 / N_bg`` on the
    ``N_bg`` uncovered cells, 0 elsewhere (all 0 if none). One ``(n_i, H, W)`` product per image;
    images without boxes give ``M_fg = 0``, ``M_bg = 1 / (H W)``.
    """
    H, W = grid
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    fgs = []
    for b in boxes:
        b = b.to(device)
        if b.shape[0] == 0:
            fgs.append(torch.zeros(H, W, dtype=dtype, device=device))
            continue
        wmin, hmin = torch.floor(b[:, 0]).long(), torch.floor(b[:, 1]).long()
        wmax, hmax = torch.ceil(b[:, 2]).long(), torch.ceil(b[:, 3]).long()
        area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin)).to(torch.float64)  # (n,)
        in_y = (rows[None] >= hmin[:, None].clamp(min=0)) & (rows[None] <= hmax[:, None])  # (n, H)
        in_x = (cols[None] >= wmin[:, None].clamp(min=0)) & (cols[None] <= wmax[:, None])  # (n, W)
        inside = in_y[:, :, None] & in_x[:, None, :]  # (n, H, W)
        scale = torch.where(inside, area[:, None, None], torch.zeros((), dtype=torch.float64, device=device))
        fgs.append(scale.amax(0).to(dtype))
    fg = torch.stack(fgs)  # (N, H, W)
    bg = (fg == 0).to(dtype)
    count = bg.sum((1, 2), keepdim=True)
    bg = torch.where(count > 0, bg / count.clamp(min=1), bg)
    return fg, bg


@register("fgd", options=FGDOptions, tasks=("detection",))
class FGD(LevelwiseMethod):
    """Focal and global distillation over several tapped FPN levels (detection only: the masks come
    from the ground-truth boxes).

    ``FGD(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **options)``
    (options: :class:`FGDOptions` or its fields as keywords). The call
    ``FGD(teacher_feats, student_feats, batch)`` needs ``batch``, a
    :class:`~acamkd.methods.batch.DistillBatch` with ``boxes`` (in input pixels) and ``image_sizes``;
    it returns ``{"<level>.fg": alpha L_fg, "<level>.bg": beta L_bg, "<level>.attention": gamma L_att,
    "<level>.global": lambda L_glob}``, each a 0-dim fp32 tensor (fp64 for fp64 inputs; fp16/bf16
    inputs and autocast regions are computed in fp32). :meth:`statistics` gives the unweighted
    terms; :meth:`inspect` gives per level the masks (``mask_fg``, ``mask_bg`` ``(N, H, W)``), the
    teacher's and student's attentions and the aligned student.

    Raises (call): ValueError naming the level when ``batch`` is ``None`` or carries no boxes (a
    segmentation batch: FGD applies to detection only) or when its image count differs from the
    features' batch; TypeError when ``batch`` is not a ``DistillBatch``; the input checks of
    :class:`~acamkd.methods.base.LevelwiseMethod`.
    """

    options: FGDOptions

    def build_level(self, teacher_channels: int, student_channels: int, options: FGDOptions) -> nn.Module:
        return FGDLevel(teacher_channels, student_channels)

    def _level_boxes(self, batch: Any, grid: tuple[int, int], n: int, name: str) -> list[Tensor]:
        """Each image's boxes in cell units of this level's grid (the option ``box_frame``)."""
        if batch is None:
            raise ValueError(f"FGD level {name!r}: needs the ground-truth boxes, got batch=None; call "
                             f"method(teacher_feats, student_feats, batch=DistillBatch(...)) (detection only)")
        if not isinstance(batch, DistillBatch):
            raise TypeError(f"FGD level {name!r}: batch must be a DistillBatch, got {type(batch).__name__}")
        if batch.boxes is None:
            raise ValueError(f"FGD level {name!r}: the batch carries no boxes (a segmentation batch?); FGD's "
                             f"masks come from ground-truth boxes, so it applies to detection only")
        if batch.batch_size != n:
            raise ValueError(f"FGD level {name!r}: the batch has {batch.batch_size} images, the features {n}")
        H, W = grid
        if self.options.box_frame == "stride":
            return batch.boxes_at_stride(level_stride(batch.input_size, grid))
        mapped = []
        for b, (h, w) in zip(batch.boxes, batch.image_sizes):  # the authors' x / img_w * W, y / img_h * H
            b = b if b.is_floating_point() else b.float()
            mapped.append(torch.stack([b[:, 0] / w * W, b[:, 1] / h * H, b[:, 2] / w * W, b[:, 3] / h * H], dim=1))
        return mapped

    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        N, _, H, W = teacher_feat.shape
        boxes = self._level_boxes(batch, (H, W), N, name)
        if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                         align_corners=False)
        opts = self.options
        with torch.autocast(teacher_feat.device.type, enabled=False):
            student = upcast(student_feat)
            if level.align is not None:
                student = F.conv2d(student, *_weights(level.align, student.dtype))  # (N, C_t, H, W)
            teacher = upcast(teacher_feat).to(student.dtype)
            dt = student.dtype
            mask_fg, mask_bg = fgd_masks(boxes, (H, W), dt, teacher.device)
            spatial_t, channel_t = fgd_attention(teacher, opts.temp)
            spatial_s, channel_s = fgd_attention(student, opts.temp)
            # focal: the teacher's attentions weight both sides (the authors multiply each feature by
            # their square roots, then take the summed MSE: the same product)
            weighted = (student - teacher).square() * spatial_t[:, None] * channel_t[:, :, None, None]
            loss_fg = (weighted * mask_fg[:, None]).sum() / N
            loss_bg = (weighted * mask_bg[:, None]).sum() / N
            loss_att = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / N
            out_s = student + level.global_student(student)[:, :, None, None]
            out_t = teacher + level.global_teacher(teacher)[:, :, None, None]
            loss_glob = (out_s - out_t).square().sum() / N
        losses = {"fg": opts.alpha_fgd * loss_fg, "bg": opts.beta_fgd * loss_bg,
                  "attention": opts.gamma_fgd * loss_att, "global": opts.lambda_fgd * loss_glob}
        stats = {"fg": loss_fg.detach(), "bg": loss_bg.detach(), "attention": loss_att.detach(),
                 "global": loss_glob.detach()}
        tensors = {"mask_fg": mask_fg, "mask_bg": mask_bg, "spatial_attention_teacher": spatial_t,
                   "channel_attention_teacher": channel_t, "spatial_attention_student": spatial_s,
                   "channel_attention_student": channel_s, "aligned_student": student}
        return LevelResult(losses=losses, stats=stats, tensors=tensors)

