"""``mask_source``: where ACAM-KD's masks come from (the ablation rows of the paper's Table 10 and
ours): "cooperative" (STCA-FF, the paper), "teacher" (the teacher feature alone, learned online),
"uniform" (every mask 1: aligned MSE under ACAM's normalisation). The fast path against both
references for each, and what each row claims."""
from __future__ import annotations

import pytest
import torch

from acamkd import methods
from acamkd.methods.acam_reference import acam_level_plain, acam_level_vectorised
from acamkd.methods.base import OptionError
from acamkd.methods.mimic import mimic_level_loss
from tests._acam_helpers import (
    SWITCH_SETS,
    assert_grads_match,
    assert_outputs_match,
    make_feats,
    make_level,
    outputs_and_grads,
)

F64 = torch.float64
MODES = [  # (mask_grad, feature_norm, mask_activation)
    ("descend", "none", "sigmoid"),
    ("adversarial", "standardise", "sigmoid"),
    ("detach", "none", "partition"),
]


@pytest.mark.parametrize("reference", [acam_level_plain, acam_level_vectorised], ids=["plain", "vectorised"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
@pytest.mark.parametrize("switches", [SWITCH_SETS[0], SWITCH_SETS[1], SWITCH_SETS[4], SWITCH_SETS[7]],
                         ids=lambda s: "-".join(s))
@pytest.mark.parametrize("source", ["teacher", "uniform"])
def test_fast_matches_references(source, switches, mode, reference):
    mask_grad, feature_norm, activation = mode
    level = make_level(12, 7, 3, switches, dtype=F64, mask_source=source, mask_grad=mask_grad,
                       feature_norm=feature_norm, mask_activation=activation)
    teacher, student = make_feats(2, 12, 7, (5, 7), (4, 6), dtype=F64)
    fast, fast_grads = outputs_and_grads(level, teacher, student)
    ref, ref_grads = outputs_and_grads(level, teacher, student, reference)
    assert_outputs_match(fast, ref, F64)
    assert_grads_match(fast_grads, ref_grads, F64)


def test_uniform_builds_no_mask_branch_and_has_no_mask_terms():
    level = make_level(8, 5, 4, mask_source="uniform", mask_grad="adversarial", feature_norm="standardise")
    assert [name for name, _ in level.named_parameters()] == ["align.weight", "align.bias"]
    assert level.mask_branch_parameters() == []
    teacher, student = make_feats(2, 8, 5, (4, 4))
    out = level(teacher, student)
    assert set(out.losses) == {"channel", "spatial", "diversity"}  # no floor: masks cannot fall below it
    assert out.losses["diversity"].item() == 0.0
    assert torch.equal(out.channel_masks, torch.ones(2, 4, 8))
    assert torch.equal(out.spatial_masks, torch.ones(2, 4, 4, 4))


@pytest.mark.parametrize("feature_norm", ["none", "standardise"])
@pytest.mark.parametrize("family, mask_norm", [("channel", "mass"), ("spatial", "energy")])
def test_uniform_one_family_equals_mimic(family, mask_norm, feature_norm):
    """Uniform masks isolate what masking adds: with one family, ACAM's loss is mimic's aligned MSE
    at weight alpha (same alignment conv, same normalisation), in value and gradients."""
    alpha = 1.7
    level = make_level(6, 4, 3, ("teacher", "paper", mask_norm, family), dtype=F64, mask_source="uniform",
                       feature_norm=feature_norm, alpha=alpha)
    teacher, student = make_feats(2, 6, 4, (3, 5), (3, 5), dtype=F64)
    acam_loss = level(teacher, student).losses[family]
    mse, _ = mimic_level_loss(level.align, teacher, student, feature_norm)
    torch.testing.assert_close(acam_loss, alpha * mse, rtol=1e-12, atol=0)
    g_acam = torch.autograd.grad(acam_loss, [student, level.align.weight])
    g_mimic = torch.autograd.grad(alpha * mse, [student, level.align.weight])
    for a, b in zip(g_acam, g_mimic):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_teacher_source_masks_ignore_the_student_and_learn():
    level = make_level(8, 5, 3, dtype=F64, mask_source="teacher")
    assert level.query_proj is None and level.key_proj is None and level.value_proj is None
    assert {name for name, _ in level.mask_branch_parameters()} == {"channel_units", "spatial_units"}
    teacher, student = make_feats(2, 8, 5, (4, 4), dtype=F64)
    _, other_student = make_feats(2, 8, 5, (4, 4), dtype=F64, seed=7)
    a, b = level(teacher, student), level(teacher, other_student)
    torch.testing.assert_close(a.spatial_masks, b.spatial_masks, rtol=0, atol=0)
    torch.testing.assert_close(a.channel_masks, b.channel_masks, rtol=0, atol=0)
    grads = torch.autograd.grad(sum(a.losses.values()), [level.spatial_units, level.channel_units])
    assert all(g.abs().sum() > 0 for g in grads)  # learned online


def test_option_checked_by_name():
    with pytest.raises(OptionError, match="mask_source must be one of"):
        methods.ACAMOptions(mask_source="offline")
    assert methods.ACAMOptions().mask_source == "cooperative"


@pytest.mark.parametrize("source", ["teacher", "uniform"])
def test_whole_method_runs_and_reports_finite_statistics(source):
    method = methods.build("acam", teacher_channels={"p3": 8, "p4": 8}, student_channels={"p3": 4, "p4": 4},
                           num_masks=3, mask_source=source)
    gen = torch.Generator().manual_seed(0)
    teacher = {"p3": torch.randn(2, 8, 6, 6, generator=gen), "p4": torch.randn(2, 8, 3, 3, generator=gen)}
    student = {k: torch.randn(2, 4, *v.shape[-2:], generator=gen, requires_grad=True) for k, v in teacher.items()}
    losses = method(teacher, student)
    sum(losses.values()).backward()
    stats = method.statistics()
    assert stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert method.health_warnings() == []
