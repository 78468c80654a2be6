"""The multi-level ACAM method: loss dict, statistics, inspect, registry, level names, and
bf16 autocast on CPU."""
from __future__ import annotations

import pytest
import torch

import acamkd
from acamkd.methods import ACAM, ACAMLevelOutput, DistillMethod, available, build
from acamkd.methods.acam import PAPER_MODE
from acamkd.methods.acam_reference import acam_level_plain

from _acam_helpers import make_feats, make_level, mean_offdiag_dice

TEACHER_CHANNELS = {"p3": 8, "p4": 6, "p5": 19}
STUDENT_CHANNELS = {"p3": 4, "p4": 6, "p5": 7}
GRIDS = {"p3": ((5, 7), (5, 7)), "p4": ((3, 4), (2, 2)), "p5": ((1, 1), (1, 1))}  # teacher, student


def make_acam(teacher_channels=TEACHER_CHANNELS, student_channels=STUDENT_CHANNELS, **options):
    """The paper mode (compared with make_level's levels, whose defaults are the paper's)."""
    torch.manual_seed(0)
    options = {"num_masks": 3, "init_std": 0.5, **PAPER_MODE, **options}
    return ACAM(teacher_channels, student_channels, **options)


def make_inputs(batch=2, seed=1, requires_grad=False, names=None):
    teacher, student = {}, {}
    for i, level in enumerate(TEACHER_CHANNELS):
        t, s = make_feats(batch, TEACHER_CHANNELS[level], STUDENT_CHANNELS[level], *GRIDS[level], seed=seed + i,
                          requires_grad=requires_grad)
        name = level if names is None else names[level]
        teacher[name], student[name] = t, s
    return teacher, student


def test_acam_returns_only_a_dict_of_weighted_scalars():
    method = make_acam()
    teacher, student = make_inputs()
    losses = method(teacher, student)
    assert isinstance(method, DistillMethod)
    assert type(losses) is dict
    assert set(losses) == {f"{level}.{kind}" for level in TEACHER_CHANNELS for kind in ("channel", "spatial", "diversity")}
    for key, value in losses.items():
        assert isinstance(value, torch.Tensor) and value.shape == () and value.dtype == torch.float32, key
        assert value.requires_grad and torch.isfinite(value) and value.item() > 0, key


@pytest.mark.parametrize("masks,kinds", [("spatial", {"spatial", "diversity"}), ("channel", {"channel", "diversity"})])
def test_acam_keys_follow_the_mask_families(masks, kinds):
    losses = make_acam(masks=masks)(*make_inputs())
    assert set(losses) == {f"{level}.{kind}" for level in TEACHER_CHANNELS for kind in kinds}


def test_acam_losses_are_the_per_level_losses():
    method = make_acam(query="student", channel_mask="article", alpha=0.5, lam=2.0)
    teacher, student = make_inputs()
    losses = method(teacher, student)
    total = 0.0
    for name in TEACHER_CHANNELS:
        level = method.level(name)
        assert (level.query, level.channel_mask, level.alpha, level.lam) == ("student", "article", 0.5, 2.0)
        assert (level.teacher_channels, level.student_channels) == (TEACHER_CHANNELS[name], STUDENT_CHANNELS[name])
        own = level(teacher[name], student[name]).losses
        ref = acam_level_plain(level, teacher[name], student[name]).losses
        for kind in own:
            assert losses[f"{name}.{kind}"].item() == pytest.approx(own[kind].item(), rel=1e-6)
            assert losses[f"{name}.{kind}"].item() == pytest.approx(ref[kind].item(), rel=1e-5)
        total += sum(value.item() for value in own.values())
    assert sum(losses.values()).item() == pytest.approx(total, rel=1e-6)


def test_acam_levels_are_independent_module_sets():
    method = make_acam()
    ids = [{id(p) for p in method.level(name).parameters()} for name in TEACHER_CHANNELS]
    assert all(a.isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert sum(p.numel() for p in method.parameters()) == sum(
        p.numel() for name in TEACHER_CHANNELS for p in method.level(name).parameters())
    teacher, student = make_inputs(requires_grad=True)
    losses = method(teacher, student)
    sum(v for k, v in losses.items() if k.startswith("p3.")).backward()
    assert all(p.grad is not None for p in method.level("p3").parameters())
    assert all(p.grad is None for name in ("p4", "p5") for p in method.level(name).parameters())
    assert student["p3"].grad is not None and student["p4"].grad is None


def test_statistics_match_inspect():
    method = make_acam()
    assert method.statistics() == {}
    teacher, student = make_inputs()
    method(teacher, student)
    stats = method.statistics()
    outputs = method.inspect(teacher, student)
    expected_keys = {f"{level}.{key}" for level in TEACHER_CHANNELS
                     for key in ("spatial_mask_mean", "channel_mask_mean", "spatial_dice", "channel_dice")}
    assert expected_keys <= set(stats)  # plus the diagnostics (on by default: tests/test_acam_diagnostics.py)
    assert {f"{level}.spatial_participation" for level in TEACHER_CHANNELS} <= set(stats)
    for name, out in outputs.items():
        for key in ("spatial_mask_mean", "channel_mask_mean", "spatial_dice", "channel_dice"):
            assert type(stats[f"{name}.{key}"]) is float
        assert stats[f"{name}.spatial_mask_mean"] == pytest.approx(out.spatial_masks.double().mean().item(), rel=1e-6)
        assert stats[f"{name}.channel_mask_mean"] == pytest.approx(out.channel_masks.double().mean().item(), rel=1e-6)
        assert stats[f"{name}.spatial_dice"] == pytest.approx(mean_offdiag_dice(out.spatial_masks), rel=1e-5)
        assert stats[f"{name}.channel_dice"] == pytest.approx(mean_offdiag_dice(out.channel_masks), rel=1e-5)
    # The spatial masks are not all alike (init_std 0.5), so the statistics carry information.
    assert stats["p3.spatial_dice"] < 0.99


def test_statistics_describe_the_last_call():
    method = make_acam(masks="spatial")
    first_inputs, second_inputs = make_inputs(seed=1), make_inputs(seed=11)
    method(*first_inputs)
    first = method.statistics()
    method(*second_inputs)
    second = method.statistics()
    assert {f"{level}.{key}" for level in TEACHER_CHANNELS for key in ("spatial_mask_mean", "spatial_dice")} <= set(second)
    assert not any("channel" in key for key in second)  # the channel family is not built
    assert second != first
    outputs = method.inspect(*second_inputs)
    for name, out in outputs.items():
        assert second[f"{name}.spatial_mask_mean"] == pytest.approx(out.spatial_masks.double().mean().item(), rel=1e-6)
    method.inspect(*first_inputs)  # inspect does not touch the logged statistics
    assert method.statistics() == second


def test_inspect_outputs_and_shapes():
    method = make_acam(num_masks=4)
    teacher, student = make_inputs(requires_grad=True)
    outputs = method.inspect(teacher, student)
    assert list(outputs) == list(TEACHER_CHANNELS)
    losses = method(teacher, student)
    for name, out in outputs.items():
        assert isinstance(out, ACAMLevelOutput)
        batch, channels, (h, w) = 2, TEACHER_CHANNELS[name], GRIDS[name][0]
        assert out.channel_masks.shape == (batch, 4, channels)
        assert out.spatial_masks.shape == (batch, 4, h, w)
        assert out.fused.shape == (batch, channels, h, w)
        assert out.aligned_student.shape == (batch, channels, h, w)
        for tensor in (out.channel_masks, out.spatial_masks, out.fused, out.aligned_student, *out.losses.values()):
            assert not tensor.requires_grad
        for kind, value in out.losses.items():
            assert value.item() == pytest.approx(losses[f"{name}.{kind}"].item(), rel=1e-6)


def test_build_by_name():
    assert "acam" in available()
    method = build("acam", teacher_channels={"p3": 8}, student_channels={"p3": 5}, num_masks=2, mask_norm="energy")
    assert isinstance(method, ACAM)
    level = method.level("p3")
    assert (level.num_masks, level.mask_norm, level.student_channels) == (2, "energy", 5)
    teacher, student = make_feats(1, 8, 5, (3, 3), requires_grad=False)
    # the default mode (adversarial masks with the mass floor): the floor is a loss of its own
    assert set(method({"p3": teacher}, {"p3": student})) == {"p3.channel", "p3.spatial", "p3.diversity",
                                                             "p3.mass_floor"}
    assert (level.mask_grad, level.feature_norm, level.fusion_student_grad) == ("adversarial", "standardise", False)
    paper = build("acam", teacher_channels={"p3": 8}, student_channels={"p3": 5}, num_masks=2, **PAPER_MODE)
    assert set(paper({"p3": teacher}, {"p3": student})) == {"p3.channel", "p3.spatial", "p3.diversity"}
    assert acamkd.build is build


def test_build_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown distillation method 'fitnet': known methods are \[.*'acam'.*\]"):
        build("fitnet", teacher_channels={"p3": 8})
    with pytest.raises(KeyError, match=r"did you mean \['acam'\]"):
        build("acm")


def test_level_names_with_dots():
    names = {"p3": "neck.fpn.p3", "p4": "neck.fpn.p4", "p5": "logits"}
    method = make_acam({names[k]: v for k, v in TEACHER_CHANNELS.items()},
                       {names[k]: v for k, v in STUDENT_CHANNELS.items()})
    teacher, student = make_inputs(names=names, requires_grad=True)
    losses = method(teacher, student)
    assert set(losses) == {f"{names[level]}.{kind}" for level in TEACHER_CHANNELS
                           for kind in ("channel", "spatial", "diversity")}
    assert "neck.fpn.p3.spatial_dice" in method.statistics()
    assert set(method.inspect(teacher, student)) == set(names.values())
    assert method.level("neck.fpn.p3").teacher_channels == 8
    assert any(key.startswith("levels.neck__fpn__p3.") for key in method.state_dict())
    sum(losses.values()).backward()
    assert student["neck.fpn.p3"].grad is not None
    # Same parameters, same numbers as with plain names.
    plain = make_acam()(*make_inputs())
    for level, name in names.items():
        for kind in ("channel", "spatial", "diversity"):
            assert losses[f"{name}.{kind}"].item() == pytest.approx(plain[f"{level}.{kind}"].item(), rel=1e-6)


def test_state_dict_round_trip():
    method = make_acam()
    other = ACAM(TEACHER_CHANNELS, STUDENT_CHANNELS, num_masks=3, init_std=0.5, **PAPER_MODE)  # another random init
    inputs = make_inputs()
    assert method(*inputs)["p3.spatial"].item() != other(*inputs)["p3.spatial"].item()
    other.load_state_dict(method.state_dict())
    for key, value in method(*inputs).items():
        assert torch.equal(value, other(*inputs)[key]), key


# -------------------------------------------------------------------------- bf16 autocast
def test_level_bf16_autocast_matches_fp32():
    level = make_level(19, 7, 6)
    teacher, student = make_feats(2, 19, 7, (6, 5), (3, 3))
    reference = level(teacher, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = level(teacher, student)
    assert set(out.losses) == set(reference.losses)
    for key, value in out.losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference.losses[key].item(), rel=5e-2), key
    assert out.fused.dtype == torch.bfloat16  # the attention did run in bf16
    assert out.aligned_student.dtype == torch.float32 and out.spatial_masks.dtype == torch.float32
    torch.testing.assert_close(out.aligned_student, reference.aligned_student)  # alignment stays fp32
    sum(out.losses.values()).backward()
    for name, param in level.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().max() > 0


def test_acam_bf16_autocast_matches_fp32():
    method = make_acam(num_masks=6)
    teacher, student = make_inputs(requires_grad=True)
    reference = {k: v.item() for k, v in method(teacher, student).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = method(teacher, student)
    assert set(losses) == set(reference)
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference[key], rel=5e-2), key
    stats = method.statistics()
    assert all(isinstance(v, float) and v == v for v in stats.values())
    sum(losses.values()).backward()
    for name in TEACHER_CHANNELS:
        assert torch.isfinite(student[name].grad).all() and student[name].grad.abs().max() > 0, name


def test_bf16_features_without_autocast():
    """bf16 feature maps (e.g. from a bf16 teacher) are upcast: losses are fp32 and close."""
    level = make_level(8, 4, 3)
    teacher, student = make_feats(2, 8, 4, (4, 4), requires_grad=False)
    reference = level(teacher.bfloat16().float(), student.bfloat16().float()).losses
    out = level(teacher.bfloat16(), student.bfloat16())
    for key, value in out.losses.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-5), key
