"""Properties of one ACAM-KD level that hold for any input (hypothesis where it helps)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _acam_helpers import ALL_SWITCH_SETS, SWITCH_SETS, make_feats, make_level, switch_id



@given(
    switches=st.sampled_from(ALL_SWITCH_SETS),
    batch=st.integers(1, 2),
    teacher_channels=st.integers(2, 12),
    student_channels=st.integers(1, 8),
    num_masks=st.integers(1, 4),
    teacher_hw=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    student_hw=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    init_std=st.sampled_from([0.0, 0.5, 2.0]),
    feature_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_losses_nonnegative_finite_and_bounded(switches, batch, teacher_channels, student_channels, num_masks,
                                               teacher_hw, student_hw, init_std, feature_scale, seed):
    level = make_level(teacher_channels, student_channels, num_masks, switches, seed=seed, init_std=init_std)
    teacher, student = make_feats(batch, teacher_channels, student_channels, teacher_hw, student_hw, seed=seed,
                                  requires_grad=False)
    out = level(teacher * feature_scale, student * feature_scale)
    families = 2 if switches[3] == "both" else 1
    for key, value in out.losses.items():
        assert value.shape == () and torch.isfinite(value), key
        assert value.item() >= 0.0, key
    # Each family's mean pairwise Dice is in [0, 1]; 0 with a single mask.
    assert out.losses["diversity"].item() <= families * level.lam + 1e-5
    if num_masks == 1:
        assert out.losses["diversity"].item() == 0.0
    for masks in (out.channel_masks, out.spatial_masks):
        if masks is not None:
            assert ((masks >= 0) & (masks <= 1)).all()


@pytest.mark.parametrize("switches", SWITCH_SETS, ids=switch_id)
def test_feature_losses_vanish_when_aligned_student_equals_teacher(switches):
    channels, batch, hw = 6, 2, (3, 4)
    level = make_level(channels, channels, 3, switches)
    with torch.no_grad():
        level.align.weight.copy_(torch.eye(channels)[:, :, None, None])
        level.align.bias.zero_()
    teacher, _ = make_feats(batch, channels, channels, hw, requires_grad=False)
    out = level(teacher, teacher.clone())
    feature_keys = [k for k in ("channel", "spatial") if k in out.losses]
    assert feature_keys
    for key in feature_keys:
        assert out.losses[key].item() == 0.0, key
    torch.testing.assert_close(out.aligned_student, teacher, rtol=0, atol=0)
    # ...and they do not vanish for a slightly different student (the test can fail).
    perturbed = level(teacher, teacher + 0.1 * torch.randn_like(teacher))
    for key in feature_keys:
        assert perturbed.losses[key].item() > 0.0, key


@pytest.mark.parametrize("switches", ALL_SWITCH_SETS, ids=switch_id)
def test_gradients_reach_student_and_every_parameter(switches):
    level = make_level(8, 5, 3, switches)
    teacher, student = make_feats(2, 8, 5, (4, 5), (3, 3))
    out = level(teacher.detach(), student)  # the teacher is frozen in training
    sum(out.losses.values()).backward()
    grads = {name: p.grad for name, p in level.named_parameters()}
    grads["student_feat"] = student.grad
    expected = {"align.weight", "align.bias", "query_proj.weight", "query_proj.bias", "key_proj.weight",
                "value_proj.weight", "value_proj.bias", "student_feat"}
    expected |= {"channel_units"} if switches[3] in ("both", "channel") else set()
    expected |= {"spatial_units"} if switches[3] in ("both", "spatial") else set()
    assert set(grads) == expected
    scale = max(g.abs().max().item() for g in grads.values() if g is not None)
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max().item() > 1e-6 * scale, f"{name} has a (near) zero gradient"


def test_alpha_and_lam_scale_the_losses():
    teacher, student = make_feats(2, 8, 6, (3, 5), requires_grad=False)
    base = make_level(8, 6, 3)(teacher, student).losses
    scaled = make_level(8, 6, 3, alpha=2.5, lam=0.25)(teacher, student).losses
    for key in ("channel", "spatial"):
        assert scaled[key].item() == pytest.approx(2.5 * base[key].item(), rel=1e-6)
    assert scaled["diversity"].item() == pytest.approx(0.25 * base["diversity"].item(), rel=1e-6)
    off = make_level(8, 6, 3, alpha=0.0, lam=0.0)(teacher, student).losses
    assert all(value.item() == 0.0 for value in off.values())
    assert all(value.item() > 0.0 for value in base.values())


def test_energy_normalised_loss_exceeds_mass_normalised_loss():
    """Same masks, different denominators: sum w^2 <= sum w for masks in [0, 1], so the
    energy-normalised loss is the larger one (they coincide only for 0/1 masks)."""
    teacher, student = make_feats(2, 8, 8, (3, 5), requires_grad=False)
    for family in ("spatial", "channel"):
        mass = make_level(8, 8, 3, ("teacher", "paper", "mass", family))(teacher, student).losses[family]
        energy = make_level(8, 8, 3, ("teacher", "paper", "energy", family))(teacher, student).losses[family]
        assert energy.item() > mass.item() > 0.0


def test_masks_adapt_to_the_student():
    """The masks are recomputed from the current student (the 'adaptive' in ACAM)."""
    level = make_level(8, 8, 3)
    teacher, student = make_feats(1, 8, 8, (4, 4), requires_grad=False)
    first = level(teacher, student)
    second = level(teacher, student + torch.randn_like(student))
    assert not torch.allclose(first.spatial_masks, second.spatial_masks)
    assert not torch.allclose(first.channel_masks, second.channel_masks)


def test_query_switch_changes_the_fusion():
    teacher, student = make_feats(1, 8, 8, (3, 3), requires_grad=False)
    by_teacher = make_level(8, 8, 2, ("teacher", "paper", "mass", "both"))(teacher, student)
    by_student = make_level(8, 8, 2, ("student", "paper", "mass", "both"))(teacher, student)
    assert not torch.allclose(by_teacher.fused, by_student.fused)
    torch.testing.assert_close(by_teacher.aligned_student, by_student.aligned_student)


def test_forward_is_deterministic():
    level = make_level(19, 7, 6)
    teacher, student = make_feats(2, 19, 7, (5, 7), (3, 4), requires_grad=False)
    first, second = level(teacher, student), level(teacher, student)
    for key in first.losses:
        assert torch.equal(first.losses[key], second.losses[key])
