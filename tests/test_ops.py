"""acamkd.ops: the fused cross-attention and the masking / loss / Dice kernels, each against a
plain materialised or looped formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from acamkd.ops.attention import AttentionLayout, cross_attention_tokens
from acamkd.ops.masking import (
    EPS,
    channel_masks,
    masked_mse,
    mean_pairwise_dice,
    pairwise_dice,
    spatial_masks,
)

from _acam_helpers import dice, make_feats, make_level

FLASH = "_scaled_dot_product_flash_attention_for_cpu"


# ----------------------------------------------------------------------------- attention
def _attention_inputs(batch, tokens, channels, dtype, seed=0, qk_dim=None, value_dim=None):
    qk_dim = channels // 2 if qk_dim is None else qk_dim
    value_dim = channels if value_dim is None else value_dim
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype).requires_grad_(True)

    # Weights at the scale of a default-initialised 1x1 conv (~1/sqrt(fan_in)), so logits are
    # O(1) as in training; unit-variance weights would give logits ~C and a one-hot softmax.
    w = 1.5 / math.sqrt(channels)
    xq, xc = randn(batch, tokens, channels), randn(batch, tokens, channels)
    weights = [randn(qk_dim, channels, scale=w), randn(qk_dim, scale=0.5), randn(qk_dim, channels, scale=w),
               randn(qk_dim, scale=0.5), randn(value_dim, channels, scale=w), randn(value_dim, scale=0.5)]
    return xq, xc, weights


def _materialised(xq, xc, w_q, b_q, w_k, b_k, w_v, b_v):
    """softmax(q k^T / sqrt(C_q)) v with the (N, N) matrix in memory, no padding, no heads."""
    q = xq @ w_q.t() + (0 if b_q is None else b_q)
    k = xc @ w_k.t() + (0 if b_k is None else b_k)
    v = xc @ w_v.t() + (0 if b_v is None else b_v)
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(w_q.shape[0]), dim=-1)
    return attention @ v


@pytest.mark.parametrize("split", [True, False], ids=["split-heads", "single-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("channels,tokens", [(2, 5), (3, 7), (8, 35), (19, 35), (19, 1), (38, 12), (256, 9)])
def test_cross_attention_equals_materialised_softmax(channels, tokens, dtype, split):
    xq, xc, weights = _attention_inputs(2, tokens, channels, dtype)
    out = cross_attention_tokens(xq, xc, *weights, split_value_heads=split)
    expected = _materialised(xq, xc, *weights)
    assert out.shape == (2, tokens, channels) and out.dtype == dtype
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol * scale)
    # Gradients w.r.t. both token sets and all six projection tensors.
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    inputs = [xq, xc, *weights]
    got = torch.autograd.grad(out, inputs, cotangent)
    want = torch.autograd.grad(expected, inputs, cotangent)
    gscale = max(g.abs().max().item() for g in want)
    for name, g, w in zip(["xq", "xc", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v"], got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * gscale, msg=lambda m: f"grad {name}: {m}")


def test_cross_attention_without_biases():
    xq, xc, (w_q, _, w_k, _, w_v, _) = _attention_inputs(1, 10, 19, torch.float64)
    out = cross_attention_tokens(xq, xc, w_q, None, w_k, None, w_v, None)
    torch.testing.assert_close(out, _materialised(xq, xc, w_q, None, w_k, None, w_v, None), rtol=1e-10, atol=1e-12)


def test_cross_attention_value_bias_without_key_bias():
    xq, xc, (w_q, b_q, w_k, _, w_v, b_v) = _attention_inputs(1, 10, 8, torch.float64)
    out = cross_attention_tokens(xq, xc, w_q, b_q, w_k, None, w_v, b_v)
    torch.testing.assert_close(out, _materialised(xq, xc, w_q, b_q, w_k, None, w_v, b_v), rtol=1e-10, atol=1e-12)


def test_cross_attention_key_bias_without_value_bias():
    # b_k only shifts every logit of a query row by the same amount: softmax ignores it.
    xq, xc, (w_q, b_q, w_k, b_k, w_v, _) = _attention_inputs(1, 10, 8, torch.float64)
    out = cross_attention_tokens(xq, xc, w_q, b_q, w_k, b_k, w_v, None)
    torch.testing.assert_close(out, _materialised(xq, xc, w_q, b_q, w_k, b_k, w_v, None), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "qk_dim,value_dim,heads,head_dim",
    [
        (9, 19, 1, 24),  # Cityscapes logits: C = 19, C_q = 9, one head padded to 24
        (128, 256, 2, 128),  # FPN: v split into two heads of 128 sharing q/k
        (4, 8, 2, 8),
        (1, 2, 2, 8),
        (1, 3, 3, 8),
        (3, 6, 2, 8),
        (5, 10, 2, 8),
        (19, 38, 2, 24),
        (64, 128, 2, 64),
        (7, 15, 1, 16),
    ],
)
def test_attention_layout_for_dims(qk_dim, value_dim, heads, head_dim):
    layout = AttentionLayout.for_dims(qk_dim, value_dim)
    assert (layout.heads, layout.head_dim) == (heads, head_dim)
    assert layout.heads * layout.value_per_head == value_dim


@pytest.mark.parametrize("qk_dim,value_dim,head_dim", [(128, 256, 256), (9, 19, 24), (4, 8, 8), (1, 2, 8)])
def test_single_head_layout_pads_qk_up_to_value(qk_dim, value_dim, head_dim):
    layout = AttentionLayout.for_dims(qk_dim, value_dim, split_value=False)
    assert (layout.heads, layout.head_dim) == (1, head_dim)


@given(qk_dim=st.integers(1, 300), value_dim=st.integers(1, 600), split=st.booleans())
def test_attention_layout_invariants(qk_dim, value_dim, split):
    layout = AttentionLayout.for_dims(qk_dim, value_dim, split_value=split)
    assert layout.head_dim % 8 == 0
    assert layout.heads >= 1 and layout.heads * layout.value_per_head == value_dim
    assert qk_dim <= layout.head_dim < max(qk_dim, layout.value_per_head) + 8


@pytest.mark.parametrize("qk_dim,value_dim", [(0, 4), (4, 0), (-1, 2)])
def test_attention_layout_rejects_empty_dims(qk_dim, value_dim):
    with pytest.raises(ValueError, match="qk_dim"):
        AttentionLayout.for_dims(qk_dim, value_dim)


def _event_names(prof) -> set[str]:
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("channels", [19, 256])
def test_cpu_runs_flash_kernel_forward_and_backward(channels, dtype):
    """No (N, N) matrix: the CPU flash kernel runs, no softmax / bmm / math SDPA."""
    xq, xc, weights = _attention_inputs(1, 48, channels, dtype)
    with profile(activities=[ProfilerActivity.CPU]) as forward_prof:
        out = cross_attention_tokens(xq, xc, *weights)
    names = _event_names(forward_prof)
    assert any(FLASH in n and "backward" not in n for n in names), sorted(names)
    assert not any("softmax" in n or n == "aten::bmm" or "attention_math" in n for n in names), sorted(names)
    with profile(activities=[ProfilerActivity.CPU]) as backward_prof:
        out.float().square().sum().backward()
    names = _event_names(backward_prof)
    assert any(FLASH + "_backward" in n for n in names), sorted(names)
    assert not any("softmax" in n or n == "aten::bmm" or "attention_math" in n for n in names), sorted(names)
    assert xq.grad is not None and xc.grad is not None and weights[0].grad is not None


def test_acam_level_runs_flash_kernel():
    level = make_level(19, 8, 4)
    teacher, student = make_feats(2, 19, 8, (6, 5), (3, 3))
    with profile(activities=[ProfilerActivity.CPU]) as forward_prof:
        out = level(teacher, student)
    names = _event_names(forward_prof)
    assert any(FLASH in n for n in names) and not any("softmax" in n or "attention_math" in n for n in names)
    with profile(activities=[ProfilerActivity.CPU]) as backward_prof:
        sum(out.losses.values()).backward()
    assert any(FLASH + "_backward" in n for n in _event_names(backward_prof))


# ------------------------------------------------------------------------------- masking
def test_channel_masks_forms_match_formulas():
    gen = torch.Generator().manual_seed(3)
    pooled = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    a = torch.randn(3, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    paper = channel_masks(pooled, a, "paper")
    elementwise = channel_masks(pooled, A, "elementwise")
    article = channel_masks(pooled, A, "article")
    for b in range(2):
        for m in range(3):
            for k in range(5):
                assert paper[b, m, k].item() == pytest.approx(1 / (1 + math.exp(-a[m].item() * pooled[b, k].item())))
                assert elementwise[b, m, k].item() == pytest.approx(
                    1 / (1 + math.exp(-A[m, k].item() * pooled[b, k].item())))
                dot = sum(pooled[b, j].item() * A[m, j].item() for j in range(5))
                assert article[b, m, k].item() == pytest.approx(
                    1 / (1 + math.exp(-dot)) / (1 + math.exp(-A[m, k].item())))
    with pytest.raises(ValueError, match="channel_mask"):
        channel_masks(pooled, A, "global")


def test_spatial_masks_match_formula():
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)  # (B, N, C)
    units = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    masks = spatial_masks(tokens, units)
    assert masks.shape == (2, 3, 6)
    expected = torch.sigmoid(torch.einsum("mc,bnc->bmn", units, tokens))
    torch.testing.assert_close(masks, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", ["mass", "energy"])
def test_masked_mse_with_unit_masks_is_plain_mse(norm):
    gen = torch.Generator().manual_seed(6)
    teacher = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)  # (B, C, HW)
    student = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)
    plain = F.mse_loss(student, teacher)
    diff_sq = (teacher - student).square()
    ones = torch.ones(3, 4, 7, dtype=torch.float64)
    channel_loss = masked_mse(diff_sq.sum(2), ones, 11, norm)  # channel masks: K = C, other = HW
    spatial_loss = masked_mse(diff_sq.sum(1), torch.ones(3, 2, 11, dtype=torch.float64), 7, norm)
    torch.testing.assert_close(channel_loss, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(spatial_loss, plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm", ["mass", "energy"])
def test_masked_mse_matches_broadcast_formula(norm):
    gen = torch.Generator().manual_seed(7)
    diff = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)  # (B, K, other)
    masks = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    loss = masked_mse(diff.square().sum(2), masks, 9, norm)
    numerator = (masks[:, :, :, None] * diff[:, None]).square().sum((2, 3))
    denominator = (masks if norm == "mass" else masks.square()).sum(-1) * 9
    torch.testing.assert_close(loss, (numerator / denominator).mean(), rtol=1e-12, atol=0)


@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_masked_mse_mask_scale(scale, seed):
    """Spec "known risk": the mass-normalised loss is linear in the mask scale, the energy
    normalised one is invariant to it."""
    gen = torch.Generator().manual_seed(seed)
    sq_err = torch.rand(2, 6, generator=gen, dtype=torch.float64) + 0.1
    masks = torch.rand(2, 3, 6, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    mass, energy = masked_mse(sq_err, masks, 4, "mass"), masked_mse(sq_err, masks, 4, "energy")
    torch.testing.assert_close(masked_mse(sq_err, scale * masks, 4, "mass"), scale * mass, rtol=1e-10, atol=0)
    torch.testing.assert_close(masked_mse(sq_err, scale * masks, 4, "energy"), energy, rtol=1e-10, atol=0)


def test_masked_mse_zero_masks_give_zero_not_nan():
    sq_err = torch.rand(2, 6, dtype=torch.float64)
    for norm in ("mass", "energy"):
        loss = masked_mse(sq_err, torch.zeros(2, 3, 6, dtype=torch.float64), 4, norm)
        assert torch.isfinite(loss) and loss.item() == 0.0
    with pytest.raises(ValueError, match="mask_norm"):
        masked_mse(sq_err, torch.ones(2, 3, 6, dtype=torch.float64), 4, "mean")


def test_dice_identical_disjoint_partial():
    identical = torch.tensor([[[0.2, 0.9, 0.4, 0.7], [0.2, 0.9, 0.4, 0.7]]])
    disjoint = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    partial = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]])  # 2*1 / (2 + 2)
    assert mean_pairwise_dice(identical).item() == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_dice(disjoint).item() == 0.0
    assert mean_pairwise_dice(partial).item() == pytest.approx(0.5, abs=1e-7)
    # Three masks, soft overlap: in between, and equal to the looped mean over ordered pairs.
    soft = torch.tensor([[[0.9, 0.8, 0.1, 0.0], [0.1, 0.7, 0.9, 0.2], [0.0, 0.1, 0.3, 0.9]]], dtype=torch.float64)
    pairs = [dice(soft[0, i], soft[0, j]).item() for i in range(3) for j in range(3) if i != j]
    value = mean_pairwise_dice(soft).item()
    assert 0.0 < value < 1.0
    assert value == pytest.approx(sum(pairs) / 6, rel=1e-12)


def test_dice_single_mask_and_zero_masks():
    assert mean_pairwise_dice(torch.rand(2, 1, 5)).item() == 0.0
    zeros = mean_pairwise_dice(torch.zeros(2, 3, 5))
    assert torch.isfinite(zeros) and zeros.item() == 0.0


@given(batch=st.integers(1, 3), num_masks=st.integers(2, 5), units=st.integers(1, 9),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_pairwise_dice_properties(batch, num_masks, units, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num_masks, units, generator=gen, dtype=torch.float64) + 1e-3
    d = pairwise_dice(masks)
    assert d.shape == (batch, num_masks, num_masks)
    torch.testing.assert_close(d, d.transpose(1, 2))  # symmetric
    torch.testing.assert_close(torch.diagonal(d, dim1=1, dim2=2), torch.ones(batch, num_masks, dtype=torch.float64))
    assert (d >= 0).all() and (d <= 1 + 1e-12).all()
    torch.testing.assert_close(pairwise_dice(scale * masks), d)  # joint scale invariance
    b, i, j = batch - 1, 0, num_masks - 1
    assert d[b, i, j].item() == pytest.approx(dice(masks[b, i], masks[b, j]).item(), rel=1e-12)
    mean = mean_pairwise_dice(masks).item()
    off = ~torch.eye(num_masks, dtype=torch.bool)
    assert mean == pytest.approx(d[:, off].mean().item(), rel=1e-12)


def test_eps_is_tiny():
    # The denominator floor must not bias ordinary values.
    assert 0 < EPS <= 1e-10
