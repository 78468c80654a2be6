"""RepPoints (Yang et al., ICCV 2019, "RepPoints: Point Set Representation for Object Detection"),
pure PyTorch + torchvision: no compiled extension of ours, the deformable convolutions are
``torchvision.ops.deform_conv2d``.

The model is mmdetection 2.x's "RepPoints moment, GN in neck and head" detector, the one behind the
paper's RepPoints rows (student 38.6, R101 teacher 40.5, X101-DCN teacher 44.2 box mAP). Read,
not copied, from ``open-mmlab/mmdetection`` (2.x):

* ``mmdet/models/dense_heads/reppoints_head.py`` @ 00e97308fa85d98e9049a312cee5f9a451a3f44b: head
  layout, ``points2bbox`` (moment / minmax / partial_minmax), ``moment_mul`` 0.01, ``gradient_mul``
  0.1, ``center_init``, targets, losses (normalised by ``point_base_scale * stride``), inference;
* ``mmdet/core/bbox/assigners/point_assigner.py`` @ 269973370273faa3252d35e262c196496539b3e4 and
  ``mmdet/core/bbox/assigners/max_iou_assigner.py`` @ 001968ec0cff295081329d5ba441998b0b81519d;
* ``configs/reppoints/reppoints_moment_r50_fpn_1x_coco.py`` @ 1c1db394daaa79a4baba520730c6184e02141c71
  (FPN start_level 1, ``add_extra_convs='on_input'``, 5 outputs; focal gamma 2 alpha 0.25 weight 1;
  SmoothL1 beta 0.11, weights 0.5 init / 1.0 refine; PointAssigner scale 4 pos_num 1; MaxIoUAssigner
  0.5 / 0.4 / min_pos_iou 0; test nms_pre 1000, score_thr 0.05, NMS IoU 0.5, max_per_img 100),
  ``..._gn-neck+head_1x_coco.py`` @ 0f269b81c810f828aefc38f37eb311898ccc9eea (GN, 32 groups, in neck
  and head) and ``reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco.py`` @
  465473e4290bf541e793be739991868f1ff1d258 (ResNeXt-101 32x4d, DCN in stages c3-c5, 1 deform group).

Where it differs from mmdetection (``docs/methods.md``): the backbone's BatchNorm is torchvision's
``FrozenBatchNorm2d`` when pretrained (mmdet trains the affine parameters under ``norm_eval``);
backbone weights are torchvision's ResNet layout; the deformable convs are torchvision's.

Shape conventions: ``B`` images, ``N`` grid locations of all levels of one padded batch, ``P = 9``
points, ``K`` foreground classes (the registry's ``num_classes`` is ``K + 1``: label 0 is background
and never predicted; the classifier has ``K`` sigmoid outputs). Points are ``(x, y)`` pixels of the
padded input unless a name says otherwise; the head's raw outputs are ``(dy, dx)`` pairs in units of
the level's stride (mmdet's y-first layout, which ``deform_conv2d``'s offsets share).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.ops import batched_nms, box_iou, deform_conv2d, sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d

from acamkd.models.detection import (
    DETECTOR_BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIZE_DIVISIBLE,
    DetectionTransform,
    set_detector_eval_limits,
)
from acamkd.models.registry import ModelSpec, register_model
from acamkd.models.weights import load_state_dict_file, load_weights_strict

__all__ = [
    "LEVELS",
    "REPPOINTS_BACKBONES",
    "TRANSFORM_METHODS",
    "DeformableConv3x3",
    "RepPoints",
    "RepPointsFPN",
    "RepPointsHead",
    "build_reppoints",
    "max_iou_assign",
    "point_assign",
    "points_to_boxes",
]

LEVELS = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}  # default taps: name -> stride (as RetinaNet)
TRANSFORM_METHODS = ("moment", "minmax", "partial_minmax")
GN_GROUPS = 32  # GroupNorm groups in neck and head (mmdet norm_cfg=dict(type='GN', num_groups=32))


def _resnext101_32x4d(*, weights: Any = None,
                      norm_layer: Callable[..., nn.Module] | None = None) -> torchvision.models.ResNet:
    """ResNeXt-101 32x4d (groups 32, width 4 per group; mmdet's ``open-mmlab://resnext101_32x4d`` layout in
    torchvision's module names). torchvision ships no builder for it; ``weights`` must be None."""
    if weights is not None:
        raise ValueError("resnext101_32x4d: pass ImageNet weights as a local file (pretrained=...), not weights=")
    return torchvision.models.ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, norm_layer=norm_layer)


# name -> (torchvision-style factory(weights=None, norm_layer=...), DCN in layer1..layer4)
_NO_DCN = (False, False, False, False)
_C3_C5 = (False, True, True, True)  # mmdet stage_with_dcn of the X101-DCN teacher
REPPOINTS_BACKBONES: dict[str, tuple[Callable[..., torchvision.models.ResNet], tuple[bool, ...]]] = {
    **{name: (factory, _NO_DCN) for name, factory in DETECTOR_BACKBONES.items()},
    "resnext101_32x4d": (_resnext101_32x4d, _NO_DCN),
    "resnext101_32x4d_dcn": (_resnext101_32x4d, _C3_C5),  # the paper's 44.2 teacher
}


# ------------------------------------------------------------------------------ points -> boxes
def points_to_boxes(points: Tensor, method: str = "moment", moment_transfer: Tensor | None = None,
                    moment_mul: float = 0.01) -> Tensor:
    """Boxes ``(..., 4)`` (x1, y1, x2, y2) of point sets ``(..., P, 2)`` (x, y), as mmdet's ``points2bbox``.

    ``moment``: centre = mean of the points; half width / height = *unbiased* std of x / y times
    ``exp(moment_transfer)`` (a learnable ``(2,)`` (w, h) pair, zeros if None); only ``moment_mul`` of
    the gradient reaches ``moment_transfer`` (mmdet's ``moment_mul``, 0.01). ``minmax``: the points'
    extent; ``partial_minmax``: the extent of the first 4 points. Raises ``ValueError`` for an
    unknown ``method`` or a last dimension other than 2.
    """
    if points.shape[-1] != 2:
        raise ValueError(f"points_to_boxes: points must be (..., P, 2) (x, y), got {tuple(points.shape)}")
    x, y = points[..., 0], points[..., 1]  # (..., P)
    if method in ("minmax", "partial_minmax"):
        if method == "partial_minmax":
            x, y = x[..., :4], y[..., :4]
        return torch.stack([x.amin(-1), y.amin(-1), x.amax(-1), y.amax(-1)], dim=-1)
    if method != "moment":
        raise ValueError(f"points_to_boxes: unknown method {method!r}; choose one of {TRANSFORM_METHODS}")
    mean_x, mean_y = x.mean(-1), y.mean(-1)  # (...)
    std_x, std_y = x.std(-1), y.std(-1)  # unbiased, as torch.std in mmdet
    if moment_transfer is None:
        half_w, half_h = std_x, std_y
    else:
        transfer = moment_transfer * moment_mul + moment_transfer.detach() * (1 - moment_mul)  # (2,) (w, h)
        half_w, half_h = std_x * transfer[0].exp(), std_y * transfer[1].exp()
    return torch.stack([mean_x - half_w, mean_y - half_h, mean_x + half_w, mean_y + half_h], dim=-1)


# ------------------------------------------------------------------------------ assigners
def point_assign(points: Tensor, strides: Tensor, gt_boxes: Tensor, scale: float = 4.0, pos_num: int = 1) -> Tensor:
    """Initial-stage targets, as mmdet's ``PointAssigner``: ``(N,)`` long, 0 negative, ``g + 1`` the gt.

    ``points`` (N, 2) grid locations (x, y) in pixels, ``strides`` (N,) their levels' strides (powers
    of 2), ``gt_boxes`` (G, 4) x1y1x2y2 pixels. A box lives on level ``trunc(mean(log2(w / scale),
    log2(h / scale)))`` clamped to the levels present; its positives are the ``pos_num`` points of
    that level nearest its centre (distance in units of the box's w, h); a point claimed by several
    boxes keeps the nearest (ties: the earlier box). Boxes are processed in order, as mmdet does.
    """
    num_points = points.shape[0]
    assigned = torch.zeros(num_points, dtype=torch.long, device=points.device)
    if num_points == 0 or gt_boxes.shape[0] == 0:
        return assigned
    point_lvl = torch.log2(strides.float()).round().long()  # (N,)
    gt_xy = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
    gt_wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)  # (G, 2)
    gt_lvl = ((torch.log2(gt_wh[:, 0] / scale) + torch.log2(gt_wh[:, 1] / scale)) / 2).trunc().long()
    gt_lvl = gt_lvl.clamp(int(point_lvl.min()), int(point_lvl.max()))  # (G,)
    best = points.new_full((num_points,), float("inf"))  # distance to the box a point holds
    for g in range(gt_boxes.shape[0]):
        on_level = torch.nonzero(point_lvl == gt_lvl[g]).squeeze(1)  # (n,)
        if on_level.numel() == 0:
            continue
        dist = ((points[on_level] - gt_xy[g]) / gt_wh[g]).norm(dim=1)  # (n,)
        near_dist, near = dist.topk(min(pos_num, on_level.numel()), largest=False)
        idx = on_level[near]
        closer = near_dist < best[idx]
        assigned[idx[closer]] = g + 1
        best[idx[closer]] = near_dist[closer]
    return assigned


def max_iou_assign(boxes: Tensor, gt_boxes: Tensor, pos_iou: float = 0.5, neg_iou: float = 0.4,
                   min_pos_iou: float = 0.0) -> Tensor:
    """Refine-stage targets, as mmdet's ``MaxIoUAssigner`` (``gt_max_assign_all``, low-quality matches
    on): ``(N,)`` long, -1 ignored, 0 negative, ``g + 1`` the gt.

    ``boxes`` (N, 4) and ``gt_boxes`` (G, 4) x1y1x2y2. A box is negative if its best IoU is below
    ``neg_iou``, positive (its best gt) if at least ``pos_iou``, ignored in between; then each gt, in
    order, takes every box whose IoU with it equals its best IoU if that is ``>= min_pos_iou`` (with
    mmdet's ``min_pos_iou=0`` this holds even when the best IoU is 0: see ``docs/methods.md``).
    """
    num_boxes = boxes.shape[0]
    if gt_boxes.shape[0] == 0 or num_boxes == 0:
        return torch.zeros(num_boxes, dtype=torch.long, device=boxes.device)
    iou = box_iou(gt_boxes, boxes)  # (G, N)
    best_iou, best_gt = iou.max(dim=0)  # (N,)
    assigned = torch.full((num_boxes,), -1, dtype=torch.long, device=boxes.device)
    assigned[(best_iou >= 0) & (best_iou < neg_iou)] = 0
    positive = best_iou >= pos_iou
    assigned[positive] = best_gt[positive] + 1
    gt_best = iou.max(dim=1).values  # (G,)
    for g in range(gt_boxes.shape[0]):
        if gt_best[g] >= min_pos_iou:
            assigned[iou[g] == gt_best[g]] = g + 1
    return assigned


# ------------------------------------------------------------------------------ layers
def _deform_conv(x: Tensor, offset: Tensor, weight: Tensor, stride=1, padding=1, dilation=1) -> Tensor:
    """``deform_conv2d`` (no bias, no modulation) returning ``x``'s dtype; fp16/bf16 inputs are computed in
    float32 (torchvision's CPU kernels have no bf16, and its CUDA autocast rule computes in float32 too)."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    out = deform_conv2d(x.to(dtype), offset.to(dtype), weight.to(dtype), None, stride, padding, dilation)
    return out.to(x.dtype)


class _ConvGN(nn.Sequential):
    """``conv`` (no bias) -> ``norm`` (GroupNorm 32) [-> ReLU]: mmcv's ``ConvModule`` with GN. The
    pre-norm output (FGD's RepPoints taps) is the ``.conv`` submodule's."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = False) -> None:
        layers: list[tuple[str, nn.Module]] = [
            ("conv", nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)),
            ("norm", nn.GroupNorm(GN_GROUPS, cout))]
        if relu:
            layers.append(("relu", nn.ReLU(inplace=True)))
        super().__init__(OrderedDict(layers))


class DeformableConv3x3(nn.Module):
    """A 3x3 deformable convolution (DCNv1, no modulation) whose offsets come from the input through a
    zero-initialised 3x3 conv (mmcv's ``DeformConv2dPack``): replaces a bottleneck's ``conv2``.

    ``weight`` has the plain conv's shape and name, so ImageNet weights load into it; ``conv_offset``
    outputs ``(B, 18, H', W')`` (dy, dx) pairs per kernel position, in input pixels.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.bias is not None:
            raise ValueError(f"DeformableConv3x3 replaces a 3x3 conv without bias, got {conv}")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone())  # (C_out, C_in / groups, 3, 3)
        self.conv_offset = nn.Conv2d(conv.in_channels, 18, 3, stride=conv.stride, padding=conv.padding,
                                     dilation=conv.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        offset = self.conv_offset(x)
        return _deform_conv(x, offset, self.weight, self.stride, self.padding, self.dilation)


def _add_dcn(net: torchvision.models.ResNet, stages: Sequence[bool], backbone: str) -> None:
    """Replace the 3x3 conv of every bottleneck in the ResNet stages marked in ``stages`` (layer1..4)."""
    for i, use in enumerate(stages, start=1):
        if not use:
            continue
        for block in getattr(net, f"layer{i}"):
            if not isinstance(block, Bottleneck):
                raise ValueError(f"{backbone}: deformable convolutions need bottleneck blocks (ResNet-50 and "
                                 f"deeper), layer{i} has {type(block).__name__}")
            block.conv2 = DeformableConv3x3(block.conv2)


class RepPointsFPN(nn.Module):
    """mmdet's FPN as RepPoints configures it: C3-C5 in, P3-P7 out, GroupNorm on every conv (laterals,
    outputs, extras), no activations; P6 a stride-2 3x3 conv of C5 (``add_extra_convs='on_input'``),
    P7 of P6 (no ReLU between: ``relu_before_extra_convs=False``).

    ``forward({"c3", "c4", "c5"})`` -> ``OrderedDict`` ``p3..p7``, each ``(B, out_channels, H/s, W/s)``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(_ConvGN(c, out_channels, 1) for c in in_channels)
        self.outputs = nn.ModuleList(_ConvGN(out_channels, out_channels, 3) for _ in in_channels)
        self.extra = nn.ModuleList([_ConvGN(in_channels[-1], out_channels, 3, stride=2),
                                    _ConvGN(out_channels, out_channels, 3, stride=2)])
        for m in self.modules():  # mmdet FPN.init_weights: xavier uniform
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, feats: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        inputs = list(feats.values())  # C3, C4, C5
        lat = [conv(x) for conv, x in zip(self.laterals, inputs)]
        for i in range(len(lat) - 1, 0, -1):  # top-down, nearest upsampling to the finer size
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.outputs, lat)]
        outs.append(self.extra[0](inputs[-1]))
        outs.append(self.extra[1](outs[-1]))
        return OrderedDict((f"p{3 + i}", out) for i, out in enumerate(outs))


class RepPointsBackbone(nn.Module):
    """``body`` (a ResNet's C3-C5) -> ``fpn`` (:class:`RepPointsFPN`); ``out_channels`` per level."""

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, RepPointsFPN(in_channels, out_channels), out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(B, 3, H, W) normalised, padded -> ``p3..p7``."""
        return self.fpn(self.body(x))


class RepPointsHead(nn.Module):
    """The RepPoints head, shared by the levels (mmdet ``RepPointsHead``, ``center_init``, no grid points).

    Per level ``x`` (B, C, h, w): two towers of ``stacked_convs`` 3x3 conv+GN+ReLU (``cls_convs``,
    ``reg_convs``); initial points ``pts_init`` = 1x1(ReLU(3x3(reg))) (B, 2P, h, w), (dy, dx) offsets from
    the location in stride units; both branches then sample their tower at those points with a 3x3
    deformable conv (offsets ``0.1 * pts_init + 0.9 * pts_init.detach()`` minus the regular 3x3 grid:
    ``gradient_mul``); ``cls`` = 1x1(ReLU(dcn(cls tower))) (B, K, h, w) logits, refined points =
    1x1(ReLU(dcn(reg tower))) + ``pts_init.detach()``. ``moment_transfer`` (2,) is the learnable
    (w, h) log-scale of the moment box.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 point_feat_channels: int = 256, stacked_convs: int = 3, num_points: int = 9,
                 gradient_mul: float = 0.1) -> None:
        super().__init__()
        kernel = math.isqrt(num_points)
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f"RepPointsHead: num_points must be an odd square (9, 25, ...), got {num_points}")
        self.num_classes, self.num_points, self.kernel = num_classes, num_points, kernel
        self.gradient_mul = gradient_mul
        self.cls_convs = nn.Sequential(*(_ConvGN(in_channels if i == 0 else feat_channels, feat_channels, 3, relu=True)
                                         for i in range(stacked_convs)))
        self.reg_convs = nn.Sequential(*(_ConvGN(in_channels if i == 0 else feat_channels, feat_channels, 3, relu=True)
                                         for i in range(stacked_convs)))
        self.cls_dcn = nn.Parameter(torch.empty(point_feat_channels, feat_channels, kernel, kernel))
        self.cls_out = nn.Conv2d(point_feat_channels, num_classes, 1)
        self.pts_init_conv = nn.Conv2d(feat_channels, point_feat_channels, 3, padding=1)
        self.pts_init_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        self.pts_refine_dcn = nn.Parameter(torch.empty(point_feat_channels, feat_channels, kernel, kernel))
        self.pts_refine_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        self.moment_transfer = nn.Parameter(torch.zeros(2))
        r = torch.arange(-(kernel // 2), kernel // 2 + 1, dtype=torch.float32)
        grid = torch.stack([r.repeat_interleave(kernel), r.repeat(kernel)], dim=1)  # (P, 2) (dy, dx), row-major
        self.register_buffer("base_offset", grid.reshape(1, -1, 1, 1), persistent=False)  # (1, 2P, 1, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """mmdet ``RepPointsHead.init_weights``: N(0, 0.01) everywhere, zero biases, classifier bias
        ``-log((1 - 0.01) / 0.01)`` (prior probability 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_dcn, std=0.01)
        nn.init.normal_(self.pts_refine_dcn, std=0.01)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))

    def forward_level(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, h, w) -> cls logits (B, K, h, w), initial and refined points (B, 2P, h, w) (dy, dx, stride units)."""
        cls_feat, pts_feat = self.cls_convs(x), self.reg_convs(x)
        pts_init = self.pts_init_out(F.relu(self.pts_init_conv(pts_feat)))
        scaled = self.gradient_mul * pts_init + (1 - self.gradient_mul) * pts_init.detach()
        offset = scaled - self.base_offset.to(scaled.dtype)  # sampling points = location + pts_init
        pad = self.kernel // 2
        cls = self.cls_out(F.relu(_deform_conv(cls_feat, offset, self.cls_dcn, padding=pad)))
        pts_feat = _deform_conv(pts_feat, offset, self.pts_refine_dcn, padding=pad)
        pts_refine = self.pts_refine_out(F.relu(pts_feat)) + pts_init.detach()
        return cls, pts_init, pts_refine

    def forward(self, feats: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [self.forward_level(x) for x in feats]


# ------------------------------------------------------------------------------ detector
class RepPoints(nn.Module):
    """RepPoints detector: ``transform`` (normalise, pad to 32; no resize) -> ``backbone`` (``body`` +
    ``fpn``, P3-P7) -> ``head``. torchvision's calling convention:

    * training: ``model(images, targets)`` -> ``{"classification", "pts_init", "pts_refine"}``, each a
      weighted 0-dim loss; ``images`` a list of (3, H, W) in [0, 1], ``targets`` a list of
      ``{"boxes": (G, 4) x1y1x2y2 pixels of the image, "labels": (G,) in 1..K}``;
    * eval: ``model(images)`` -> ``[{"boxes": (D, 4), "scores": (D,), "labels": (D,) in 1..K}]`` per image,
      boxes in the input frame, after per-class NMS (``score_thresh``, ``nms_thresh``,
      ``detections_per_img``, ``topk_candidates`` per level: set them on the model).
    """

    def __init__(self, backbone: RepPointsBackbone, num_classes: int, *, min_size: int | Sequence[int] = 800,
                 max_size: int = 1333, transform_method: str = "moment", point_base_scale: int = 4,
                 pos_num: int = 1, pos_iou: float = 0.5, neg_iou: float = 0.4, min_pos_iou: float = 0.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, loss_cls_weight: float = 1.0,
                 loss_init_weight: float = 0.5, loss_refine_weight: float = 1.0, smooth_l1_beta: float = 0.11,
                 moment_mul: float = 0.01, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, topk_candidates: int = 1000,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = SIZE_DIVISIBLE, **head_options: Any) -> None:
        super().__init__()
        if transform_method not in TRANSFORM_METHODS:
            raise ValueError(f"RepPoints: transform_method must be one of {TRANSFORM_METHODS}, "
                             f"got {transform_method!r}")
        self.transform = DetectionTransform(min_size, max_size, list(image_mean), list(image_std),
                                            size_divisible=size_divisible)
        self.backbone = backbone
        self.head = RepPointsHead(num_classes - 1, backbone.out_channels, **head_options)
        self.strides = tuple(LEVELS.values())
        self.transform_method, self.point_base_scale, self.moment_mul = transform_method, point_base_scale, moment_mul
        self.pos_num, self.pos_iou, self.neg_iou, self.min_pos_iou = pos_num, pos_iou, neg_iou, min_pos_iou
        self.focal_alpha, self.focal_gamma, self.smooth_l1_beta = focal_alpha, focal_gamma, smooth_l1_beta
        self.loss_weights = {"classification": loss_cls_weight, "pts_init": loss_init_weight,
                             "pts_refine": loss_refine_weight}
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    # ---------------------------------------------------------------- forward
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """See the class docstring. Raises ``ValueError`` in training mode without targets, or for
        targets whose ``boxes`` are not (G, 4)."""
        if self.training:
            if targets is None:
                raise ValueError("RepPoints in training mode needs targets (a list of {'boxes', 'labels'}); "
                                 "call model.eval() to predict")
            for i, t in enumerate(targets):
                boxes = t.get("boxes")
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"RepPoints: targets[{i}]['boxes'] must be a (G, 4) tensor, got "
                                     f"{getattr(boxes, 'shape', type(boxes).__name__)}")
        image_list, targets = self.transform(images, targets)
        feats = list(self.backbone(image_list.tensors).values())  # p3..p7
        outputs = self.head(feats)
        grid = self._grid([f.shape[-2:] for f in feats], feats[0].device)
        cls, pts_init, pts_refine = self._flatten(outputs, grid)
        if self.training:
            return self.compute_loss(cls, pts_init, pts_refine, grid, image_list.image_sizes, targets)
        return self.postprocess(cls, pts_refine, [f.shape[-2:] for f in feats], image_list.image_sizes)

    def _grid(self, sizes: list[torch.Size], device: torch.device) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
        """Locations of every level: centres (N, 2) (x, y) = (j * s, i * s) as mmdet's ``PointGenerator``
        (no half-stride shift), strides (N,), and the (h, w) of each level."""
        centres, strides = [], []
        for (h, w), s in zip(sizes, self.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            centres.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() * s)
            strides.append(torch.full((h * w,), float(s), device=device))
        return torch.cat(centres), torch.cat(strides), [tuple(s) for s in sizes]

    def _flatten(self, outputs, grid) -> tuple[Tensor, Tensor, Tensor]:
        """Per-level head maps -> cls (B, N, K), initial and refined points (B, N, P, 2) (x, y) pixels."""
        centres, strides, _ = grid
        cls = torch.cat([c.flatten(2).transpose(1, 2) for c, _, _ in outputs], dim=1)
        pts = []
        for k in (1, 2):
            flat = torch.cat([o[k].flatten(2).transpose(1, 2) for o in outputs], dim=1)  # (B, N, 2P)
            yx = flat.reshape(*flat.shape[:2], self.head.num_points, 2).float()
            pts.append(yx.flip(-1) * strides[None, :, None, None] + centres[None, :, None, :])
        return cls, pts[0], pts[1]

    def _boxes(self, points: Tensor, grad: bool = True) -> Tensor:
        transfer = self.head.moment_transfer if grad else self.head.moment_transfer.detach()
        return points_to_boxes(points, self.transform_method, transfer, self.moment_mul)

    # ---------------------------------------------------------------- training
    def _valid(self, grid, image_sizes: list[tuple[int, int]], divisor: int) -> Tensor:
        """(B, N) bool: the locations inside each image padded alone to ``divisor`` (mmdet's valid flags)."""
        centres, strides, sizes = grid
        masks = []
        for h_img, w_img in image_sizes:
            pad_h, pad_w = math.ceil(h_img / divisor) * divisor, math.ceil(w_img / divisor) * divisor
            per_level = []
            for (h, w), s in zip(sizes, self.strides):
                rows = torch.arange(h, device=centres.device) < min(math.ceil(pad_h / s), h)
                cols = torch.arange(w, device=centres.device) < min(math.ceil(pad_w / s), w)
                per_level.append((rows[:, None] & cols[None, :]).reshape(-1))
            masks.append(torch.cat(per_level))
        return torch.stack(masks)

    def compute_loss(self, cls: Tensor, pts_init: Tensor, pts_refine: Tensor, grid, image_sizes,
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The three weighted losses of mmdet's ``RepPointsHead.loss``.

        ``classification``: sigmoid focal loss over the valid, non-ignored locations of the refine stage,
        summed over classes, divided by the refine positives; ``pts_init`` / ``pts_refine``: smooth-L1
        between the point sets' boxes and their gt, both divided by ``point_base_scale * stride``, summed
        over the 4 coordinates, divided by the stage's positives (each image counting at least 1).
        """
        centres, strides, _ = grid
        valid = self._valid(grid, image_sizes, self.transform.size_divisible)  # (B, N)
        with torch.no_grad():
            candidates = self._boxes(pts_init.detach(), grad=False)  # (B, N, 4) refine-stage proposals
        init_gt, refine_gt = [], []
        for b, target in enumerate(targets):
            gt = target["boxes"].to(centres.dtype)
            init = torch.zeros(valid.shape[1], dtype=torch.long, device=gt.device)
            refine = torch.full_like(init, -1)
            init[valid[b]] = point_assign(centres[valid[b]], strides[valid[b]], gt, self.point_base_scale,
                                          self.pos_num)
            refine[valid[b]] = max_iou_assign(candidates[b][valid[b]], gt, self.pos_iou, self.neg_iou,
                                              self.min_pos_iou)
            init_gt.append(init)
            refine_gt.append(refine)
        init_gt, refine_gt = torch.stack(init_gt), torch.stack(refine_gt)  # (B, N): -1 ignore, 0 neg, g+1
        n_init = sum(max(int((a > 0).sum()), 1) for a in init_gt)
        n_refine = sum(max(int((a > 0).sum()), 1) for a in refine_gt)

        labels = torch.zeros_like(cls, dtype=torch.float32)  # (B, N, K) one-hot of the refine positives
        pos_b, pos_n = torch.nonzero(refine_gt > 0, as_tuple=True)
        gt_labels = _gather(targets, "labels", refine_gt)[pos_b, pos_n]  # (n,) in 1..K
        self._check_labels(gt_labels)
        labels[pos_b, pos_n, gt_labels - 1] = 1.0
        weight = ((refine_gt >= 0) & valid).float()  # (B, N): positives and negatives, not ignored or padding
        focal = sigmoid_focal_loss(cls.float(), labels, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                   reduction="none")  # (B, N, K)
        loss_cls = (focal * weight[..., None]).sum() / n_refine
        return {
            "classification": self.loss_weights["classification"] * loss_cls,
            "pts_init": self.loss_weights["pts_init"] * self._pts_loss(pts_init, init_gt, strides, targets) / n_init,
            "pts_refine": self.loss_weights["pts_refine"] * self._pts_loss(pts_refine, refine_gt, strides,
                                                                           targets) / n_refine,
        }

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.head.num_classes):
            raise ValueError(f"RepPoints: target labels must be in 1..{self.head.num_classes} (0 is background), got "
                             f"{int(labels.min())}..{int(labels.max())}; is num_classes (K + 1) right?")

    def _pts_loss(self, points: Tensor, assigned: Tensor, strides: Tensor, targets) -> Tensor:
        """Summed smooth-L1 of the positives' boxes vs their gt, in units of ``point_base_scale * stride``."""
        pos_b, pos_n = torch.nonzero(assigned > 0, as_tuple=True)
        if len(pos_b) == 0:
            return points.sum() * 0.0  # keeps the graph (and DDP) connected
        gt = _gather(targets, "boxes", assigned)[pos_b, pos_n]  # (n, 4)
        norm = (self.point_base_scale * strides[pos_n])[:, None]  # (n, 1)
        pred = self._boxes(points[pos_b, pos_n])  # (n, 4)
        return F.smooth_l1_loss(pred / norm, gt.to(pred.dtype) / norm, beta=self.smooth_l1_beta, reduction="sum")

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def postprocess(self, cls: Tensor, pts_refine: Tensor, sizes: list[torch.Size],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """mmdet ``_get_bboxes_single``: per level the ``topk_candidates`` locations of highest class score,
        refined boxes clipped to the image, then every (box, class) above ``score_thresh``, per-class NMS at
        ``nms_thresh``, the ``detections_per_img`` best. Labels are class index + 1."""
        counts = [h * w for h, w in sizes]
        results = []
        for b, (h_img, w_img) in enumerate(image_sizes):
            boxes_all, scores_all = [], []
            for scores, pts in zip(cls[b].sigmoid().split(counts), pts_refine[b].split(counts)):
                if scores.shape[0] > self.topk_candidates:
                    keep = scores.max(dim=1).values.topk(self.topk_candidates).indices
                    scores, pts = scores[keep], pts[keep]
                boxes = self._boxes(pts.float(), grad=False)
                boxes = torch.stack([boxes[:, 0].clamp(0, w_img), boxes[:, 1].clamp(0, h_img),
                                     boxes[:, 2].clamp(0, w_img), boxes[:, 3].clamp(0, h_img)], dim=1)
                boxes_all.append(boxes)
                scores_all.append(scores)
            boxes, scores = torch.cat(boxes_all), torch.cat(scores_all).float()  # (M, 4), (M, K)
            loc, cls_idx = torch.nonzero(scores > self.score_thresh, as_tuple=True)
            boxes, scores = boxes[loc], scores[loc, cls_idx]
            keep = batched_nms(boxes, scores, cls_idx, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": cls_idx[keep] + 1})
        return results


def _gather(targets: list[dict[str, Tensor]], key: str, assigned: Tensor) -> Tensor:
    """``targets[b][key][assigned[b, n] - 1]`` for every (b, n): (B, N, ...) (rows of unassigned locations
    hold the first gt's value, or zeros for an image without gt; callers select the positives)."""
    rows = []
    for target, idx in zip(targets, assigned):
        values = target[key]
        if values.shape[0] == 0:
            rows.append(values.new_zeros((idx.shape[0], *values.shape[1:])))
        else:
            rows.append(values[(idx - 1).clamp(min=0)])
    return torch.stack(rows)


# ------------------------------------------------------------------------------ builder
def _backbone_body(backbone: str, pretrained, frozen_bn: bool, trainable_layers: int) -> tuple[nn.Module, list[int]]:
    """C3-C5 extractor over ``backbone`` (ImageNet weights from the local ``pretrained`` file, torchvision
    keys, ``fc.*`` ignored), DCN where the backbone says, stages beyond ``trainable_layers`` frozen."""
    factory, dcn_stages = REPPOINTS_BACKBONES[backbone]
    net = factory(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    net.fc = nn.Identity()
    if pretrained is not None:
        state = {k: v for k, v in load_state_dict_file(pretrained).items() if not k.startswith("fc.")}
        load_weights_strict(net, state, os.fspath(pretrained),
                            f"torchvision-layout {backbone} ImageNet classifier (fc ignored)")
    _add_dcn(net, dcn_stages, backbone)  # after loading: the ImageNet 3x3 weights move into the DCNs
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be 0..5, got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    train += ["bn1"] if trainable_layers == 5 else []
    for name, p in net.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            p.requires_grad_(False)
    c5 = net.inplanes  # 512 (BasicBlock) or 2048 (Bottleneck)
    body = IntermediateLayerGetter(net, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    return body, [c5 // 4, c5 // 2, c5]


def build_reppoints(backbone: str, num_classes: int, *, pretrained: str | os.PathLike | None = None,
                    checkpoint: str | os.PathLike | None = None, min_size: int | Sequence[int] = 800,
                    max_size: int = 1333, trainable_backbone_layers: int | None = None,
                    frozen_bn: bool | None = None, fpn_channels: int = 256, checkpoint_key: str | None = None,
                    **options: Any) -> RepPoints:
    """RepPoints over ``backbone`` (:data:`REPPOINTS_BACKBONES`; ``resnext101_32x4d_dcn`` has deformable
    3x3 convs in stages c3-c5) with a GN FPN (P3-P7, ``fpn_channels``) and the RepPoints head.

    ``num_classes`` = K + 1 (label 0 background; the classifier has K outputs). ``pretrained``: a local
    ImageNet state dict in torchvision's ResNet layout (strict, ``fc.*`` ignored); ``checkpoint``: a local
    full RepPoints state dict, strict (nested under ``checkpoint_key`` or the usual keys).
    ``trainable_backbone_layers`` (0..5) and ``frozen_bn`` default as torchvision's (3 and frozen with
    ``pretrained``, else 5 and BatchNorm2d); 3 equals mmdet's ``frozen_stages=1``. ``options`` go to
    :class:`RepPoints` (``transform_method``, loss weights, assigner thresholds, eval limits, and the
    head's ``stacked_convs``, ``feat_channels``, ``point_feat_channels``, ``num_points``, ``gradient_mul``).
    Raises ``ValueError`` for an unknown backbone (with close matches), ``num_classes < 2`` or an unknown
    option value; :class:`~acamkd.models.weights.WeightsMismatchError` for weights that do not fit.
    """
    if backbone not in REPPOINTS_BACKBONES:
        from acamkd.models.registry import did_you_mean

        raise ValueError(f"reppoints does not take backbone {backbone!r}{did_you_mean(backbone, REPPOINTS_BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (K classes + background), got {num_classes!r}")
    if fpn_channels % GN_GROUPS:
        raise ValueError(f"fpn_channels must be a multiple of {GN_GROUPS} (GroupNorm groups), got {fpn_channels}")
    trainable = trainable_backbone_layers
    if trainable is None:
        trainable = 3 if pretrained is not None else 5
    frozen = frozen_bn if frozen_bn is not None else pretrained is not None
    body, in_channels = _backbone_body(backbone, pretrained, frozen, trainable)
    model = RepPoints(RepPointsBackbone(body, in_channels, fpn_channels), num_classes, min_size=min_size,
                      max_size=max_size, **options)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint, key=checkpoint_key)
        load_weights_strict(model, state, os.fspath(checkpoint),
                            f"reppoints with {backbone} backbone and num_classes={num_classes}")
    return model


# ------------------------------------------------------------------------------ registration
def reppoints_taps(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Default taps: the FPN outputs (post-GN), named by stride as RetinaNet's: ``p3``..``p7``."""
    _check(model)
    return {"backbone": "backbone"}, {f"backbone.{name}": name for name in LEVELS}


def reppoints_channels(model: nn.Module) -> dict[str, int]:
    """``level -> channels`` of the default taps (every FPN level has ``backbone.out_channels``)."""
    return {name: _check(model).backbone.out_channels for name in LEVELS}


@torch.no_grad()
def reppoints_teacher_features(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """``p3..p7`` of ``model`` for ``images``: transform + backbone/FPN only (no head), eval mode, no grad
    (the mode is restored)."""
    _check(model)
    was_training = model.training
    model.eval()
    try:
        image_list, _ = model.transform(images)
        return dict(model.backbone(image_list.tensors))
    finally:
        model.train(was_training)


def _check(model: nn.Module) -> RepPoints:
    if not isinstance(model, RepPoints):
        raise TypeError(f"expected a RepPoints model (acamkd.models.reppoints), got {type(model).__name__}; "
                        f"pass taps to FeatureTaps yourself")
    return model


register_model(ModelSpec(
    name="reppoints", task="detection", backbones=tuple(REPPOINTS_BACKBONES), build=build_reppoints,
    levels=LEVELS, size_divisor=SIZE_DIVISIBLE, background_class=True, default_taps=reppoints_taps,
    tap_channels=reppoints_channels, teacher_features=reppoints_teacher_features,
    set_eval_limits=set_detector_eval_limits,
    description="RepPoints (moment, GN neck + head), FPN P3-P7 over a ResNet/ResNeXt (one-stage, anchor-free)"))
