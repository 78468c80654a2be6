"""Segmenter builders: shapes at full resolution and at the stride-8 tap, output stride 8, the full
ResNet-18 in PSPNet-R18, local pretrained / checkpoint weights, backward with ignore 255."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from acamkd.models import FeatureTaps, WeightsMismatchError
from acamkd.models.segmentation import (
    SEGMENTER_ARCHS,
    Segmenter,
    build_segmenter,
    segmenter_taps,
)

K = 19
SMALL = [("deeplabv3", "resnet18"), ("deeplabv3", "mobilenet_v2"), ("pspnet", "resnet18")]


def stride8(n: int) -> int:
    return math.ceil(n / 8)


@pytest.mark.parametrize("arch,backbone", SMALL)
@pytest.mark.parametrize("size", [(64, 64), (65, 97)])
def test_full_resolution_logits_and_stride8_tap(arch, backbone, size):
    model = build_segmenter(arch, backbone, num_classes=K).eval()
    assert isinstance(model, Segmenter)
    x = torch.randn(2, 3, *size)
    with FeatureTaps(model, segmenter_taps(model, encoder=True, decoder=True)) as taps, torch.no_grad():
        out = model(x)
        feats = taps.features()
    h, w = stride8(size[0]), stride8(size[1])  # 65x97 -> 9x13: ceil(n / 8)
    assert out.shape == (2, K, *size)
    assert feats["logits"].shape == (2, K, h, w)
    assert feats["decoder"].shape[-2:] == (h, w)
    assert feats["encoder"].shape[-2:] == (h, w)  # deepest encoder stage is at output stride 8
    # forward == bilinear upsampling of the tapped logits
    up = F.interpolate(feats["logits"], size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, up)


def test_default_taps_are_the_logits():
    model = build_segmenter("deeplabv3", "mobilenet_v2")
    assert segmenter_taps(model) == {"logits": "classifier"}
    assert segmenter_taps(model, encoder=True)["encoder"] == "encoder.features.17"


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_encoder_output_stride_8(backbone):
    model = build_segmenter("deeplabv3", backbone).eval()
    with torch.no_grad():
        feats = model.encoder(torch.randn(2, 3, 64, 96))
    assert feats[-1].shape[-2:] == (8, 12)
    assert feats[-2].shape[-2:] == (8, 12)


def test_pspnet_uses_full_dilated_resnet18():
    model = build_segmenter("pspnet", "resnet18")
    enc = model.encoder
    assert hasattr(enc, "layer4") and enc.out_channels[-1] == 512
    assert enc.layer4[0].conv1.stride == (1, 1) and enc.layer4[0].conv1.dilation == (4, 4)
    assert enc.layer3[0].conv1.dilation == (2, 2)
    with torch.no_grad():
        deepest = enc.eval()(torch.randn(2, 3, 64, 64))[-1]
    assert deepest.shape == (2, 512, 8, 8)
    assert [b[0].output_size for b in model.decoder.branches] == [1, 2, 3, 6]
    # CIRKD's (and mmseg's) PSPNet-R18: 1024 -> 128 bottleneck, the classifier reads 128 channels
    assert model.decoder.bottleneck[0].in_channels == 1024 and model.decoder.out_channels == 128
    assert model.classifier[1].in_channels == 128


def test_resnet101_teacher_builds():  # built once; one tiny forward
    model = build_segmenter("deeplabv3", "resnet101").eval()
    assert model.encoder.out_channels[-1] == 2048
    with FeatureTaps(model, segmenter_taps(model)) as taps, torch.no_grad():
        out = model(torch.randn(1, 3, 33, 40))
        logits = taps.features()["logits"]
    assert out.shape == (1, K, 33, 40) and logits.shape == (1, K, 5, 5)


@pytest.mark.parametrize("backbone,width,encoder_out", [("resnet18", 512, 512), ("mobilenet_v2", 128, 320)])
def test_deeplabv3_head_is_cirkds(backbone, width, encoder_out):
    """ASPP and head at 512 channels (128 for MobileNetV2, whose encoder ends at 320 channels),
    dropout 0.1 before the 1x1 classifier (CIRKD models/deeplabv3.py, models/deeplabv3_mobile.py)."""
    model = build_segmenter("deeplabv3", backbone).eval()
    convs = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.out_channels for c in convs} == {width}
    assert model.encoder.out_channels[-1] == encoder_out
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 64, 64))[-1].shape == (1, encoder_out, 8, 8)
    assert isinstance(model.classifier[0], torch.nn.Dropout2d) and model.classifier[0].p == 0.1
    assert model.classifier[1].in_channels == width and model.classifier[1].out_channels == K


def test_mobilenet_v2_student_is_small():
    """CIRKD's DeepLabV3-MobileNetV2 has about 3M parameters (the 1280-channel conv and a 512-wide
    ASPP would make it 25M, larger than DeepLabV3-R18)."""
    mbv2 = sum(p.numel() for p in build_segmenter("deeplabv3", "mobilenet_v2").parameters())
    r18 = sum(p.numel() for p in build_segmenter("deeplabv3", "resnet18").parameters())
    assert 2.5e6 < mbv2 < 3.5e6 and r18 > 5 * mbv2


def test_auxiliary_head_on_resnets_only_and_only_in_training_outputs():
    r18 = build_segmenter("pspnet", "resnet18", num_classes=K)
    assert r18.aux is not None and r18.aux[0].in_channels == 256 and r18.aux[-1].out_channels == K
    assert build_segmenter("deeplabv3", "mobilenet_v2").aux is None
    assert build_segmenter("deeplabv3", "resnet18", aux_head=False).aux is None
    with pytest.raises(ValueError, match="mobilenet_v2 has no ResNet third stage"):
        build_segmenter("deeplabv3", "mobilenet_v2", aux_head=True)
    r18.eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        main, aux = r18.forward_train(x)
        assert torch.equal(main, r18(x))  # forward (inference, export) is the main head alone
    assert aux.shape == main.shape == (2, K, 40, 56) and not torch.equal(aux, main)
    # A model without the head has the same main-path keys, so weights move between them minus aux.*
    plain = build_segmenter("pspnet", "resnet18", num_classes=K, aux_head=False)
    assert set(plain.state_dict()) == {k for k in r18.state_dict() if not k.startswith("aux.")}


@pytest.mark.parametrize("arch,backbone", SMALL)
def test_backward_with_ignore_index(arch, backbone):
    model = build_segmenter(arch, backbone, num_classes=K).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, K, (2, 64, 64))
    target[:, :10] = 255
    loss = F.cross_entropy(model(x), target, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.classifier.parameters())


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_pretrained_from_local_torchvision_file(tmp_path, arch):
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv.state_dict(), path)
    model = build_segmenter(arch, "resnet18", pretrained=path)
    torch.testing.assert_close(model.encoder.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    torch.testing.assert_close(model.encoder.bn1.running_var, tv.bn1.running_var)


def test_pretrained_mobilenet_v2_torchvision_keys(tmp_path):
    tv = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mbv2.pth"
    torch.save(tv.state_dict(), path)
    model = build_segmenter("deeplabv3", "mobilenet_v2", pretrained=path)
    torch.testing.assert_close(model.encoder.features[5].conv[0][0].weight, tv.features[5].conv[0][0].weight)


def test_wrong_pretrained_file_names_it(tmp_path):
    path = tmp_path / "mobilenet_for_resnet.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="mobilenet_for_resnet.pth") as err:
        build_segmenter("pspnet", "resnet18", pretrained=path)
    assert "missing in file" in str(err.value) and "'conv1.weight'" in str(err.value)
    assert "unexpected in file" in str(err.value) and "features.0.0.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_segmenter("deeplabv3", "resnet18", pretrained=tmp_path / "nowhere.pth")


def test_checkpoint_round_trip_and_class_mismatch(tmp_path):
    model = build_segmenter("pspnet", "resnet18", num_classes=K)
    with torch.no_grad():
        model.classifier[1].weight.normal_()
    path = tmp_path / "psp.pt"
    torch.save({"model": model.state_dict()}, path)
    again = build_segmenter("pspnet", "resnet18", num_classes=K, checkpoint=path).eval()
    model.eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(WeightsMismatchError, match="psp.pt") as err:
        build_segmenter("pspnet", "resnet18", num_classes=7, checkpoint=path)
    assert "classifier.1.weight" in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown segmentation arch"):
        build_segmenter("unet", "resnet18")
    with pytest.raises(ValueError, match="supports backbones"):
        build_segmenter("pspnet", "resnet101")
    with pytest.raises(ValueError, match="output_stride"):
        build_segmenter("deeplabv3", "resnet18", output_stride=32)
    assert set(SEGMENTER_ARCHS) == {"deeplabv3", "pspnet"}


def test_inheritance_between_segmenters_copies_whole_parts_only():
    from acamkd.models import inherit_weights
    from acamkd.engine.segmentation import SegmentationTask

    prefixes, whole = SegmentationTask.inherit_prefixes, SegmentationTask.inherit_all_or_nothing
    teacher = build_segmenter("deeplabv3", "resnet101", num_classes=K)
    student = build_segmenter("deeplabv3", "resnet18", num_classes=K)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_weights(student, teacher, prefixes, whole)
    # ASPP branches read 2048 vs 512 channels: the decoder stays the student's own, BN statistics included;
    # the classifier (512 -> K) matches as a whole and is copied.
    assert report.copied and all(n.startswith("classifier.") for n in report.copied)
    for name, tensor in student.state_dict().items():
        if name.startswith("decoder."):
            assert torch.equal(tensor, before[name]), name
    assert any("all_or_nothing" in why for why in report.skipped.values())
    # tensor by tensor (the detection rule) would have copied the decoder's BatchNorms too
    partial = inherit_weights(build_segmenter("deeplabv3", "resnet18", num_classes=K), teacher, prefixes)
    assert any(n.startswith("decoder.") for n in partial.copied)
    psp = inherit_weights(build_segmenter("pspnet", "resnet18", num_classes=K), teacher, prefixes, whole)
    assert psp.copied == []  # nothing of PSPNet's head lines up with DeepLabV3's
