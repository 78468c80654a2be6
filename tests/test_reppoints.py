"""RepPoints (acamkd.models.reppoints): points-to-box conversions, deformable sampling, both assigners on
crafted boxes (expected assignments derived by hand), the model's contract (train losses, eval detections,
taps, weights), a tiny model that learns on the built-in data, and `acamkd distill` with ACAM-KD end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _cli_helpers import acamkd
from _detection_helpers import two_images_and_targets
from torchvision.ops import deform_conv2d

from acamkd.data import CocoDetection
from acamkd.data.synthetic import make_shapes
from acamkd.evaluation.coco import STAT_KEYS
from acamkd.models import FeatureTaps, WeightsMismatchError, get_model_spec, inherit_weights
from acamkd.models.reppoints import (
    DeformableConv3x3,
    RepPoints,
    build_reppoints,
    max_iou_assign,
    point_assign,
    points_to_boxes,
)

K = 3  # foreground classes of the small models below (num_classes = K + 1)
NARROW = {"fpn_channels": 64, "feat_channels": 64, "point_feat_channels": 64}  # 1/16 of the head's cost on a CPU


def narrow(backbone: str = "resnet18", num_classes: int = K + 1, **options) -> RepPoints:
    """A RepPoints with 64-channel FPN and head (the paper's is 256: see test_train_losses_eval_detections_and_taps)."""
    return build_reppoints(backbone, num_classes, **NARROW, **options)


# ------------------------------------------------------------------------------ points -> boxes
def _grid_points(cx: float, cy: float, a: float, b: float) -> torch.Tensor:
    """The 9 points (x, y) of a 3x3 grid centred at (cx, cy), half-extent a in x and b in y: (9, 2)."""
    r = torch.tensor([-1.0, 0.0, 1.0])
    ys, xs = torch.meshgrid(r * b + cy, r * a + cx, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(9, 2)


def test_minmax_and_partial_minmax_by_hand():
    pts = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 5.0], [2.0, 2.0],  # the first 4 points
                        [10.0, -4.0], [1.0, 1.0], [2.0, 3.0], [1.5, 0.0], [0.5, 4.0]])
    torch.testing.assert_close(points_to_boxes(pts, "minmax"), torch.tensor([0.0, -4.0, 10.0, 5.0]))
    torch.testing.assert_close(points_to_boxes(pts, "partial_minmax"), torch.tensor([0.0, -1.0, 3.0, 5.0]))
    batch = torch.stack([pts, pts + 1]).unsqueeze(0)  # (1, 2, 9, 2): leading dims are kept
    assert points_to_boxes(batch, "minmax").shape == (1, 2, 4)
    torch.testing.assert_close(points_to_boxes(batch, "minmax")[0, 1], torch.tensor([1.0, -3.0, 11.0, 6.0]))


def test_moment_by_hand_with_transfer_and_its_gradient():
    pts = _grid_points(10.0, 20.0, a=2.0, b=4.0)
    # x = 10 + {-2, 0, 2} three times each: mean 10, unbiased std sqrt(6 * 2^2 / 8) = 2 sqrt(3)/2 = sqrt(3)
    sx, sy = math.sqrt(3.0), 2 * math.sqrt(3.0)
    torch.testing.assert_close(points_to_boxes(pts, "moment"), torch.tensor([10 - sx, 20 - sy, 10 + sx, 20 + sy]))
    transfer = torch.tensor([math.log(2.0), math.log(0.5)], requires_grad=True)  # (w, h): width x2, height /2
    box = points_to_boxes(pts, "moment", transfer)
    torch.testing.assert_close(box.detach(), torch.tensor([10 - 2 * sx, 20 - sy / 2, 10 + 2 * sx, 20 + sy / 2]))
    box[2].backward()  # x2 = mean + std_x exp(t_w): d/dt_w = std_x exp(t_w), times moment_mul 0.01
    torch.testing.assert_close(transfer.grad, torch.tensor([0.01 * 2 * sx, 0.0]))
    with pytest.raises(ValueError, match="unknown method 'mean'"):
        points_to_boxes(pts, "mean")
    with pytest.raises(ValueError, match=r"\(\.\.\., P, 2\)"):
        points_to_boxes(pts.reshape(6, 3), "moment")


# ------------------------------------------------------------------------------ deformable sampling
def test_deform_conv2d_at_zero_offsets_is_a_plain_conv_and_offsets_are_y_first():
    x, w, b = torch.randn(2, 4, 7, 9), torch.randn(5, 4, 3, 3), torch.randn(5)
    zero = torch.zeros(2, 18, 7, 9)
    torch.testing.assert_close(deform_conv2d(x, zero, w, b, padding=1), F.conv2d(x, w, b, padding=1))
    down = zero.clone()
    down[:, 0::2] = 1.0  # every kernel point moved by dy = +1 (one row down), dx = 0
    # output row i then reads input rows i .. i + 2 (zeros below the map): a conv over x padded by 0 rows on
    # top, 2 below, 1 column each side
    torch.testing.assert_close(deform_conv2d(x, down, w, b, padding=1), F.conv2d(F.pad(x, (1, 1, 0, 2)), w, b))


def test_deformable_bottleneck_conv_starts_as_the_conv_it_replaces():
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)  # as a ResNeXt conv2
    dcn = DeformableConv3x3(conv)
    x = torch.randn(1, 8, 11, 13)
    torch.testing.assert_close(dcn(x), conv(x))  # zero-initialised offsets
    assert torch.equal(dcn.weight, conv.weight) and dcn.conv_offset.out_channels == 18


# ------------------------------------------------------------------------------ assigners
def _points() -> tuple[torch.Tensor, torch.Tensor]:
    """Level 3 (stride 8): x, y in {0, 8, .., 32} (25 points, index 5 i + j); level 4 (stride 16): x, y in
    {0, 16, 32} (9 points, index 25 + 3 i + j)."""
    pts, strides = [], []
    for stride, n in ((8, 5), (16, 3)):
        ys, xs = torch.meshgrid(torch.arange(n) * stride, torch.arange(n) * stride, indexing="ij")
        pts.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2).float())
        strides.append(torch.full((n * n,), float(stride)))
    return torch.cat(pts), torch.cat(strides)


A = [2.0, 3.0, 34.0, 35.0]  # 32 x 32: level (3 + 3) / 2 = 3; centre (18, 19): nearest (16, 16) at |(2, 3)/32| = 0.113
B = [0.0, 0.0, 64.0, 64.0]  # 64 x 64: level 4; centre (32, 32) is the level-4 point 25 + 8 = 33
TINY = [30.0, 30.0, 31.0, 31.0]  # 1 x 1: level trunc(-2) clamped to 3; nearest (32, 32), index 24
C = [9.0, 10.0, 29.0, 26.0]  # 20 x 16: level trunc(2.16) = 2 -> 3; centre (19, 18): nearest (16, 16) at 0.195


def test_point_assigner_by_hand():
    points, strides = _points()
    expected = torch.zeros(34, dtype=torch.long)
    expected[12], expected[33], expected[24] = 1, 2, 3
    assert torch.equal(point_assign(points, strides, torch.tensor([A, B, TINY])), expected)
    # A and C both want (16, 16): the closer box (A: 0.113 < C: 0.195) keeps it, in either order
    only_a = torch.zeros(34, dtype=torch.long)
    only_a[12] = 1
    assert torch.equal(point_assign(points, strides, torch.tensor([A, C])), only_a)
    only_a[12] = 2
    assert torch.equal(point_assign(points, strides, torch.tensor([C, A])), only_a)
    assert torch.equal(point_assign(points, strides, torch.zeros(0, 4)), torch.zeros(34, dtype=torch.long))


def test_max_iou_assigner_by_hand():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 120.0, 120.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt 1: positive
                          [0.0, 0.0, 10.0, 5.0],  # 0.5: positive (>= pos_iou)
                          [0.0, 0.0, 10.0, 4.5],  # 0.45: between the thresholds, ignored
                          [0.0, 0.0, 10.0, 3.0],  # 0.3: negative
                          [20.0, 20.0, 30.0, 30.0],  # 0 with both: negative
                          [100.0, 100.0, 110.0, 130.0]])  # 200 / 500 = 0.4 with gt 2, its best: low-quality match
    assert max_iou_assign(boxes, gts).tolist() == [1, 1, -1, 0, 0, 2]
    assert max_iou_assign(boxes, torch.zeros(0, 4)).tolist() == [0] * 6


def test_max_iou_assigner_keeps_mmdets_min_pos_iou_zero_quirk():
    """mmdet's refine assigner (min_pos_iou=0, gt_max_assign_all) gives a gt that no box overlaps every box
    of IoU 0 with it, even one already matched: kept for fidelity (docs/methods.md); min_pos_iou > 0 avoids it."""
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [200.0, 200.0, 210.0, 210.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert max_iou_assign(boxes, gts).tolist() == [2, 2]
    assert max_iou_assign(boxes, gts, min_pos_iou=1e-6).tolist() == [1, 0]


# ------------------------------------------------------------------------------ the model
def _images_and_targets():
    return two_images_and_targets(second_labels=(1, 2))


def test_train_losses_eval_detections_and_taps():
    model = build_reppoints("resnet18", K + 1, score_thresh=0.0, detections_per_img=20)
    images, targets = _images_and_targets()
    spec = get_model_spec("reppoints")
    taps = FeatureTaps(model, *spec.default_taps(model))
    losses = model(images, targets)
    assert set(losses) == {"classification", "pts_init", "pts_refine"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values()), losses
    feats = taps.features()
    assert list(feats) == list(spec.levels) == ["p3", "p4", "p5", "p6", "p7"]
    assert [f.shape[-2:] for f in feats.values()] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    sum(losses.values()).backward()
    assert model.head.moment_transfer.grad is not None and model.backbone.fpn.laterals[0].conv.weight.grad is not None
    model.eval()
    spec.set_eval_limits(model, 0.0, 7)
    with torch.no_grad():
        predictions = model(images)
    for image, pred in zip(images, predictions):
        h, w = image.shape[-2:]
        assert 0 < len(pred["boxes"]) <= 7 and pred["boxes"].shape[1] == 4
        assert pred["boxes"].min() >= 0 and (pred["boxes"][:, 0::2] <= w).all() and (pred["boxes"][:, 1::2] <= h).all()
        assert pred["labels"].min() >= 1 and pred["labels"].max() <= K  # never the background label 0
        assert (pred["scores"][:-1] >= pred["scores"][1:]).all()
    direct = spec.teacher_features(model, images)
    assert all(torch.equal(direct[k], taps.features()[k]) for k in direct)
    taps.remove()


def test_errors_name_what_to_do():
    with pytest.raises(ValueError, match=r"did you mean 'resnet50'"):
        build_reppoints("resnet5O", K + 1)
    with pytest.raises(ValueError, match="num_classes"):
        build_reppoints("resnet18", 1)
    with pytest.raises(ValueError, match="transform_method"):
        build_reppoints("resnet18", K + 1, transform_method="box")
    model = narrow()
    images, targets = _images_and_targets()
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    targets[0]["labels"] = torch.tensor([K + 1])
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.3"):
        model(images, targets)


def test_images_without_boxes_train_and_other_transforms_run():
    images, targets = _images_and_targets()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    for method in ("moment", "minmax", "partial_minmax"):
        model = narrow(transform_method=method)
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(images, nothing)
    assert losses["pts_init"] == 0 and losses["pts_refine"] == 0 and losses["classification"] > 0


def test_bf16_autocast_trains_and_predicts():
    """Mixed precision (the GPU benchmark's bf16): the deformable convolutions compute in float32, the
    losses come back as float32 scalars."""
    model = narrow()
    images, targets = _images_and_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = model(images)
    assert len(predictions) == 2 and all(p["boxes"].dtype == torch.float32 for p in predictions)


def test_weights_local_files_strict_and_inheritance(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = narrow(pretrained=tmp_path / "r18.pth")
    assert torch.equal(model.backbone.body.conv1.weight, net.conv1.weight)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # mmdet frozen_stages=1
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    torch.save(model.state_dict(), tmp_path / "full.pt")
    again = narrow(checkpoint=tmp_path / "full.pt", frozen_bn=True)
    assert torch.equal(again.head.cls_out.weight, model.head.cls_out.weight)
    with pytest.raises(WeightsMismatchError, match="reppoints with resnet18 backbone and num_classes=5"):
        narrow(num_classes=K + 2, checkpoint=tmp_path / "full.pt")
    teacher = narrow("resnet50")
    report = inherit_weights(model, teacher)  # the task's default prefixes: backbone.fpn, head
    assert "head.cls_out.weight" in report.copied and "head.moment_transfer" in report.copied
    assert "backbone.fpn.outputs.0.conv.weight" in report.copied
    assert "shape" in report.skipped["backbone.fpn.laterals.0.conv.weight"]  # C3: 128 vs 512 channels


def test_x101_32x4d_dcn_backbone_layout():
    model = build_reppoints("resnext101_32x4d_dcn", K + 1)
    body = model.backbone.body
    assert isinstance(body.layer1[0].conv2, torch.nn.Conv2d)  # stage c2: plain
    assert body.layer1[0].conv2.groups == 32 and body.layer1[0].conv2.in_channels == 128  # 32 groups x width 4
    for layer in (body.layer2, body.layer3, body.layer4):  # c3-c5: deformable
        assert all(isinstance(block.conv2, DeformableConv3x3) for block in layer)
    assert len(body.layer3) == 23
    feats = get_model_spec("reppoints").teacher_features(model, [torch.rand(3, 64, 64)])
    assert [f.shape for f in feats.values()] == [(1, 256, 8, 8), (1, 256, 4, 4), (1, 256, 2, 2), (1, 256, 1, 1),
                                                 (1, 256, 1, 1)]


# ------------------------------------------------------------------------------ learning and the CLI
def test_tiny_reppoints_learns_on_the_built_in_data(tmp_path):
    summary = make_shapes(tmp_path / "shapes", train=4, val=1, size=(96, 128), seed=1)
    data = CocoDetection(summary["paths"]["coco_root"], "train")
    batch = [data[i] for i in range(2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    assert all(len(t["boxes"]) for t in targets)
    model = narrow(num_classes=data.num_classes)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    history = []
    for _ in range(30):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()
        history.append(float(loss.detach()))
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.7 * first, history


@pytest.mark.slow
def test_acamkd_distill_with_acam_runs_and_evaluates(tmp_path):
    root, out = tmp_path / "shapes", tmp_path / "student"
    summary = make_shapes(root, train=8, val=4, size=(96, 128), seed=0)  # what the CLI would generate
    teacher = build_reppoints("resnet18", summary["num_classes"] + 1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    acamkd("distill", "configs/demo/shapes_det_reppoints_acam.yaml", f"data.root={root}", "data.shapes.train=8",
           "data.shapes.val=4", "data.shapes.size=[96,128]", "data.min_size=96", "data.max_size=128",
           "data.batch_size=2", "data.workers=0", "train.epochs=null", "train.iterations=3", "train.steps=[2]",
           "train.warmup_iters=1", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=3",
           f"train.output_dir={out}", "teacher.backbone=resnet18", f"teacher.checkpoint={tmp_path / 'teacher.pt'}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    keys = set().union(*(r.keys() for r in train))
    assert any(k.startswith("distill.p3.") for k in keys) and "task.pts_refine" in str(keys), keys
    final = json.loads((out / "final_metrics.json").read_text())
    assert all(isinstance(final[k], float) for k in STAT_KEYS) and len(STAT_KEYS) == 12
