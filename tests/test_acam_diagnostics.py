"""ACAM's collapse warnings (``health_warnings``), the distillation-gradient probe, and the
diagnostics of ``statistics()`` (``diagnostics=True``), each against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch

from acamkd.methods import ACAM, DistillMethod
from acamkd.methods.acam import PAPER_MODE, box_cover, level_stride
from acamkd.methods.batch import DistillBatch

TEACHER = {"p3": 8, "p4": 6}
STUDENT = {"p3": 4, "p4": 6}
GRIDS = {"p3": (8, 10), "p4": (4, 5)}  # stride 8 and 16 of a 64 x 80 input


def make_method(**options):
    torch.manual_seed(0)
    return ACAM(TEACHER, STUDENT, **{"num_masks": 3, **PAPER_MODE, **options})  # the paper mode unless overridden


class Run:
    """Fixed teacher features and inputs; the student features come out of a 1x1 conv (a
    stand-in student) so the task loss and the method share the tap output, as in the engine."""

    def __init__(self, method, batch=2, seed=1, task_weight=100.0):
        self.method, self.task_weight = method, task_weight
        gen = torch.Generator().manual_seed(seed)
        self.teacher = {n: torch.randn(batch, TEACHER[n], *GRIDS[n], generator=gen) for n in TEACHER}
        self.inputs = {n: torch.randn(batch, STUDENT[n], *GRIDS[n], generator=gen) for n in TEACHER}
        torch.manual_seed(seed)
        self.convs = {n: torch.nn.Conv2d(STUDENT[n], STUDENT[n], 1) for n in TEACHER}

    def student(self):
        return {n: self.convs[n](self.inputs[n]) for n in TEACHER}

    def step(self, batch=None):
        student = self.student()
        losses = self.method(self.teacher, student, batch=batch)
        task = self.task_weight * sum(s.pow(2).mean() for s in student.values())
        for s in student.values():
            s.retain_grad()
        (task + sum(losses.values())).backward()
        return losses, student


def collapse(method, names=("p3", "p4")):
    """Drive every mask of the levels to ~1e-13: constant fused feature (value projection 0,
    bias 1), so every logit is the sum of a mask's units, set very negative."""
    with torch.no_grad():
        for name in names:
            level = method.level(name)
            level.value_proj.weight.zero_()
            level.value_proj.bias.fill_(1.0)
            level.channel_units.fill_(-30.0)
            level.spatial_units.fill_(-30.0 / level.teacher_channels)


# ------------------------------------------------------------------ the gradient probe
def test_probe_measures_the_method_share_of_the_gradient():
    method = make_method()
    run = Run(method)
    # Expected: the gradient of the distillation losses alone at the student features.
    student = run.student()
    losses = method(run.teacher, student)
    assert "p3.distill_grad_norm" not in method.statistics()  # no backward yet
    expected = torch.autograd.grad(sum(losses.values()), list(student.values()))
    method = make_method()  # a fresh one, same parameters
    run.method = method
    # The engine's way: task + distillation summed, one backward.
    _, student = run.step()
    stats = method.statistics()
    for (name, s), grad in zip(student.items(), expected):
        assert stats[f"{name}.distill_grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-5)
        # ...and not the total gradient at the tap output, which the task loss dominates.
        assert s.grad.norm().item() > 10 * stats[f"{name}.distill_grad_norm"]


def test_probe_changes_no_value_and_no_gradient():
    method = make_method()
    run = Run(method)
    with torch.no_grad():  # no probe without grad
        plain = method(run.teacher, run.student())
    student = run.student()
    losses = method(run.teacher, student)
    for key, value in plain.items():
        assert torch.equal(losses[key], value), key
    grads = torch.autograd.grad(sum(losses.values()), list(student.values()))
    # The same level called directly (no probe) gives the same gradient, bit for bit.
    student_plain = {n: s.detach().requires_grad_() for n, s in student.items()}
    for (name, s), grad in zip(student_plain.items(), grads):
        level_losses = method.level(name)(run.teacher[name], s).losses
        (expected,) = torch.autograd.grad(sum(level_losses.values()), [s])
        assert torch.equal(grad, expected), name


# ---------------------------------------------------------------------- health warnings
def test_base_method_has_no_warnings():
    assert DistillMethod().health_warnings() == []
    assert make_method().health_warnings() == []  # nothing observed yet


def test_healthy_run_does_not_warn():
    method = make_method()
    run = Run(method)
    for _ in range(40):
        run.step()
    assert method.health_warnings() == []


def test_collapsing_run_warns_once_per_level_and_kind():
    method = make_method()
    run = Run(method)
    for _ in range(6):  # a healthy start: the gradient's baseline
        run.step()
    collapse(method, names=("p3",))
    for _ in range(method.collapse_patience - 1):
        run.step()
    assert method.health_warnings() == []  # not yet: patience
    run.step()
    warnings = method.health_warnings()
    assert len(warnings) == 3, warnings  # spatial, channel, gradient of p3; p4 is healthy
    assert all("level 'p3'" in w for w in warnings)
    assert any("spatial masks collapsed" in w for w in warnings)
    assert any("channel masks collapsed" in w for w in warnings)
    assert any("distillation gradient at the student feature has faded" in w for w in warnings)
    for _ in range(3):
        run.step()
    assert method.health_warnings() == []  # each warning once
    stats = method.statistics()
    assert stats["p3.spatial_mask_mean"] < 1e-10 and stats["p4.spatial_mask_mean"] > 0.1


def test_warning_rearms_after_recovery():
    method = make_method()
    run = Run(method)
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    for _ in range(6):
        run.step()
    collapse(method, names=("p4",))
    for _ in range(method.collapse_patience):
        run.step()
    assert len(method.health_warnings()) == 3
    method.load_state_dict(saved)  # recovered
    run.step()
    assert method.health_warnings() == []  # the conditions cleared: re-armed
    collapse(method, names=("p4",))
    for _ in range(method.collapse_patience):
        run.step()
    again = method.health_warnings()
    assert len(again) == 3 and all("level 'p4'" in w for w in again)


def test_no_grad_forwards_do_not_count():
    method = make_method()
    run = Run(method)
    collapse(method)
    with torch.no_grad():
        for _ in range(method.collapse_patience + 5):
            method(run.teacher, run.student())
    assert method.health_warnings() == []


def test_partition_masks_cannot_collapse_and_do_not_warn():
    method = make_method(mask_activation="partition")
    run = Run(method)
    for _ in range(6):
        run.step()
    collapse(method)  # the same logits: under partition every unit's masks still sum to 1
    for _ in range(method.collapse_patience + 5):
        run.step()
    assert method.health_warnings() == []
    assert method.statistics()["p3.spatial_mask_mean"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- statistics
def _batch(boxes=True):
    b = [torch.tensor([[0.0, 0.0, 20.0, 12.0], [40.0, 30.0, 79.0, 63.0]]), torch.zeros(0, 4)]
    return DistillBatch(input_size=(64, 80), image_sizes=[(64, 80), (60, 70)], boxes=b if boxes else None,
                        labels=[torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)] if boxes else None)


BASE_KEYS = ("spatial_mask_mean", "channel_mask_mean", "spatial_dice", "channel_dice")
DIAG_KEYS = tuple(f"{f}_{k}" for f in ("spatial", "channel")
                  for k in ("mask_min_mass", "mask_max_mass", "participation", "error_corr"))
BOX_KEYS = ("spatial_box_mass_share", "spatial_box_mass_share_max", "box_area_share")


def test_diagnostics_are_on_by_default_can_be_switched_off_and_are_keyed_per_level():
    method = make_method(diagnostics=False)
    run = Run(method)
    run.step(_batch())
    assert set(method.statistics()) == {f"{n}.{k}" for n in TEACHER for k in BASE_KEYS + ("distill_grad_norm",)}
    method = make_method()  # the default: every ACAM-KD log carries the diagnostics
    run = Run(method)
    run.step(_batch())
    keys = BASE_KEYS + DIAG_KEYS + BOX_KEYS + ("distill_grad_norm",)
    stats = method.statistics()
    assert set(stats) == {f"{n}.{k}" for n in TEACHER for k in keys}
    assert all(type(v) is float and math.isfinite(v) for v in stats.values())
    run.step(None)  # no batch: no box statistics
    assert not any(k.endswith(BOX_KEYS) for k in method.statistics())
    run.step(_batch(boxes=False))  # a segmentation batch: none either
    assert not any(k.endswith(BOX_KEYS) for k in method.statistics())


def _pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt((x * x).sum().item() * (y * y).sum().item())
    return 0.0 if denominator == 0 else (x * y).sum().item() / denominator


@pytest.mark.parametrize("activation", ["sigmoid", "partition"])
def test_diagnostics_match_an_independent_computation(activation):
    method = make_method(diagnostics=True, init_std=0.5, mask_activation=activation)
    run = Run(method)
    batch = _batch()
    run.step(batch)
    stats = method.statistics()
    outputs = method.inspect(run.teacher, {n: run.convs[n](run.inputs[n]) for n in TEACHER})
    for name, out in outputs.items():
        aligned, teacher = out.aligned_student.double(), run.teacher[name].double()
        d2 = (teacher - aligned) ** 2  # (B, C, H, W)
        families = {"channel": (out.channel_masks.double(), d2.sum((2, 3))),
                    "spatial": (out.spatial_masks.flatten(2).double(), d2.sum(1).flatten(1))}
        for family, (masks, error) in families.items():
            B, M, _ = masks.shape
            per_mask = [masks[:, m].mean().item() for m in range(M)]
            assert stats[f"{name}.{family}_mask_min_mass"] == pytest.approx(min(per_mask), rel=1e-5)
            assert stats[f"{name}.{family}_mask_max_mass"] == pytest.approx(max(per_mask), rel=1e-5)
            ratios = []
            for b in range(B):
                mass = [masks[b, m].mean().item() for m in range(M)]
                ratios.append(sum(mass) ** 2 / (M * sum(x * x for x in mass)))
            assert stats[f"{name}.{family}_participation"] == pytest.approx(sum(ratios) / B, rel=1e-5)
            corr = [_pearson(masks[b, m], error[b]) for b in range(B) for m in range(M)]
            assert stats[f"{name}.{family}_error_corr"] == pytest.approx(sum(corr) / len(corr), abs=1e-5)
        # Boxes: stride from the grid, cells touched by a box, mask mass inside.
        H, W = GRIDS[name]
        stride = {"p3": 8, "p4": 16}[name]
        cover = torch.zeros(2, H, W, dtype=torch.float64)
        for b, boxes in enumerate(batch.boxes):
            for x1, y1, x2, y2 in (boxes / stride).tolist():
                for i in range(H):
                    for j in range(W):
                        if j < x2 and j + 1 > x1 and i < y2 and i + 1 > y1:
                            cover[b, i, j] = 1.0
        masks = out.spatial_masks.double()
        shares = [(masks[:, m] * cover).sum().item() / masks[:, m].sum().item() for m in range(masks.shape[1])]
        assert stats[f"{name}.spatial_box_mass_share"] == pytest.approx(sum(shares) / len(shares), rel=1e-5)
        assert stats[f"{name}.spatial_box_mass_share_max"] == pytest.approx(max(shares), rel=1e-5)
        assert stats[f"{name}.box_area_share"] == pytest.approx(cover.mean().item(), rel=1e-6)
        assert 0 < cover.mean().item() < 1


def test_partition_has_masses_summing_to_one_and_participation_in_range():
    method = make_method(diagnostics=True, mask_activation="partition", init_std=1.0)
    Run(method).step()
    stats = method.statistics()
    for name in TEACHER:
        for family in ("spatial", "channel"):
            assert 1 / 3 - 1e-6 <= stats[f"{name}.{family}_participation"] <= 1 + 1e-6
            low, high = stats[f"{name}.{family}_mask_min_mass"], stats[f"{name}.{family}_mask_max_mass"]
            assert low <= 1 / 3 + 1e-6 and high >= 1 / 3 - 1e-6  # the masses average 1/M


def test_statistics_and_warnings_take_one_host_sync(monkeypatch):
    method = make_method(diagnostics=True)
    run = Run(method)
    for _ in range(6):
        run.step(_batch())
    calls = {"tolist": 0}
    original = torch.Tensor.tolist

    def counting_tolist(self):
        calls["tolist"] += 1
        return original(self)

    def no_sync(self, *args, **kwargs):
        raise AssertionError("an extra host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    monkeypatch.setattr(torch.Tensor, "__float__", no_sync)
    stats = method.statistics()
    assert calls["tolist"] == 1 and len(stats) == 2 * (4 + 8 + 3 + 1)
    method.health_warnings()
    assert calls["tolist"] == 2


def test_inspect_does_not_touch_the_diagnostics():
    method = make_method(diagnostics=True)
    run = Run(method)
    run.step(_batch())
    stats = method.statistics()
    other = Run(method, seed=7)
    method.inspect(other.teacher, other.student(), batch=_batch())
    assert method.statistics() == stats


# ------------------------------------------------------------------------------- helpers
def test_level_stride_from_input_and_grid():
    for stride in (4, 8, 16, 32, 64, 128):  # 800 x 1344 (padded to 32), grids ceil(H / s)
        grid = (math.ceil(800 / stride), math.ceil(1344 / stride))
        assert level_stride((800, 1344), grid) == stride
    assert level_stride((512, 1024), (64, 128)) == 8  # Cityscapes logits


def test_box_cover_marks_the_cells_a_box_touches():
    boxes = [torch.tensor([[0.5, 1.0, 2.0, 2.5]]), torch.zeros(0, 4)]
    cover = box_cover(boxes, (4, 3), torch.device("cpu"))
    expected = torch.zeros(2, 4, 3)
    expected[0, 1:3, 0:2] = 1.0  # columns 0, 1 (x in [0.5, 2)); rows 1, 2 (y in [1, 2.5))
    assert torch.equal(cover, expected)
