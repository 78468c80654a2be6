"""``mimic`` (FitNet-style feature mimicking) against a plain line-by-line reference.

The contract (level names, errors, state dict, inspect, options) is covered by
``tests/test_method_contract.py``, parametrised over every registered method.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from acamkd.config import ConfigError, load_config
from acamkd.methods import available, build, options_class, parse_options
from acamkd.methods.mimic import Mimic, MimicOptions

TEACHER_CHANNELS = {"p3": 5, "p4": 3}
STUDENT_CHANNELS = {"p3": 2, "p4": 4}


def reference_mse(teacher, student, weight, bias):
    """``mean over (b, c, h, w) of (F_T - (W F_S + b))^2`` with explicit loops (same grid)."""
    B, C_t, H, W = teacher.shape
    C_s = student.shape[1]
    total = teacher.new_zeros(())
    for b in range(B):
        for c in range(C_t):
            for y in range(H):
                for x in range(W):
                    aligned = bias[c]
                    for k in range(C_s):
                        aligned = aligned + weight[c, k, 0, 0] * student[b, k, y, x]
                    total = total + (teacher[b, c, y, x] - aligned) ** 2
    return total / (B * C_t * H * W)


def make_feats(batch=2, grids=None, dtype=torch.float64, seed=1, requires_grad=True):
    grids = grids or {"p3": ((4, 3), (4, 3)), "p4": ((2, 2), (2, 2))}
    gen = torch.Generator().manual_seed(seed)
    teacher = {n: torch.randn(batch, c, *grids[n][0], generator=gen, dtype=dtype) for n, c in TEACHER_CHANNELS.items()}
    student = {n: torch.randn(batch, c, *grids[n][1], generator=gen, dtype=dtype, requires_grad=requires_grad)
               for n, c in STUDENT_CHANNELS.items()}
    return teacher, student


def test_registered_with_its_options():
    assert "mimic" in available()
    assert options_class("mimic") is MimicOptions
    assert parse_options("mimic", {"weight": 2}).weight == 2
    assert isinstance(build("mimic", teacher_channels={"p3": 4}), Mimic)


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_matches_the_line_by_line_reference_values_and_gradients(weight):
    method = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, weight=weight).double()
    teacher, student = make_feats()
    losses = method(teacher, student)
    assert sorted(losses) == ["p3.mse", "p4.mse"]
    sum(losses.values()).backward()
    for name in TEACHER_CHANNELS:
        conv = method.level(name)
        s = student[name].detach().clone().requires_grad_(True)
        w = conv.weight.detach().clone().requires_grad_(True)
        b = conv.bias.detach().clone().requires_grad_(True)
        ref = weight * reference_mse(teacher[name], s, w, b)
        ref.backward()
        assert losses[f"{name}.mse"].dtype == torch.float64
        torch.testing.assert_close(losses[f"{name}.mse"], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(student[name].grad, s.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv.bias.grad, b.grad, rtol=1e-10, atol=1e-12)
    stats = method.statistics()
    for name in TEACHER_CHANNELS:  # the unweighted MSE
        assert stats[f"{name}.mse"] == pytest.approx(losses[f"{name}.mse"].item() / weight, rel=1e-12)


def reference_pearson_loss(teacher, aligned):
    """``mean over (b, c) of 2 (1 - r_bc)``: one minus the Pearson correlation of the teacher's and
    the aligned student's maps of channel c in image b, written with explicit sums; equal to the
    MSE of the two standardised maps up to the variance epsilon."""
    B, C = teacher.shape[:2]
    total = teacher.new_zeros(())
    for b in range(B):
        for c in range(C):
            t, s = teacher[b, c].flatten(), aligned[b, c].flatten()
            t, s = t - t.sum() / t.numel(), s - s.sum() / s.numel()
            r = (t * s).sum() / ((t * t).sum().sqrt() * (s * s).sum().sqrt())
            total = total + 2 * (1 - r)
    return total / (B * C)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_standardised_mimic_is_one_minus_the_pearson_correlation(weight):
    # PKD's identity: standardise both maps, then their mean squared difference is 2 (1 - r).
    method = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, weight=weight, feature_norm="standardise").double()
    teacher, student = make_feats(grids={"p3": ((6, 5), (6, 5)), "p4": ((4, 4), (4, 4))})
    teacher = {n: 50.0 * t + 7.0 for n, t in teacher.items()}  # large, offset features: no effect
    losses = method(teacher, student)
    for name in TEACHER_CHANNELS:
        conv = method.level(name)
        aligned = F.conv2d(student[name].detach(), conv.weight.detach(), conv.bias.detach())
        ref = weight * reference_pearson_loss(teacher[name], aligned)
        # eps = 1e-5 in the variance: relative effect ~1e-5 / var on unit-scale maps
        torch.testing.assert_close(losses[f"{name}.mse"].detach(), ref, rtol=1e-4, atol=1e-6)
        inspected = method.inspect(teacher, student)[name]["aligned_student"]
        torch.testing.assert_close(inspected.mean((2, 3)), torch.zeros(2, TEACHER_CHANNELS[name], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(inspected.var((2, 3), unbiased=False),
                                   torch.ones(2, TEACHER_CHANNELS[name], dtype=torch.float64), rtol=1e-3, atol=0)
    sum(losses.values()).backward()
    assert all(torch.isfinite(student[n].grad).all() and student[n].grad.abs().sum() > 0 for n in student)


def test_standardised_mimic_does_not_depend_on_the_teacher_scale_or_the_batch():
    teacher, student = make_feats(batch=3, requires_grad=False)
    torch.manual_seed(0)
    method = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, feature_norm="standardise").double()
    base = method(teacher, student)
    scaled = method({n: 1e3 * t - 40.0 for n, t in teacher.items()}, student)
    for key in base:
        torch.testing.assert_close(scaled[key], base[key], rtol=1e-4, atol=0)  # eps / var ~ 1e-5
    # per image statistics: an image's loss is the same alone or in a batch
    alone = [method({n: t[i:i + 1] for n, t in teacher.items()}, {n: s[i:i + 1] for n, s in student.items()})
             for i in range(3)]
    for key in base:
        torch.testing.assert_close(base[key], sum(a[key] for a in alone) / 3, rtol=1e-10, atol=0)


def test_the_student_is_resized_to_the_teacher_grid_first():
    grids = {"p3": ((4, 6), (2, 3)), "p4": ((3, 3), (5, 4))}  # up- and downsampling
    method = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS).double()
    teacher, student = make_feats(grids=grids)
    losses = method(teacher, student)
    for name in TEACHER_CHANNELS:
        conv = method.level(name)
        resized = F.interpolate(student[name].detach(), size=teacher[name].shape[-2:], mode="bilinear",
                                align_corners=False)
        ref = reference_mse(teacher[name], resized, conv.weight.detach(), conv.bias.detach())
        torch.testing.assert_close(losses[f"{name}.mse"].detach(), ref, rtol=1e-12, atol=1e-12)
        aligned = method.inspect(teacher, student)[name]["aligned_student"]
        assert aligned.shape == teacher[name].shape and not aligned.requires_grad
    sum(losses.values()).backward()
    assert all(student[n].grad is not None and student[n].grad.abs().sum() > 0 for n in student)


def test_the_loss_scales_with_the_weight_and_zero_turns_it_off():
    teacher, student = make_feats(requires_grad=False)
    torch.manual_seed(0)
    one = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, weight=1.0).double()(teacher, student)
    torch.manual_seed(0)
    three = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, weight=3.0).double()(teacher, student)
    torch.manual_seed(0)
    zero = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS, weight=0.0).double()(teacher, student)
    for key in one:
        torch.testing.assert_close(three[key], 3.0 * one[key], rtol=1e-12, atol=0)
        assert zero[key].item() == 0.0


@pytest.mark.parametrize("dtype,autocast", [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                            (torch.float16, True)],
                         ids=["fp16", "bf16", "bf16-autocast", "fp16-in-bf16-autocast"])
def test_half_inputs_are_computed_in_fp32(dtype, autocast):
    method = Mimic(TEACHER_CHANNELS, STUDENT_CHANNELS)
    teacher, student = make_feats(dtype=torch.float32, requires_grad=False)
    # teacher values up to ~1e3: their squares (~1e6) overflow fp16 (max 65504), fine in fp32
    teacher = {n: (t * 300).to(dtype) for n, t in teacher.items()}
    student_half = {n: s.to(dtype).requires_grad_(True) for n, s in student.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = method(teacher, student_half)
    expected = method({n: t.float() for n, t in teacher.items()},
                      {n: s.detach().float() for n, s in student_half.items()})
    for key, value in losses.items():
        assert value.dtype == torch.float32 and math.isfinite(value.item()), key
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=0)
    sum(losses.values()).backward()
    for name, s in student_half.items():
        assert s.grad is not None and s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all(), name
    assert method.level("p3").weight.grad.dtype == torch.float32


def test_options_are_checked():
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="weight"):
            Mimic(TEACHER_CHANNELS, weight=bad)
    assert MimicOptions().weight == 1.0
    with pytest.raises(ValueError, match="feature_norm"):
        Mimic(TEACHER_CHANNELS, feature_norm="standardize")
    assert MimicOptions().feature_norm == "none"


def test_a_config_can_select_mimic_and_checks_its_options():
    base = ["method.name=mimic", "method.options={}", "teacher.checkpoint=null"]
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes_det_acam.yaml"
    cfg = load_config(demo, [*base, "method.options.weight=0.5"])
    assert cfg.method.options == {"check_finite": True, "weight": 0.5, "feature_norm": "none"}
    with pytest.raises(ConfigError, match="method.options.weight"):
        load_config(demo, [*base, "method.options.weight=-1"])
