"""FeatureTaps on arbitrary modules: tensors, dicts, sequences, aliases and renames, errors,
hook removal, stale records; and ACAM-KD distilling a plain torchvision classifier via taps."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import acamkd
from acamkd.models import FeatureTaps


def resnet18(num_classes: int = 4) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


class Pyramid(nn.Module):
    """Returns an OrderedDict of levels, like torchvision's FPN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(a=self.a(x), b=self.b(x))


class DictAndTuple(nn.Module):
    """Children returning a dict and a tuple, and a branch that runs only on request."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pyramid = Pyramid()
        self.pair = nn.Identity()
        self.extra = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor, with_extra: bool = False):
        x = self.stem(x)
        out = self.pyramid(x)
        self.pair((out["a"], [out["b"], None]))
        return self.extra(x) if with_extra else out


def test_classifier_taps_match_a_manual_forward():
    model = resnet18().eval()
    x = torch.rand(2, 3, 64, 64)
    with FeatureTaps(model, ["layer3", "layer4"]) as taps:
        model(x)
        feats = taps.features()
    assert list(feats) == ["layer3", "layer4"]
    h = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(feats["layer3"], model.layer3(h))
    assert feats["layer4"].shape == (2, 512, 2, 2)


def test_dict_and_sequence_outputs_flatten_with_aliases_and_renames():
    model = DictAndTuple()
    taps = FeatureTaps(model, {"fpn": "pyramid", "pair": "pair", "stem": "stem"},
                       rename={"fpn.a": "p2", "fpn.b": "p3"})
    out = model(torch.rand(1, 3, 16, 16))
    feats = taps.features()
    assert set(feats) == {"p2", "p3", "pair.0", "pair.1.0", "stem"}  # None in the tuple is dropped
    assert torch.equal(feats["p2"], out["a"]) and torch.equal(feats["p3"], out["b"])
    assert torch.equal(feats["pair.1.0"], out["b"]) and feats["p3"].shape == (1, 8, 8, 8)

    # torchvision's own dict-returning module: IntermediateLayerGetter (an OrderedDict)
    getter = torchvision.models._utils.IntermediateLayerGetter(resnet18(), {"layer2": "c3", "layer3": "c4"})
    wrapper = nn.Sequential(OrderedDict(body=getter))
    with FeatureTaps(wrapper, {"bb": "body"}, rename={"bb.c4": "level4"}) as taps:
        wrapper(torch.rand(1, 3, 64, 64))
        assert {k: tuple(v.shape) for k, v in taps.features().items()} == {
            "bb.c3": (1, 128, 8, 8), "level4": (1, 256, 4, 4)}


def test_unknown_tap_name_lists_close_module_names():
    with pytest.raises(KeyError, match=r"'layr3'.*closest module names.*'layer3'"):
        FeatureTaps(resnet18(), ["layer2", "layr3"])
    with pytest.raises(KeyError, match=r"feat.*'layer3.1.conv'.*layer3.1.conv1"):
        FeatureTaps(resnet18(), {"feat": "layer3.1.conv"})
    with pytest.raises(TypeError, match=r"\['layer3'\]"):
        FeatureTaps(resnet18(), "layer3")
    with pytest.raises(ValueError):
        FeatureTaps(resnet18(), [])


def test_hooks_are_removed():
    model = resnet18()
    before = (len(model._forward_pre_hooks), len(model.layer3._forward_hooks))
    with FeatureTaps(model, ["layer3"]) as taps:
        assert len(model.layer3._forward_hooks) == before[1] + 1
    assert (len(model._forward_pre_hooks), len(model.layer3._forward_hooks)) == before
    model(torch.rand(2, 3, 32, 32))
    assert taps.features() == {}
    taps.remove()  # idempotent


def test_stale_features_never_leak():
    model = DictAndTuple()
    taps = FeatureTaps(model, ["extra", "stem"])
    model(torch.rand(1, 3, 8, 8), with_extra=True)
    assert set(taps.features()) == {"extra", "stem"}
    model(torch.rand(1, 3, 8, 8))  # 'extra' does not run this time: its old output must be gone
    assert set(taps.features()) == {"stem"}
    taps.clear()
    assert taps.features() == {}
    first = taps.features()
    model(torch.rand(1, 3, 8, 8))
    assert first == {}  # features() returns a copy, not a live view


def test_distil_a_torchvision_classifier_through_taps():
    """ACAM-KD between two plain torchvision classifiers: nothing of ours but the taps and the method."""
    teacher = resnet18().eval().requires_grad_(False)
    student = nn.Sequential(OrderedDict(  # a different student: resnet18's stages with a tiny head
        trunk=torchvision.models.resnet18(weights=None), head=nn.Linear(1000, 4)))
    t_taps = FeatureTaps(teacher, {"feat": "layer3"})
    s_taps = FeatureTaps(student, {"feat": "trunk.layer3"})
    method = acamkd.build("acam", teacher_channels={"feat": 256}, student_channels={"feat": 256}, num_masks=2)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.05, momentum=0.9)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        teacher(x)
    t_feats = t_taps.features()
    history = []
    for _ in range(6):
        student(x)
        losses = method(t_feats, s_taps.features())
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert set(losses) == {"feat.channel", "feat.spatial", "feat.diversity", "feat.mass_floor"}  # the default mode
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.8 * history[0], history
    t_taps.remove()
    s_taps.remove()


def test_tap_channels_probes_once_in_eval_mode_and_restores_training():
    import torch
    import torchvision

    from acamkd.models.taps import tap_channels

    model = torchvision.models.resnet18(weights=None).train()
    channels = tap_channels(model, ["layer2", "layer4"], torch.randn(1, 3, 64, 64))
    assert channels == {"layer2": 128, "layer4": 512}
    assert model.training and not model._forward_hooks and not model.layer2._forward_hooks  # hooks removed
