"""``cwd`` (channel-wise distillation, MMRazor's ``ChannelWiseDivergence``) against a plain
line-by-line reference and a KL computed by hand.

The contract (level names, errors, state dict, inspect, options) is covered by
``tests/test_method_contract.py``, parametrised over every registered method.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from acamkd.methods import available, build, options_class, parse_options
from acamkd.methods.base import OptionError
from acamkd.methods.cwd import CWD, PUBLISHED_CONSTANTS, CWDOptions

TEACHER_CHANNELS = {"p3": 3, "p4": 2}
STUDENT_CHANNELS = {"p3": 2, "p4": 2}  # p3 aligned by a 1x1 conv, p4 not (equal channels)


def reference_cwd(teacher, student, tau):
    """``tau^2 / (N C) * sum_{n,c} sum_p p_T log(p_T / p_S)`` with explicit loops: each channel's
    map a distribution over positions, ``p = exp(x_p / tau) / sum_q exp(x_q / tau)``."""
    N, C, H, W = teacher.shape
    total = teacher.new_zeros(())
    for n in range(N):
        for c in range(C):
            t = [teacher[n, c, y, x] / tau for y in range(H) for x in range(W)]
            s = [student[n, c, y, x] / tau for y in range(H) for x in range(W)]
            zt = sum(torch.exp(v) for v in t)
            zs = sum(torch.exp(v) for v in s)
            for vt, vs in zip(t, s):
                pt, ps = torch.exp(vt) / zt, torch.exp(vs) / zs
                total = total + pt * torch.log(pt / ps)
    return total * tau ** 2 / (N * C)


def reference_align(student, weight, bias):
    """``W F_S + b`` (1x1 conv) with explicit loops."""
    N, C_s, H, W = student.shape
    C_t = weight.shape[0]
    out = [[[[bias[o] + sum(weight[o, k, 0, 0] * student[n, k, y, x] for k in range(C_s)) for x in range(W)]
              for y in range(H)] for o in range(C_t)] for n in range(N)]
    return torch.stack([torch.stack([torch.stack([torch.stack(row) for row in ch]) for ch in img]) for img in out])


def make_feats(batch=2, grid=(3, 4), dtype=torch.float64, seed=1, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    teacher = {n: 2 * torch.randn(batch, c, *grid, generator=gen, dtype=dtype) for n, c in TEACHER_CHANNELS.items()}
    student = {n: torch.randn(batch, c, *grid, generator=gen, dtype=dtype, requires_grad=requires_grad)
               for n, c in STUDENT_CHANNELS.items()}
    return teacher, student


def test_registered_with_the_mmrazor_constants():
    assert "cwd" in available() and options_class("cwd") is CWDOptions
    defaults = CWDOptions()
    # open-mmlab/mmrazor @ 90c7af1 configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py: tau=1, weight 10
    assert (defaults.tau, defaults.weight) == (1.0, 10.0)
    assert PUBLISHED_CONSTANTS["detection_fpn"] == {"tau": 1.0, "weight": 10.0}
    # ... mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py: tau=1, weight 5
    assert PUBLISHED_CONSTANTS["segmentation_logits"] == {"tau": 1.0, "weight": 5.0}
    assert parse_options("cwd", {"tau": 4, "weight": 3}).tau == 4
    assert isinstance(build("cwd", teacher_channels={"p3": 4}), CWD)


def test_kl_by_hand_on_a_tiny_example():
    # one image, one channel, two positions: p_T = (1/4, 3/4), p_S = (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    for tau in (1.0, 2.0):
        method = CWD({"p": 1}, tau=tau, weight=1.0).double()
        teacher = torch.tensor([[[[0.0, tau * math.log(3.0)]]]], dtype=torch.float64)
        student = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
        got = method({"p": teacher}, {"p": student})["p.cwd"]
        assert got.item() == pytest.approx(tau ** 2 * kl, rel=1e-12)
    # N C normalisation: two identical images and two identical channels give the same value
    method = CWD({"p": 2}, weight=3.0).double()
    teacher = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 1, 1, 2).expand(2, 2, 1, 2)
    got = method({"p": teacher.contiguous()}, {"p": torch.zeros(2, 2, 1, 2, dtype=torch.float64)})["p.cwd"]
    assert got.item() == pytest.approx(3.0 * kl, rel=1e-12)


@pytest.mark.parametrize("tau,weight", [(1.0, 10.0), (4.0, 0.5)])
def test_matches_the_line_by_line_reference_values_and_gradients(tau, weight):
    method = CWD(TEACHER_CHANNELS, STUDENT_CHANNELS, tau=tau, weight=weight).double()
    assert method.level("p4").align is None and isinstance(method.level("p3").align, torch.nn.Conv2d)
    teacher, student = make_feats()
    losses = method(teacher, student)
    assert sorted(losses) == ["p3.cwd", "p4.cwd"]
    sum(losses.values()).backward()
    for name in TEACHER_CHANNELS:
        s = student[name].detach().clone().requires_grad_(True)
        align = method.level(name).align
        if align is not None:
            w = align.weight.detach().clone().requires_grad_(True)
            b = align.bias.detach().clone().requires_grad_(True)
            aligned = reference_align(s, w, b)
        else:
            aligned = s
        ref = weight * reference_cwd(teacher[name], aligned, tau)
        ref.backward()
        assert losses[f"{name}.cwd"].dtype == torch.float64
        torch.testing.assert_close(losses[f"{name}.cwd"], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(student[name].grad, s.grad, rtol=1e-10, atol=1e-12)
        if align is not None:
            torch.testing.assert_close(align.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(align.bias.grad, b.grad, rtol=1e-10, atol=1e-12)
    stats = method.statistics()  # unweighted
    for name in TEACHER_CHANNELS:
        assert stats[f"{name}.cwd"] == pytest.approx(losses[f"{name}.cwd"].item() / weight, rel=1e-12)


def test_equals_mmrazor_formula_written_with_library_ops():
    # ChannelWiseDivergence's sum(p_T log p_T - p_T log p_S) * tau^2 / (C N), independently of the loops
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 4, 6, dtype=torch.float64), torch.randn(3, 5, 4, 6, dtype=torch.float64)
    tau = 2.5
    t, s = teacher.view(-1, 24) / tau, student.view(-1, 24) / tau
    expected = 7.0 * (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum() * tau ** 2 / 15
    got = CWD({"x": 5}, tau=tau, weight=7.0).double()({"x": teacher}, {"x": student})["x.cwd"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_zero_for_a_perfect_student_and_invariant_to_per_channel_offsets():
    teacher, _ = make_feats(requires_grad=False)
    method = CWD({"p4": 2}).double()
    assert method({"p4": teacher["p4"]}, {"p4": teacher["p4"].clone()})["p4.cwd"].abs().item() < 1e-14
    offset = teacher["p4"] + torch.tensor([3.0, -7.0], dtype=torch.float64).view(1, 2, 1, 1)
    assert method({"p4": teacher["p4"]}, {"p4": offset})["p4.cwd"].abs().item() < 1e-12  # softmax ignores shifts
    assert list(method.parameters()) == []  # equal channels: no connector (MMRazor's CWD configs)


def test_the_student_is_resized_to_the_teacher_grid_first():
    method = CWD({"p": 2}, tau=2.0).double()
    teacher = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    student = torch.randn(2, 2, 2, 3, dtype=torch.float64)
    resized = F.interpolate(student, size=(4, 6), mode="bilinear", align_corners=False)
    expected = 10.0 * reference_cwd(teacher, resized, 2.0)
    torch.testing.assert_close(method({"p": teacher}, {"p": student})["p.cwd"], expected, rtol=1e-12, atol=1e-12)


def test_inspect_gives_per_channel_distributions():
    method = CWD(TEACHER_CHANNELS, STUDENT_CHANNELS, tau=2.0).double()
    teacher, student = make_feats()
    out = method.inspect(teacher, student)
    for name, c in TEACHER_CHANNELS.items():
        for key in ("teacher_distribution", "student_distribution"):
            dist = out[name][key]
            assert dist.shape == (2, c, 3, 4) and not dist.requires_grad
            torch.testing.assert_close(dist.sum((2, 3)), torch.ones(2, c, dtype=torch.float64))
        assert out[name]["aligned_student"].shape == (2, c, 3, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    torch.manual_seed(0)
    method = CWD(TEACHER_CHANNELS, STUDENT_CHANNELS, tau=1.0)
    teacher, student = make_feats(dtype=dtype, requires_grad=False)
    got = method(teacher, student)
    expected = method({n: t.float() for n, t in teacher.items()}, {n: s.float() for n, s in student.items()})
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast region: still fp32 math
        auto = method({n: t.float() for n, t in teacher.items()}, {n: s.float() for n, s in student.items()})
    for key in expected:
        assert auto[key].dtype == torch.float32
        torch.testing.assert_close(auto[key], expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("option,value", [("tau", 0.0), ("tau", -1.0), ("tau", float("nan")), ("weight", -1.0)])
def test_bad_options_are_named(option, value):
    with pytest.raises(OptionError, match=rf"^{option} "):
        CWDOptions(**{option: value})
    with pytest.raises(ValueError, match=rf"CWD level 'p3': {option} "):
        CWD({"p3": 4}, **{option: value})
