"""Detector builders: train/eval forward, the no-resize transform, level names and strides,
local weights (pretrained backbone, strict checkpoints), inheritance, teacher features."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from _detection_helpers import two_images_and_targets
from torchvision.ops.misc import FrozenBatchNorm2d

from acamkd.models import (
    DetectionTransform,
    WeightsMismatchError,
    build_detector,
    detector_channels,
    detector_taps,
    inherit_weights,
    load_state_dict_file,
    student_taps,
    teacher_features,
)

NUM_CLASSES = 9  # K = 8 dataset classes (labels 1..8) + background
LEVELS = {"retinanet": ["p3", "p4", "p5", "p6", "p7"], "fcos": ["p3", "p4", "p5", "p6", "p7"],
          "fasterrcnn": ["p2", "p3", "p4", "p5", "p6"]}
# Small test-time settings: keep every detection (random init scores are low), few proposals.
FAST = {"retinanet": {"score_thresh": 0.0, "detections_per_img": 50},
        "fcos": {"score_thresh": 0.0, "detections_per_img": 50},
        "fasterrcnn": {"box_score_thresh": 0.0, "box_detections_per_img": 50, "rpn_pre_nms_top_n_test": 200,
                       "rpn_post_nms_top_n_test": 100, "rpn_pre_nms_top_n_train": 200,
                       "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64}}


# The torchvision family built by models/detection.py; other registered detectors (RepPoints) have their
# own test files, and tests/test_model_registry.py checks every registered model against its spec.
TORCHVISION_ARCHS = tuple(LEVELS)


class NotATensor:  # an arbitrary pickled object: weights_only=True must refuse it
    pass


def build(arch: str, backbone: str = "resnet18", **kwargs):
    return build_detector(arch, backbone, NUM_CLASSES, **{**FAST[arch], **kwargs})


def images_and_targets():
    return two_images_and_targets(second_labels=(1, 8))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_train_and_eval_forward_in_input_frame(arch):
    model = build(arch)
    assert isinstance(model.transform, DetectionTransform)
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    for image, pred in zip(images, predictions):
        h, w = image.shape[-2:]
        boxes = pred["boxes"]
        assert len(boxes) > 0  # score threshold 0: something is returned, so the check bites
        assert boxes.min() >= 0 and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert pred["labels"].max() < NUM_CLASSES


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_teacher_and_student_see_the_same_tensor_and_levels(arch):
    teacher, student = build(arch, "resnet34").eval(), build(arch, "resnet18").eval()
    images = [torch.rand(3, 90, 117), torch.rand(3, 70, 100)]
    t_list, _ = teacher.transform(images)
    s_list, _ = student.transform(images)
    assert torch.equal(t_list.tensors, s_list.tensors)
    assert t_list.tensors.shape == (2, 3, 96, 128)  # no resize despite min_size=800; padded to 32
    assert t_list.image_sizes == s_list.image_sizes == [(90, 117), (70, 100)]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(t_list.tensors[0, :, :90, :117], (images[0] - mean) / std)
    assert (t_list.tensors[1, :, 70:] == 0).all()  # padding
    t_feats, s_feats = teacher_features(teacher, images), teacher_features(student, images)
    assert list(t_feats) == list(s_feats) == LEVELS[arch]
    assert {k: v.shape for k, v in t_feats.items()} == {k: v.shape for k, v in s_feats.items()}


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_level_names_match_strides(arch):
    model = build(arch)
    taps, rename = detector_taps(model)
    assert taps == {"backbone": "backbone"} and list(rename.values()) == LEVELS[arch]
    assert detector_channels(model) == {name: 256 for name in LEVELS[arch]}
    feats = teacher_features(model, [torch.rand(3, 90, 117)])  # padded to 96 x 128
    for name, feat in feats.items():
        stride = 2 ** int(name[1:])
        assert feat.shape[-2:] == (math.ceil(96 / stride), math.ceil(128 / stride)), name


def test_extra_blocks_from_c5_and_p5():
    p5 = build("retinanet")
    c5 = build("retinanet", extra_blocks_from="c5")
    assert p5.backbone.fpn.extra_blocks.p6.in_channels == 256  # torchvision v1: P6 from FPN P5
    assert c5.backbone.fpn.extra_blocks.p6.in_channels == 512  # v2 / mmdet: P6 from C5 (resnet18)
    assert list(teacher_features(c5, [torch.rand(3, 64, 64)])) == LEVELS["retinanet"]
    with pytest.raises(ValueError, match="extra_blocks_from"):
        build("fasterrcnn", extra_blocks_from="c5")


def test_bad_arch_and_backbone_names():
    with pytest.raises(ValueError, match="did you mean.*retinanet"):
        build_detector("retinanett", "resnet18", NUM_CLASSES)
    with pytest.raises(ValueError, match="resnet50"):
        build_detector("fcos", "resnet5O", NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("fcos", "resnet18", 1)


def test_pretrained_backbone_from_local_file(tmp_path):
    classifier = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(classifier.state_dict(), path)
    model = build("retinanet", pretrained=path)
    body = model.backbone.body
    for name, tensor in body.state_dict().items():
        torch.testing.assert_close(tensor, classifier.state_dict()[name], rtol=0, atol=0, msg=name)
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # torchvision's rule with pretrained weights
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # default 3 trainable layers
    assert all(p.requires_grad for p in build("retinanet").backbone.body.parameters())  # random init: all 5

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsMismatchError, match="r34.pth") as err:
        build("retinanet", pretrained=tmp_path / "r34.pth")
    assert "unexpected in file" in str(err.value) and "layer1.2.conv1.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build("retinanet", pretrained=tmp_path / "nope.pth")


def test_checkpoint_strict_load_and_mismatch_errors(tmp_path):
    source = build("retinanet")
    path = tmp_path / "retinanet_r18.pt"
    torch.save({"model": source.state_dict(), "step": torch.tensor(3)}, path)  # nested under 'model'
    loaded = build("retinanet", checkpoint=path)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    # a BatchNorm2d checkpoint loads into a FrozenBatchNorm2d build (num_batches_tracked ignored)
    frozen = build("retinanet", checkpoint=path, frozen_bn=True)
    assert torch.equal(frozen.backbone.body.bn1.running_var, source.backbone.body.bn1.running_var)

    with pytest.raises(WeightsMismatchError) as err:  # another backbone: keys differ
        build("retinanet", "resnet34", checkpoint=path)
    message = str(err.value)
    assert "retinanet_r18.pt" in message and "retinanet with resnet34" in message
    assert "missing in file" in message and "backbone.body.layer1.2.conv1.weight" in message
    with pytest.raises(WeightsMismatchError) as err:  # another architecture
        build("fcos", checkpoint=path)
    assert "fcos" in str(err.value) and "unexpected in file" in str(err.value)
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch \(2\).*cls_logits.weight"):
        build_detector("retinanet", "resnet18", 5, checkpoint=path)  # another number of classes


def test_load_state_dict_file_layouts(tmp_path):
    state = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    assert load_state_dict_file(tmp_path / "ddp.pt").keys() == state.keys()
    torch.save({"student": state, "teacher": {"x": torch.ones(1)}}, tmp_path / "nested.pt")
    assert load_state_dict_file(tmp_path / "nested.pt").keys() == state.keys()
    assert load_state_dict_file(tmp_path / "nested.pt", key="teacher").keys() == {"x"}
    with pytest.raises(KeyError, match="nope"):
        load_state_dict_file(tmp_path / "nested.pt", key="nope")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_state_dict_file(tmp_path / "bad.pt")

    torch.save({"obj": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "pickle.pt")


def test_inherit_fpn_and_head_from_larger_teacher():
    teacher, student = build("retinanet", "resnet34"), build("retinanet", "resnet18")
    copied, skipped = inherit_weights(student, teacher)
    assert copied and not skipped  # r18 and r34 share FPN input channels: everything fits
    assert any(n.startswith("backbone.fpn.") for n in copied) and any(n.startswith("head.") for n in copied)
    assert not any(n.startswith("backbone.body.") for n in copied)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name in copied:
        assert torch.equal(s_state[name], t_state[name]), name
    assert not torch.equal(s_state["backbone.body.conv1.weight"], t_state["backbone.body.conv1.weight"])

    # Faster R-CNN from a resnet50 teacher into resnet18: FPN laterals differ (C2-C5 channels)
    t_frcnn, s_frcnn = build("fasterrcnn", "resnet50"), build("fasterrcnn", "resnet18")
    report = inherit_weights(s_frcnn, t_frcnn)
    assert "backbone.fpn.inner_blocks.0.0.weight" in report.skipped
    assert "shape" in report.skipped["backbone.fpn.inner_blocks.0.0.weight"]
    assert "rpn.head.conv.0.0.weight" in report.copied and "roi_heads.box_head.fc6.weight" in report.copied


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_teacher_features_equal_student_hooks(arch):
    model = build(arch).eval()
    images, _ = images_and_targets()
    with student_taps(model) as taps, torch.no_grad():
        model(images)  # full forward: head, NMS and all
        hooked = taps.features()
    direct = teacher_features(model, images)
    assert list(hooked) == list(direct) == LEVELS[arch]
    for name in direct:
        assert torch.equal(hooked[name], direct[name]), name
    model.train()
    teacher_features(model, images)
    assert model.training  # mode restored


def test_student_taps_keep_gradients_in_training_forward():
    model = build("fcos").train()
    images, targets = images_and_targets()
    taps = student_taps(model)
    losses = model(images, targets)
    feats = taps.features()
    assert list(feats) == LEVELS["fcos"] and all(f.requires_grad for f in feats.values())
    (sum(losses.values()) + sum(f.square().mean() for f in feats.values())).backward()
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    taps.remove()


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_torchvision_builder_state_dicts_load_strictly(arch):
    """Same modules and names as torchvision's v1 builders: their COCO checkpoints can be teachers."""
    from torchvision.models import detection

    from acamkd.models import load_weights_strict

    builder = {"retinanet": detection.retinanet_resnet50_fpn, "fasterrcnn": detection.fasterrcnn_resnet50_fpn}[arch]
    reference = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    ours = build_detector(arch, "resnet50", 91, frozen_bn=True).eval()  # COCO files hold FrozenBN weights
    load_weights_strict(ours, reference.state_dict(), "torchvision builder", arch)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        mine, theirs = ours.backbone(x), reference.backbone(x)
    assert list(mine) == list(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key])
