"""Shared builders and comparison helpers for the ACAM-KD tests (not a test module)."""
from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from acamkd.methods.acam import ACAMLevel, ACAMLevelOutput

SWITCH_KEYS = ("query", "channel_mask", "mask_norm", "masks")
QUERIES = ("teacher", "student")
CHANNEL_FORMS = ("paper", "elementwise", "article")
NORMS = ("mass", "energy")
FAMILIES = ("both", "spatial", "channel")

# Hand-picked switch sets: every value of every switch appears, every mask_norm meets every
# mask family, every query side meets every mask family, and every channel-mask form is run
# both with and without the spatial family. (channel_mask is irrelevant when masks="spatial".)
SWITCH_SETS = [
    ("teacher", "paper", "mass", "both"),  # the paper's defaults
    ("student", "elementwise", "energy", "both"),
    ("teacher", "article", "energy", "both"),
    ("student", "paper", "mass", "both"),
    ("student", "article", "mass", "channel"),
    ("teacher", "elementwise", "mass", "channel"),
    ("teacher", "paper", "energy", "channel"),
    ("student", "paper", "energy", "spatial"),
    ("teacher", "elementwise", "mass", "spatial"),
]

# Every combination (cheap enough for tests that run only the fast path).
ALL_SWITCH_SETS = list(itertools.product(QUERIES, CHANNEL_FORMS, NORMS, FAMILIES))


def switch_id(switches) -> str:
    return "-".join(switches)


def switch_kwargs(switches) -> dict[str, str]:
    return dict(zip(SWITCH_KEYS, switches))


def make_level(teacher_channels: int, student_channels: int, num_masks: int = 3, switches=SWITCH_SETS[0],
               dtype: torch.dtype = torch.float32, seed: int = 0, init_std: float = 0.5,
               **options) -> ACAMLevel:
    """A seeded level. ``init_std`` defaults to 0.5 so that masks are far from a flat 0.5."""
    torch.manual_seed(seed)
    level = ACAMLevel(teacher_channels, student_channels, num_masks=num_masks, init_std=init_std,
                      **switch_kwargs(switches), **options)
    return level.to(dtype)


def make_feats(batch: int, teacher_channels: int, student_channels: int, teacher_hw, student_hw=None,
               dtype: torch.dtype = torch.float32, seed: int = 1, requires_grad: bool = True):
    """Seeded ``(teacher_feat, student_feat)``; the student grid defaults to the teacher's."""
    student_hw = teacher_hw if student_hw is None else student_hw
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, teacher_channels, *teacher_hw, generator=gen, dtype=torch.float64)
    student = torch.randn(batch, student_channels, *student_hw, generator=gen, dtype=torch.float64)
    teacher = teacher.to(dtype).requires_grad_(requires_grad)
    student = student.to(dtype).requires_grad_(requires_grad)
    return teacher, student


def run_fast(level: ACAMLevel, teacher: Tensor, student: Tensor) -> ACAMLevelOutput:
    return level(teacher, student)


def outputs_and_grads(level: ACAMLevel, teacher: Tensor, student: Tensor,
                      fn: Callable[[ACAMLevel, Tensor, Tensor], ACAMLevelOutput] = run_fast):
    """Run ``fn`` and return its output and the gradient of the summed losses w.r.t. every
    parameter of the level, the teacher feature and the student feature (by name)."""
    out = fn(level, teacher, student)
    total = sum(out.losses.values())
    names = [name for name, _ in level.named_parameters()] + ["teacher_feat", "student_feat"]
    inputs = list(level.parameters()) + [teacher, student]
    grads = torch.autograd.grad(total, inputs)
    return out, dict(zip(names, grads))


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the scale of the compared quantity)."""
    return {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}[dtype]


def assert_close_scaled(actual: Tensor, expected: Tensor, rtol: float, atol: float, scale: float | None = None,
                        what: str = "") -> None:
    """``assert_close`` whose ``atol`` is relative to ``scale`` (default: max |expected|)."""
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_outputs_match(fast: ACAMLevelOutput, ref: ACAMLevelOutput, dtype: torch.dtype) -> None:
    rtol, atol = tolerances(dtype)
    assert set(fast.losses) == set(ref.losses)
    for key in ref.losses:
        assert fast.losses[key].shape == ()
        assert fast.losses[key].dtype == dtype
        assert_close_scaled(fast.losses[key], ref.losses[key], rtol, atol, what=f"loss {key}")
    for name in ("channel_masks", "spatial_masks"):
        fast_m, ref_m = getattr(fast, name), getattr(ref, name)
        assert (fast_m is None) == (ref_m is None), name
        if ref_m is not None:
            assert fast_m.shape == ref_m.shape, name
            assert_close_scaled(fast_m, ref_m, rtol, atol, what=name)
    for name in ("fused", "aligned_student"):
        fast_t, ref_t = getattr(fast, name), getattr(ref, name)
        assert fast_t.shape == ref_t.shape, name
        assert_close_scaled(fast_t, ref_t, rtol, atol, what=name)


def assert_grads_match(fast: dict[str, Tensor], ref: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Every gradient, with ``atol`` relative to the largest gradient of the reference (some
    gradients, e.g. the key bias's, are mathematically zero)."""
    rtol, atol = tolerances(dtype)
    assert set(fast) == set(ref)
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0
    for name in ref:
        assert fast[name].shape == ref[name].shape, name
        assert_close_scaled(fast[name], ref[name], rtol, atol, scale=scale, what=f"grad of {name}")


def dice(x: Tensor, y: Tensor) -> Tensor:
    """Soft Dice of two flat masks, written out independently of acamkd.ops."""
    return 2 * (x * y).sum() / ((x * x).sum() + (y * y).sum())


def mean_offdiag_dice(masks: Tensor) -> float:
    """mean_b mean_{i != j} Dice over ``(B, M, ...)`` masks, with python loops."""
    masks = masks.flatten(2).double()
    B, M = masks.shape[:2]
    if M < 2:
        return 0.0
    values = [dice(masks[b, i], masks[b, j]).item() for b in range(B) for i in range(M) for j in range(M) if i != j]
    return sum(values) / len(values)


# ------------------------------------------------------------- switches against mask collapse
# Keyword sets of the anti-collapse switches (ACAMLevel arguments). mass_beta None resolves to 0
# (descend, detach) or 10 (adversarial); 2.5 switches the floor on everywhere.
COLLAPSE_KEYS = ("mask_activation", "mask_grad", "fusion_student_grad", "mass_beta")
ACTIVATIONS = ("sigmoid", "partition")
MASK_GRADS = ("descend", "adversarial", "detach")
ALL_COLLAPSE_SETS = list(itertools.product(ACTIVATIONS, MASK_GRADS, (True, False), (None, 2.5)))


def collapse_id(values) -> str:
    activation, grad, fusion, beta = values
    return f"{activation}-{grad}-{'fusion' if fusion else 'nofusion'}-beta{beta}"


def collapse_kwargs(values) -> dict:
    return dict(zip(COLLAPSE_KEYS, values))


def variant(level: ACAMLevel, **changes) -> ACAMLevel:
    """A level with the same parameters as ``level`` and some constructor arguments changed
    (every switch that keeps the parameter shapes)."""
    kwargs = dict(teacher_channels=level.teacher_channels, student_channels=level.student_channels,
                  num_masks=level.num_masks, alpha=level.alpha, lam=level.lam, query=level.query,
                  channel_mask=level.channel_mask, mask_norm=level.mask_norm, masks=level.masks,
                  attention_layout=level.attention_layout, mask_activation=level.mask_activation,
                  mask_grad=level.mask_grad, mass_rho=level.mass_rho, mass_beta=level.mass_beta,
                  fusion_student_grad=level.fusion_student_grad, diagnostics=level.diagnostics,
                  feature_norm=level.feature_norm)
    kwargs.update(changes)
    other = ACAMLevel(**kwargs).to(next(level.parameters()).dtype)
    other.load_state_dict(level.state_dict())
    return other


def grads_of(loss: Tensor, named: dict[str, Tensor]) -> dict[str, Tensor]:
    """d loss / d each tensor of ``named`` (zeros where it does not depend on one)."""
    grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True, allow_unused=True)
    return {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(named.items(), grads)}


def partition_sums(masks: Tensor) -> Tensor:
    """sum over the mask axis (1) of ``(B, M, ...)`` masks, in fp64."""
    return masks.double().sum(1)
