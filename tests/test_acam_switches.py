"""The switches against mask collapse (``mask_activation``, ``mask_grad``, the mass floor,
``fusion_student_grad``): the fast path equals both references (values and gradients, fp64),
each switch does what its formula says, and paper mode stays the default.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from acamkd.methods import ACAM, ACAMLevel, ACAMOptions
from acamkd.methods.acam import ADVERSARIAL_MASS_BETA, DEFAULT_MODE, PAPER_MODE, resolve_mass_beta
from acamkd.methods.acam_reference import acam_level_plain, acam_level_vectorised
from acamkd.methods.base import OptionError
from acamkd.ops.masking import mass_floor, partition_gain, reverse_gradient

from _acam_helpers import (
    ALL_COLLAPSE_SETS,
    ALL_SWITCH_SETS,
    SWITCH_SETS,
    assert_grads_match,
    assert_outputs_match,
    collapse_id,
    collapse_kwargs,
    grads_of,
    make_feats,
    make_level,
    outputs_and_grads,
    partition_sums,
    switch_id,
    variant,
)

F64 = torch.float64


def _check(reference, level, teacher, student, dtype):
    fast, fast_grads = outputs_and_grads(level, teacher, student)
    ref, ref_grads = outputs_and_grads(level, teacher, student, reference)
    assert_outputs_match(fast, ref, dtype)
    assert_grads_match(fast_grads, ref_grads, dtype)
    return fast, ref


# ------------------------------------------------------------------------ feature_norm
@pytest.mark.parametrize("collapse", ALL_COLLAPSE_SETS[::3], ids=collapse_id)
def test_standardised_features_match_both_references_fp64(collapse):
    base = SWITCH_SETS[ALL_COLLAPSE_SETS.index(collapse) % len(SWITCH_SETS)]
    level = make_level(10, 6, 3, base, dtype=F64, feature_norm="standardise", **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 10, 6, (4, 5), (3, 3), dtype=F64)
    teacher = 30.0 * teacher + 4.0  # large, offset features, as a detector's FPN from scratch
    _check(acam_level_plain, level, teacher, student, F64)
    _check(acam_level_vectorised, level, teacher, student, F64)


def test_standardised_one_cell_level_matches_both_references():
    # a 1 x 1 map (P7 of a small input): standardised to 0; the references must not refuse it
    # (F.instance_norm does in training; found by the bench)
    level = make_level(6, 4, 2, SWITCH_SETS[0], dtype=F64, feature_norm="standardise")
    teacher, student = make_feats(2, 6, 4, (1, 1), dtype=F64)
    _check(acam_level_plain, level, teacher, student, F64)
    _check(acam_level_vectorised, level, teacher, student, F64)


def test_standardised_losses_do_not_depend_on_the_teacher_scale_and_the_pair_is_standardised():
    level = make_level(8, 5, 3, SWITCH_SETS[0], dtype=F64, feature_norm="standardise")
    teacher, student = make_feats(2, 8, 5, (4, 4), dtype=F64, requires_grad=False)
    base = level(teacher, student)
    scaled = level(1e3 * teacher - 25.0, student)
    for key, value in base.losses.items():
        torch.testing.assert_close(scaled.losses[key], value, rtol=1e-5, atol=1e-9)  # eps / var ~ 1e-5
    aligned = base.aligned_student
    torch.testing.assert_close(aligned.mean((2, 3)), torch.zeros(2, 8, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(aligned.var((2, 3), unbiased=False), torch.ones(2, 8, dtype=F64), rtol=1e-3, atol=0)
    # the raw pair gives another loss: the switch is not a no-op
    raw = variant(level, feature_norm="none")(teacher, student)
    assert abs(raw.losses["spatial"].item() - base.losses["spatial"].item()) > 1e-3


def test_standardised_features_under_bf16_autocast_and_a_one_cell_level():
    level = make_level(8, 5, 3, SWITCH_SETS[0], feature_norm="standardise")
    for hw in ((4, 6), (1, 1)):  # a 1x1 level (P7 of a small image): every unit standardises to 0
        teacher, student = make_feats(2, 8, 5, hw, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = level(300.0 * teacher, student)
        total = sum(out.losses.values())
        assert torch.isfinite(total), hw
        total.backward()
        assert torch.isfinite(student.grad).all(), hw


def test_feature_norm_is_checked_and_defaults_to_the_paper():
    assert ACAMOptions().feature_norm == "standardise" and ACAMLevel(8, 8).feature_norm == "none"
    with pytest.raises(OptionError, match="feature_norm"):
        ACAMOptions(feature_norm="standardize")


# ------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("collapse", ALL_COLLAPSE_SETS, ids=collapse_id)
def test_every_collapse_switch_matches_plain_reference_fp64(collapse):
    # Every combination of the new switches, each over a base switch set (rotating, so every
    # query side, channel-mask form, norm and family meets the new switches), with a channel
    # mismatch and the resize path.
    base = SWITCH_SETS[ALL_COLLAPSE_SETS.index(collapse) % len(SWITCH_SETS)]
    level = make_level(12, 7, 3, base, dtype=F64, **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 12, 7, (5, 7), (4, 6), dtype=F64)
    fast, _ = _check(acam_level_plain, level, teacher, student, F64)
    assert ("mass_floor" in fast.losses) == (level.mass_beta > 0)


@pytest.mark.parametrize("switches", SWITCH_SETS, ids=switch_id)
@pytest.mark.parametrize("collapse", [("partition", "adversarial", False, None), ("sigmoid", "adversarial", True, None),
                                      ("partition", "detach", True, 2.5), ("partition", "descend", False, None)],
                         ids=collapse_id)
def test_collapse_switches_match_plain_reference_on_every_base_set(switches, collapse):
    level = make_level(8, 5, 4, switches, dtype=F64, **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 8, 5, (3, 4), (3, 4), dtype=F64)
    _check(acam_level_plain, level, teacher, student, F64)


@pytest.mark.parametrize("collapse", ALL_COLLAPSE_SETS[::2] + ALL_COLLAPSE_SETS[1::5], ids=collapse_id)
def test_collapse_switches_match_vectorised_reference_fp64(collapse):
    base = SWITCH_SETS[ALL_COLLAPSE_SETS.index(collapse) % len(SWITCH_SETS)]
    level = make_level(10, 6, 3, base, dtype=F64, **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 10, 6, (4, 5), (2, 3), dtype=F64)
    _check(acam_level_vectorised, level, teacher, student, F64)


@pytest.mark.parametrize("collapse", [("partition", "adversarial", False, None), ("sigmoid", "detach", True, 2.5)],
                         ids=collapse_id)
def test_collapse_switches_match_plain_reference_fp32_c19_m6(collapse):
    level = make_level(19, 7, 6, SWITCH_SETS[0], **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 19, 7, (3, 5), (3, 5))
    _check(acam_level_plain, level, teacher, student, torch.float32)


def test_single_mask_partition_is_the_plain_mse_at_half_weight():
    """M = 1: partition masks are 1 everywhere; the gain (1/2 under mass) gives half the plain MSE,
    the scale of the paper's sigmoid masks at init; the mask units get no gradient."""
    level = make_level(6, 6, 1, ("teacher", "paper", "mass", "both"), dtype=F64, mask_activation="partition")
    teacher, student = make_feats(2, 6, 6, (3, 3), dtype=F64)
    out, grads = outputs_and_grads(level, teacher, student)
    assert torch.equal(out.spatial_masks, torch.ones_like(out.spatial_masks))
    plain_mse = (teacher - out.aligned_student).pow(2).mean()
    for family in ("channel", "spatial"):
        torch.testing.assert_close(out.losses[family], 0.5 * plain_mse)
    assert grads["spatial_units"].abs().max() == 0 and grads["channel_units"].abs().max() == 0
    _check(acam_level_plain, level, teacher, student, F64)


# ---------------------------------------------------------------------------- partition
@pytest.mark.parametrize("form", ["paper", "elementwise", "article"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_partition_masks_sum_to_one_at_every_unit(form, scale):
    level = make_level(9, 5, 4, ("teacher", form, "mass", "both"), init_std=2.0, mask_activation="partition")
    teacher, student = make_feats(2, 9, 5, (4, 6), requires_grad=False)
    out = level(teacher * scale, student * scale)
    for masks in (out.channel_masks, out.spatial_masks):
        assert ((masks >= 0) & (masks <= 1)).all()
        sums = partition_sums(masks)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-6)
    assert out.stats["spatial_mask_mean"].item() == pytest.approx(1 / 4, rel=1e-6)
    assert out.stats["channel_mask_mean"].item() == pytest.approx(1 / 4, rel=1e-6)
    # ...and they are not flat (the test can fail): masks differ across positions.
    assert out.spatial_masks.std() > 0.05


@pytest.mark.parametrize("norm", ["mass", "energy"])
@pytest.mark.parametrize("num_masks", [2, 6, 19])
def test_partition_gain_matches_the_paper_start_scale(norm, num_masks):
    """Mask units at 0 (uniform masks: sigmoid 1/2, partition 1/M): equal masked losses."""
    sigmoid = make_level(8, 8, num_masks, ("teacher", "elementwise", norm, "both"), init_std=0.0, dtype=F64)
    partition = variant(sigmoid, mask_activation="partition")
    teacher, student = make_feats(2, 8, 8, (3, 4), dtype=F64, requires_grad=False)
    a, b = sigmoid(teacher, student), partition(teacher, student)
    assert partition.loss_gain == partition_gain(num_masks, norm) == (num_masks / 2 if norm == "mass" else 1.0)
    for family in ("channel", "spatial"):
        torch.testing.assert_close(b.losses[family], a.losses[family], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- mask_grad
def _named(level, student):
    named = dict(level.named_parameters())
    named["student_feat"] = student
    return named


def _masked(out):
    return sum(out.losses[k] for k in ("channel", "spatial") if k in out.losses)


def _regularisers(out):
    return out.losses["diversity"] + out.losses.get("mass_floor", 0.0)


@pytest.mark.parametrize("activation", ["sigmoid", "partition"])
@pytest.mark.parametrize("norm", ["mass", "energy"])
@pytest.mark.parametrize("query", ["teacher", "student"])
def test_adversarial_mask_branch_gets_the_negated_masked_loss_gradient(activation, norm, query):
    """fusion_student_grad=False: the mask branch receives -(grad of the scale-free masked loss)
    + grad of (Dice + floor); the student and the alignment conv receive exactly what they
    receive in paper-style descent (the masked loss through d)."""
    adv = make_level(8, 5, 3, (query, "article", norm, "both"), dtype=F64, mask_activation=activation,
                     mask_grad="adversarial", fusion_student_grad=False, mass_beta=3.0, mass_rho=0.45)
    teacher, student = make_feats(2, 8, 5, (3, 4), dtype=F64)
    teacher = teacher.detach()
    out = adv(teacher, student)
    got = grads_of(sum(out.losses.values()), _named(adv, student))

    # Reference: the ascended objective written out independently, on the same masks.
    same = variant(adv, mask_grad="descend")  # same parameter values, plain descent
    ref_out = same(teacher, student)
    ascended = 0.0
    d2 = (teacher - ref_out.aligned_student).pow(2).detach()  # (B, C, H, W)
    for masks, error in ((ref_out.channel_masks, d2.sum((2, 3))),
                         (ref_out.spatial_masks.flatten(2), d2.sum(1).flatten(1))):
        error = error / error.mean(-1, keepdim=True)
        ascended = ascended + ((masks ** 2 * error[:, None]).sum(-1) / (masks ** 2).sum(-1)).mean()
    ascend_grads = grads_of(adv.alpha * ascended, _named(same, student))
    regulariser_grads = grads_of(_regularisers(ref_out), _named(same, student))
    branch = {name for name, _ in adv.mask_branch_parameters()}
    assert branch == {"channel_units", "spatial_units", "query_proj.weight", "query_proj.bias", "key_proj.weight",
                      "value_proj.weight", "value_proj.bias"}
    for name in branch:
        expected = regulariser_grads[name] - ascend_grads[name]
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-12, msg=name)
        assert ascend_grads[name].abs().max() > 0, name  # the reversal is not vacuous
    # The student side: the same as descending the masked loss with the student detached from STCA-FF.
    descend = variant(adv, mask_grad="descend")
    desc_grads = grads_of(sum(descend(teacher, student).losses.values()), _named(descend, student))
    for name in ("align.weight", "align.bias", "student_feat"):
        torch.testing.assert_close(got[name], desc_grads[name], rtol=1e-10, atol=0, msg=name)
    # The values are the paper's.
    for key, value in descend(teacher, student).losses.items():
        torch.testing.assert_close(out.losses[key], value, rtol=1e-12, atol=0)


def test_adversarial_with_fusion_gives_the_student_the_mask_side_inside_stca_ff():
    """fusion_student_grad=True: the student's gradient is its descent through d plus what
    STCA-FF's keys/values pass back: the reversed ascent and the Dice/floor descent."""
    adv = make_level(8, 5, 3, SWITCH_SETS[0], dtype=F64, mask_grad="adversarial")
    teacher, student = make_feats(2, 8, 5, (3, 4), dtype=F64)
    teacher = teacher.detach()
    grad = grads_of(sum(adv(teacher, student).losses.values()), {"s": student})["s"]
    detach = variant(adv, mask_grad="detach")  # d-path descent + Dice/floor through STCA-FF
    base = grads_of(sum(detach(teacher, student).losses.values()), {"s": student})["s"]
    # The ascended objective's gradient through STCA-FF (its d-path gradient is cut by sg(e)).
    out = variant(adv, mask_grad="descend")(teacher, student)
    d2 = (teacher - out.aligned_student).pow(2).detach()
    ascended = 0.0
    for masks, error in ((out.channel_masks, d2.sum((2, 3))), (out.spatial_masks.flatten(2), d2.sum(1).flatten(1))):
        error = error / error.mean(-1, keepdim=True)
        ascended = ascended + ((masks ** 2 * error[:, None]).sum(-1) / (masks ** 2).sum(-1)).mean()
    through_fusion = grads_of(adv.alpha * ascended, {"s": student})["s"]
    assert through_fusion.abs().max() > 0
    torch.testing.assert_close(grad, base - through_fusion, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("activation", ["sigmoid", "partition"])
def test_detach_gives_the_masks_no_gradient_from_the_masked_loss(activation):
    level = make_level(8, 5, 3, ("teacher", "elementwise", "mass", "both"), dtype=F64, mask_activation=activation,
                       mask_grad="detach", mass_beta=4.0, mass_rho=0.45)
    teacher, student = make_feats(2, 8, 5, (3, 4), dtype=F64)
    out = level(teacher.detach(), student)
    named = _named(level, student)
    masked = grads_of(_masked(out), named)
    for name, _ in level.mask_branch_parameters():
        assert masked[name].abs().max() == 0, name
    # The student still learns from the masked loss; the masks from the Dice term and the floor.
    assert masked["student_feat"].abs().max() > 0 and masked["align.weight"].abs().max() > 0
    regularised = grads_of(_regularisers(out), named)
    total = grads_of(sum(out.losses.values()), named)
    for name, _ in level.mask_branch_parameters():
        torch.testing.assert_close(total[name], regularised[name], rtol=1e-12, atol=0)
        assert regularised[name].abs().max() > 0, name
    assert out.losses["mass_floor"].item() > 0  # the floor is active here (rho 0.45 > masks' means)
    # Same values as descending.
    reference = variant(level, mask_grad="descend")(teacher.detach(), student)
    for key, value in reference.losses.items():
        torch.testing.assert_close(out.losses[key], value, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------- fusion switch
@pytest.mark.parametrize("query", ["teacher", "student"])
def test_fusion_student_grad_false_cuts_the_student_out_of_stca_ff(query):
    level = make_level(8, 5, 3, (query, "paper", "mass", "both"), dtype=F64, fusion_student_grad=False)
    teacher, student = make_feats(2, 8, 5, (3, 4), dtype=F64)
    teacher = teacher.detach()
    out = level(teacher, student)
    assert grads_of(out.fused.sum(), {"s": student})["s"].abs().max() == 0
    # The student's gradient is the masked loss through d alone: the detach mode's.
    grad = grads_of(sum(out.losses.values()), {"s": student})["s"]
    detached = variant(level, mask_grad="detach")
    torch.testing.assert_close(grad, grads_of(sum(detached(teacher, student).losses.values()), {"s": student})["s"],
                               rtol=1e-12, atol=0)
    # ...which differs from the paper's (the test can fail), while every value is the paper's.
    paper = variant(level, fusion_student_grad=True)
    paper_out = paper(teacher, student)
    assert not torch.allclose(grad, grads_of(sum(paper_out.losses.values()), {"s": student})["s"])
    torch.testing.assert_close(out.fused, paper_out.fused, rtol=0, atol=0)
    for key in paper_out.losses:
        torch.testing.assert_close(out.losses[key], paper_out.losses[key], rtol=0, atol=0)


# ------------------------------------------------------------------------- mass floor
def test_mass_floor_formula():
    masks = torch.tensor([[[0.1, 0.1], [0.5, 0.5]], [[0.0, 0.2], [0.4, 0.2]]], dtype=F64)  # (B=2, M=2, K=2)
    # image 0: relu(0.3-0.1)^2 + 0 = 0.04; image 1: relu(0.3-0.1)^2 + relu(0.3-0.3)^2 = 0.04
    assert mass_floor(masks, 0.3).item() == pytest.approx(0.04)
    assert mass_floor(masks, 0.0).item() == 0.0


def test_reverse_gradient_is_identity_forward_negation_backward():
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * torch.arange(12.0, dtype=F64).view(3, 4)).sum(), x)
    torch.testing.assert_close(g, -torch.arange(12.0, dtype=F64).view(3, 4))


def _mask_branch_run(steps=200, lr=3e-3, scale=1.0, **switches):
    """AdamW on the mask branch alone over fixed random features (the mask-collapse spec's
    experiment): per family, the smallest per-mask mean at the end."""
    torch.manual_seed(0)
    level = ACAMLevel(32, 16, num_masks=6, **switches)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 32, 8, 8, generator=gen) * scale
    student = torch.randn(2, 16, 8, 8, generator=gen) * scale
    optimizer = torch.optim.AdamW([p for _, p in level.mask_branch_parameters()], lr=lr)
    for _ in range(steps):
        loss = sum(level(teacher, student).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = level(teacher, student)
    return {"spatial_mean": out.spatial_masks.mean().item(), "channel_mean": out.channel_masks.mean().item(),
            "spatial_min": out.spatial_masks.mean((0, 2, 3)).min().item(),
            "channel_min": out.channel_masks.mean((0, 2)).min().item()}


@pytest.mark.slow
def test_paper_masks_collapse_where_the_floor_holds():
    paper = _mask_branch_run()
    assert paper["spatial_mean"] < 1e-2  # the paper's masks collapse (spec: mask-collapse.md)
    adversarial = _mask_branch_run(mask_grad="adversarial")  # default floor: rho 0.3, beta 10
    floored = _mask_branch_run(mass_beta=10.0)  # paper descent plus the floor
    detached = _mask_branch_run(mask_grad="detach", mass_beta=10.0)
    for name, run in (("adversarial", adversarial), ("floored", floored), ("detach", detached)):
        for family in ("spatial", "channel"):
            assert run[f"{family}_min"] > 0.25, (name, run)  # every mask near or above rho = 0.3
    partition = _mask_branch_run(mask_activation="partition")
    assert partition["spatial_mean"] == pytest.approx(1 / 6, rel=1e-5)  # by construction


@pytest.mark.slow
def test_adversarial_floor_holds_whatever_the_feature_scale():
    """The ascended loss is normalised in the error too, so the floor's balance with it does not
    depend on the features' scale (losses 1000x larger here); the paper's floor-less masks collapse."""
    adversarial = _mask_branch_run(steps=150, scale=30.0, mask_grad="adversarial")
    assert adversarial["spatial_min"] > 0.25 and adversarial["channel_min"] > 0.25, adversarial
    paper = _mask_branch_run(steps=150, scale=30.0)
    assert paper["channel_mean"] < 1e-2, paper


# --------------------------------------------------------------------------- options
def test_level_defaults_are_the_paper_and_option_defaults_the_study_mode():
    options = ACAMOptions()
    assert (options.mask_activation, options.mask_grad, options.mass_beta, options.fusion_student_grad,
            options.feature_norm, options.diagnostics) == ("sigmoid", "adversarial", None, False, "standardise",
                                                           True)  # diagnostics: statistics only
    assert options.mass_rho == 0.3 and options.mask_norm == "mass"
    paper = ACAMOptions(**PAPER_MODE)
    assert (paper.mask_activation, paper.mask_grad, paper.mass_beta, paper.fusion_student_grad,
            paper.feature_norm, paper.mask_norm) == ("sigmoid", "descend", None, True, "none", "mass")
    assert ACAMOptions(**{**PAPER_MODE, **DEFAULT_MODE}) == options  # the default departs only there
    assert ACAM({"p3": 8}).level("p3").mass_beta == ADVERSARIAL_MASS_BETA  # build("acam"): the floor is on
    level = ACAMLevel(8, 8)
    assert level.mass_beta == 0.0 and level.loss_gain == 1.0
    assert resolve_mass_beta(None, "descend") == resolve_mass_beta(None, "detach") == 0.0
    assert resolve_mass_beta(None, "adversarial") == ADVERSARIAL_MASS_BETA == 10.0
    assert ACAMLevel(8, 8, mask_grad="adversarial").mass_beta == 10.0
    assert ACAMLevel(8, 8, mask_grad="adversarial", mass_beta=2).mass_beta == 2.0


@pytest.mark.parametrize("option,value,message", [
    ("mask_activation", "softmax", "mask_activation must be one of ('sigmoid', 'partition')"),
    ("mask_grad", "ascend", "mask_grad must be one of ('descend', 'adversarial', 'detach')"),
    ("mass_rho", -0.1, "mass_rho must be a finite number >= 0"),
    ("mass_rho", 1.5, "mass_rho must be in [0, 1]"),
    ("mass_beta", -1.0, "mass_beta must be a finite number >= 0"),
    ("mass_beta", float("nan"), "mass_beta must be a finite number >= 0"),
    ("fusion_student_grad", 1, "fusion_student_grad must be true or false"),
    ("diagnostics", "yes", "diagnostics must be true or false"),
])
def test_bad_switch_values_are_named(option, value, message):
    with pytest.raises(OptionError) as info:
        ACAMOptions(**{option: value})
    assert info.value.option == option and message in str(info.value)
    with pytest.raises(ValueError, match=rf"{option} must"):
        ACAMLevel(8, 8, **{option: value})


def test_adversarial_refuses_a_zero_floor():
    with pytest.raises(OptionError, match=r"mass_beta must be > 0 with mask_grad='adversarial'"):
        ACAMOptions(mask_grad="adversarial", mass_beta=0.0)
    with pytest.raises(ValueError, match=r"ACAM level 'p3'.*mass_beta must be > 0"):
        ACAM({"p3": 8}, mask_grad="adversarial", mass_beta=0)


def test_switches_reach_every_level_and_add_the_floor_key():
    method = ACAM({"p3": 8, "p4": 6}, {"p3": 4, "p4": 6}, num_masks=3, mask_activation="partition",
                  mask_grad="adversarial", fusion_student_grad=False, mass_rho=0.2)
    for name in ("p3", "p4"):
        level = method.level(name)
        assert (level.mask_activation, level.mask_grad, level.fusion_student_grad, level.mass_rho, level.mass_beta) == \
            ("partition", "adversarial", False, 0.2, 10.0)
    t3, s3 = make_feats(2, 8, 4, (4, 5), requires_grad=False)
    t4, s4 = make_feats(2, 6, 6, (2, 3), requires_grad=False)
    losses = method({"p3": t3, "p4": t4}, {"p3": s3, "p4": s4})
    kinds = ("channel", "spatial", "diversity", "mass_floor")
    assert set(losses) == {f"{lv}.{k}" for lv in ("p3", "p4") for k in kinds}


def test_config_round_trip_of_the_switches():
    from acamkd.methods import parse_options
    options = parse_options("acam", {"mask_activation": "partition", "mask_grad": "adversarial", "mass_beta": 5.0,
                                     "mass_rho": 0.1, "fusion_student_grad": False, "diagnostics": True})
    assert options == ACAMOptions(mask_activation="partition", mask_grad="adversarial", mass_beta=5.0, mass_rho=0.1,
                                  fusion_student_grad=False, diagnostics=True)
    assert parse_options("acam", {"mass_beta": None}).mass_beta is None


def test_new_switches_under_bf16_autocast():
    level = make_level(19, 7, 6, mask_activation="partition", mask_grad="adversarial", fusion_student_grad=False)
    teacher, student = make_feats(2, 19, 7, (6, 5), (3, 3))
    reference = level(teacher, student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = level(teacher, student)
    for key, value in out.losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference.losses[key].item(), rel=5e-2, abs=1e-3), key
    sum(out.losses.values()).backward()
    for name, param in level.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


# -------------------------------------------------------------------------- properties

@given(
    switches=st.sampled_from(ALL_SWITCH_SETS),
    collapse=st.sampled_from(ALL_COLLAPSE_SETS),
    num_masks=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    init_std=st.sampled_from([0.0, 0.5, 3.0]),
    feature_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_every_switch_combination_is_finite_and_keeps_its_invariants(switches, collapse, num_masks, hw, init_std,
                                                                     feature_scale, seed):
    level = make_level(6, 4, num_masks, switches, seed=seed, init_std=init_std, **collapse_kwargs(collapse))
    teacher, student = make_feats(2, 6, 4, hw, seed=seed)
    out = level(teacher.detach() * feature_scale, student * feature_scale)
    for key, value in out.losses.items():
        assert torch.isfinite(value) and value.item() >= 0.0, key
    sum(out.losses.values()).backward()
    assert torch.isfinite(student.grad).all()
    for name, param in level.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    for masks in (out.channel_masks, out.spatial_masks):
        if masks is not None and level.mask_activation == "partition":
            sums = partition_sums(masks)
            torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
