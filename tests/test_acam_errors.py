"""Bad input raises an error that names the offending argument (and, in ACAM, the level)."""
from __future__ import annotations

import re

import pytest
import torch

from acamkd.methods import ACAM, ACAMLevel
from acamkd.methods.acam import PAPER_MODE

from _acam_helpers import make_feats, make_level


def _acam(**options):
    return ACAM({"p3": 8, "p4": 6}, {"p3": 4, "p4": 6}, num_masks=2, **{**PAPER_MODE, **options})


def _acam_feats():
    t3, s3 = make_feats(2, 8, 4, (4, 5), requires_grad=False)
    t4, s4 = make_feats(2, 6, 6, (2, 3), requires_grad=False)
    return {"p3": t3, "p4": t4}, {"p3": s3, "p4": s4}


# ------------------------------------------------------------------ construction options
@pytest.mark.parametrize("value", [0, -1, 2.0, 1.5, "2", None, True])
def test_num_masks_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"num_masks must be an integer >= 1"):
        ACAMLevel(8, 8, num_masks=value)


@pytest.mark.parametrize("name,value", [("teacher_channels", 1), ("teacher_channels", 8.0),
                                        ("student_channels", 0), ("student_channels", "4")])
def test_channel_counts_must_be_ints(name, value):
    kwargs = {"teacher_channels": 8, "student_channels": 4, name: value}
    with pytest.raises(ValueError, match=name):
        ACAMLevel(**kwargs)


@pytest.mark.parametrize("option,value", [("query", "both"), ("query", "Teacher"), ("channel_mask", "global"),
                                          ("channel_mask", None), ("mask_norm", "l2"), ("masks", "none"),
                                          ("masks", "spatial+channel"), ("attention_layout", "flash")])
def test_unknown_option_values(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be one of .*got {re.escape(repr(value))}"):
        ACAMLevel(8, 8, **{option: value})


@pytest.mark.parametrize("name", ["alpha", "lam", "init_std"])
@pytest.mark.parametrize("value", [-1.0, -1e-9, float("nan"), float("inf"), "1", None])
def test_weights_must_be_finite_and_nonnegative(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0"):
        ACAMLevel(8, 8, **{name: value})


def test_acam_option_errors_name_the_level():
    with pytest.raises(ValueError, match=r"ACAM level 'p3'.*num_masks"):
        ACAM({"p3": 8}, num_masks=0)
    with pytest.raises(ValueError, match=r"ACAM level 'p4'.*teacher_channels"):
        ACAM({"p3": 8, "p4": 1})
    with pytest.raises(ValueError, match=r"lam must be"):
        ACAM({"p3": 8}, lam=-0.5)
    with pytest.raises(ValueError, match=r"mask_norm must be one of"):
        ACAM({"p3": 8}, mask_norm="bogus")


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="num_mask"):
        ACAM({"p3": 8}, num_mask=3)


@pytest.mark.parametrize("student_channels", [{"p3": 4}, {"p3": 4, "p4": 6, "p5": 6}, {"p3": 4, "p5": 6}])
def test_student_channels_must_have_the_teacher_levels(student_channels):
    with pytest.raises(ValueError, match=r"student_channels levels .* differ from teacher_channels levels"):
        ACAM({"p3": 8, "p4": 6}, student_channels)


@pytest.mark.parametrize("teacher_channels", [{}, None, [("p3", 8)], 8])
def test_teacher_channels_must_be_a_nonempty_dict(teacher_channels):
    with pytest.raises(ValueError, match="teacher_channels must be a non-empty dict"):
        ACAM(teacher_channels)


def test_colliding_level_names_are_rejected():
    with pytest.raises(ValueError, match="collide"):
        ACAM({"fpn.p3": 8, "fpn__p3": 8})


# ------------------------------------------------------------------------ ACAMLevel inputs
@pytest.mark.parametrize("which", ["teacher_feat", "student_feat"])
@pytest.mark.parametrize("shape_change", ["3d", "5d"])
def test_level_wrong_rank(which, shape_change):
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    feats = {"teacher_feat": teacher, "student_feat": student}
    feats[which] = feats[which][0] if shape_change == "3d" else feats[which][None]
    with pytest.raises(ValueError, match=rf"{which} must be 4-D"):
        level(feats["teacher_feat"], feats["student_feat"])


def test_level_batch_mismatch():
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    with pytest.raises(ValueError, match=r"batch mismatch: teacher_feat has batch 2, student_feat has batch 1"):
        level(teacher, student[:1])


@pytest.mark.parametrize("which", ["teacher_feat", "student_feat"])
def test_level_channel_mismatch(which):
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    feats = {"teacher_feat": teacher, "student_feat": student}
    feats[which] = torch.cat([feats[which], feats[which][:, :1]], dim=1)
    with pytest.raises(ValueError, match=rf"{which} has \d+ channels, the level was built for"):
        level(feats["teacher_feat"], feats["student_feat"])


def test_level_swapped_features_are_caught():
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    with pytest.raises(ValueError, match="teacher_feat has 4 channels"):
        level(student, teacher)


@pytest.mark.parametrize("which", ["teacher_feat", "student_feat"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_level_non_finite_features(which, bad):
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    feats = {"teacher_feat": teacher, "student_feat": student}
    feats[which][1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in \['{which}'\]"):
        level(feats["teacher_feat"], feats["student_feat"])


def test_level_non_tensor_and_integer_features():
    level = make_level(8, 4, 2)
    teacher, student = make_feats(2, 8, 4, (3, 3), requires_grad=False)
    with pytest.raises(TypeError, match="student_feat must be a torch.Tensor"):
        level(teacher, student.numpy())
    with pytest.raises(TypeError, match="teacher_feat must be a floating-point tensor"):
        level(teacher.long(), student)


def test_level_empty_inputs():
    level = make_level(8, 4, 2)
    with pytest.raises(ValueError, match=r"student_feat has an empty grid"):
        level(torch.randn(1, 8, 3, 3), torch.randn(1, 4, 0, 3))
    with pytest.raises(ValueError, match=r"teacher_feat has an empty batch"):
        level(torch.randn(0, 8, 3, 3), torch.randn(0, 4, 3, 3))


# ----------------------------------------------------------------------------- ACAM inputs
@pytest.mark.parametrize("side", ["teacher_feats", "student_feats"])
def test_acam_missing_level(side):
    method = _acam()
    teacher, student = _acam_feats()
    feats = {"teacher_feats": teacher, "student_feats": student}
    del feats[side]["p4"]
    with pytest.raises(ValueError, match=rf"{side} levels do not match.*missing \['p4'\], extra \[\]"):
        method(feats["teacher_feats"], feats["student_feats"])


@pytest.mark.parametrize("side", ["teacher_feats", "student_feats"])
def test_acam_extra_level(side):
    method = _acam()
    teacher, student = _acam_feats()
    feats = {"teacher_feats": teacher, "student_feats": student}
    feats[side]["p5"] = feats[side]["p4"]
    with pytest.raises(ValueError, match=rf"{side} levels do not match.*missing \[\], extra \['p5'\]"):
        method(feats["teacher_feats"], feats["student_feats"])


def test_acam_renamed_level_reports_both():
    method = _acam()
    teacher, student = _acam_feats()
    student["P4"] = student.pop("p4")
    with pytest.raises(ValueError, match=r"student_feats .*missing \['p4'\], extra \['P4'\]"):
        method(teacher, student)


def test_acam_inputs_must_be_dicts():
    method = _acam()
    teacher, student = _acam_feats()
    with pytest.raises(TypeError, match="teacher_feats must be a dict"):
        method(list(teacher.values()), student)


@pytest.mark.parametrize("which", ["teacher_feat", "student_feat"])
def test_acam_shape_errors_name_the_level(which):
    method = _acam()
    teacher, student = _acam_feats()
    feats = {"teacher_feat": teacher, "student_feat": student}
    feats[which]["p4"] = feats[which]["p4"][0]
    with pytest.raises(ValueError, match=rf"level 'p4': {which} must be 4-D"):
        method(teacher, student)


def test_acam_batch_and_channel_errors_name_the_level():
    method = _acam()
    teacher, student = _acam_feats()
    student["p3"] = student["p3"][:1]
    with pytest.raises(ValueError, match=r"level 'p3': batch mismatch"):
        method(teacher, student)
    teacher, student = _acam_feats()
    student["p3"] = torch.randn(2, 8, 4, 5)  # the teacher's channel count, not the student's
    with pytest.raises(ValueError, match=r"level 'p3': student_feat has 8 channels"):
        method(teacher, student)


@pytest.mark.parametrize("side", ["teacher_feats", "student_feats"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_acam_non_finite_names_side_and_level(side, bad):
    method = _acam()
    teacher, student = _acam_feats()
    feats = {"teacher_feats": teacher, "student_feats": student}
    feats[side]["p4"][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=re.escape(f"non-finite values (NaN or inf) in [\"{side}['p4']\"]")):
        method(teacher, student)


def test_acam_check_finite_can_be_switched_off():
    method = _acam(check_finite=False)
    teacher, student = _acam_feats()
    teacher["p3"][0, 0, 0, 0] = float("nan")
    losses = method(teacher, student)  # no error: the caller opted out
    assert not torch.isfinite(losses["p3.channel"])


def test_non_string_level_names_get_a_clear_error():
    with pytest.raises(TypeError, match="teacher_channels.*strings"):
        ACAM({3: 8})
