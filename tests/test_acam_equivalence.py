"""The fast ACAMLevel equals the references of acamkd.methods.acam_reference.

``acam_level_plain`` transcribes the spec's equations with loops (materialised softmax
attention, one image / mask / mask pair at a time); ``acam_level_vectorised`` is the
materialised-attention speed baseline. Values (every loss, both mask families, fused and
aligned features) and gradients (every parameter of the level, the student feature and the
teacher feature) are compared in float32 and float64.
"""
from __future__ import annotations

import pytest
import torch

from acamkd.methods.acam_reference import acam_level_plain, acam_level_vectorised
from acamkd.ops.masking import mean_pairwise_dice

from _acam_helpers import (
    SWITCH_SETS,
    assert_grads_match,
    assert_outputs_match,
    make_feats,
    make_level,
    mean_offdiag_dice,
    outputs_and_grads,
    switch_id,
)

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]

# (batch, teacher C, student C, num_masks, teacher (H, W), student (H, W), switch set)
# Switch sets rotate over the shapes so shapes and switches are crossed a little.
SHAPES = {
    "square-4x4-b2-m2": (2, 8, 8, 2, (4, 4), (4, 4), SWITCH_SETS[0]),
    "odd-5x7-b1-m6-cs5": (1, 8, 5, 6, (5, 7), (5, 7), SWITCH_SETS[1]),
    "grid-1x1-b2-m1": (2, 6, 4, 1, (1, 1), (1, 1), SWITCH_SETS[2]),
    "grid-1x1-b1-m2": (1, 4, 4, 2, (1, 1), (1, 1), SWITCH_SETS[3]),
    "c19-3x5-b2-m6": (2, 19, 19, 6, (3, 5), (3, 5), SWITCH_SETS[0]),
    "c19-cs7-4x3-b1-m2-article": (1, 19, 7, 2, (4, 3), (4, 3), SWITCH_SETS[4]),
    "c256-cs64-3x3-b1-m2": (1, 256, 64, 2, (3, 3), (3, 3), SWITCH_SETS[1]),
    "c256-2x3-b2-m6": (2, 256, 256, 6, (2, 3), (2, 3), SWITCH_SETS[0]),
    "resize-up-6x4-from-3x2": (2, 12, 6, 2, (6, 4), (3, 2), SWITCH_SETS[5]),
    "resize-down-3x4-from-7x9": (1, 10, 10, 6, (3, 4), (7, 9), SWITCH_SETS[6]),
    "resize-2x3-from-1x1-c3": (2, 3, 2, 2, (2, 3), (1, 1), SWITCH_SETS[7]),
    "c2-1x5-b2-m2": (2, 2, 3, 2, (1, 5), (1, 5), SWITCH_SETS[8]),
}


def _check_against(reference, batch, ct, cs, num_masks, t_hw, s_hw, switches, dtype):
    level = make_level(ct, cs, num_masks, switches, dtype=dtype)
    teacher, student = make_feats(batch, ct, cs, t_hw, s_hw, dtype=dtype)
    fast, fast_grads = outputs_and_grads(level, teacher, student)
    ref, ref_grads = outputs_and_grads(level, teacher, student, reference)
    assert_outputs_match(fast, ref, dtype)
    assert_grads_match(fast_grads, ref_grads, dtype)
    return fast, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("switches", SWITCH_SETS, ids=switch_id)
def test_fast_matches_plain_reference_per_switch_set(switches, dtype):
    # Channel mismatch (7 -> 12), resize path (4x6 -> 5x7), batch 2, 3 masks.
    _check_against(acam_level_plain, 2, 12, 7, 3, (5, 7), (4, 6), switches, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SHAPES), ids=str)
def test_fast_matches_plain_reference_per_shape(case, dtype):
    _check_against(acam_level_plain, *SHAPES[case], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        (2, 8, 5, 6, (5, 7), (5, 7), SWITCH_SETS[0]),
        (1, 19, 19, 2, (4, 3), (2, 2), SWITCH_SETS[2]),
        (2, 6, 6, 3, (3, 3), (3, 3), SWITCH_SETS[4]),
        (2, 10, 4, 2, (2, 5), (4, 4), SWITCH_SETS[7]),
    ],
    ids=["default-odd", "c19-article-energy-resize", "channel-only", "spatial-only-resize"],
)
def test_fast_matches_vectorised_reference(case, dtype):
    _check_against(acam_level_vectorised, *case, dtype)


@pytest.mark.parametrize("switches", SWITCH_SETS[:3] + SWITCH_SETS[4:5] + SWITCH_SETS[7:8], ids=switch_id)
def test_level_stats_and_output_shapes(switches):
    """stats hold detached mask means and mean pairwise Dice, computed independently here."""
    batch, ct, cs, num_masks, (h, w) = 2, 9, 5, 4, (3, 5)
    level = make_level(ct, cs, num_masks, switches)
    teacher, student = make_feats(batch, ct, cs, (h, w), (2, 2))
    out = level(teacher, student)
    families = {"both": ("channel", "spatial"), "spatial": ("spatial",), "channel": ("channel",)}[switches[3]]
    assert set(out.losses) == set(families) | {"diversity"}
    assert set(out.stats) == {f"{f}_{k}" for f in families for k in ("mask_mean", "dice")}
    assert out.fused.shape == (batch, ct, h, w)
    assert out.aligned_student.shape == (batch, ct, h, w)
    assert (out.channel_masks is not None) == ("channel" in families)
    assert (out.spatial_masks is not None) == ("spatial" in families)
    expected_diversity = 0.0
    if out.channel_masks is not None:
        assert out.channel_masks.shape == (batch, num_masks, ct)
        assert out.stats["channel_mask_mean"].item() == pytest.approx(out.channel_masks.double().mean().item(), rel=1e-6)
        dice = mean_offdiag_dice(out.channel_masks)
        assert out.stats["channel_dice"].item() == pytest.approx(dice, rel=1e-5)
        expected_diversity += dice
    if out.spatial_masks is not None:
        assert out.spatial_masks.shape == (batch, num_masks, h, w)
        assert out.stats["spatial_mask_mean"].item() == pytest.approx(out.spatial_masks.double().mean().item(), rel=1e-6)
        dice = mean_offdiag_dice(out.spatial_masks)
        assert out.stats["spatial_dice"].item() == pytest.approx(dice, rel=1e-5)
        expected_diversity += dice
    assert out.losses["diversity"].item() == pytest.approx(level.lam * expected_diversity, rel=1e-5)
    for value in out.stats.values():
        assert value.shape == () and not value.requires_grad
    # The stats agree with the op as well (same masks, same Dice).
    if out.spatial_masks is not None:
        torch.testing.assert_close(out.stats["spatial_dice"], mean_pairwise_dice(out.spatial_masks.flatten(2)).detach())


@pytest.mark.parametrize("layout", ["split", "single"])
@pytest.mark.parametrize("channels", [256, 19, 12])
def test_every_attention_layout_matches_plain_reference(channels, layout):
    # attention_layout is a speed knob: both layouts must give the spec's values.
    level = make_level(channels, 5, 3, SWITCH_SETS[0], attention_layout=layout)
    teacher, student = make_feats(2, channels, 5, (3, 4), (3, 4))
    fast, fast_grads = outputs_and_grads(level, teacher, student)
    ref, ref_grads = outputs_and_grads(level, teacher, student, acam_level_plain)
    assert_outputs_match(fast, ref, torch.float32)
    assert_grads_match(fast_grads, ref_grads, torch.float32)
