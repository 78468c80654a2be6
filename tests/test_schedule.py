"""Warm-up and decay rules, and that a rebuilt scheduler resumes at the same lr."""
import math

import pytest
import torch

from acamkd.engine.schedule import build_optimizer, build_scheduler, lr_factor


def test_mmdet_2x_step_schedule_with_linear_warmup():
    # 24 epochs of 100 iterations, steps at epochs 16 and 22, warm-up 500 from 0.001.
    kw = dict(total=2400, schedule="step", milestones=[1600, 2200], warmup_iters=500, warmup_ratio=0.001)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(250, **kw) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(500, **kw) == 1.0
    assert lr_factor(1599, **kw) == 1.0
    assert lr_factor(1600, **kw) == pytest.approx(0.1)
    assert lr_factor(2200, **kw) == pytest.approx(0.01)


def test_poly_and_cosine_end_at_zero():
    assert lr_factor(0, 100, "poly") == 1.0
    assert lr_factor(50, 100, "poly", poly_power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, "poly") == 0.0
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_scheduler_resumes_from_its_state():
    def run(n, state=None):
        model = torch.nn.Linear(2, 2)
        opt = build_optimizer(model.parameters(), "sgd", lr=0.02)
        sched = build_scheduler(opt, total=100, schedule="poly", warmup_iters=10)
        if state is not None:
            opt.load_state_dict(state[0]), sched.load_state_dict(state[1])
        lrs = []
        for _ in range(n):
            opt.step(), sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, (opt.state_dict(), sched.state_dict())

    straight, _ = run(30)
    first, state = run(12)
    second, _ = run(18, state)
    assert first + second == pytest.approx(straight)
    assert straight[-1] == pytest.approx(0.02 * (1 - 30 / 100) ** 0.9)


def test_bad_names_are_rejected_with_the_key():
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(0, 10, "linear")
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(torch.nn.Linear(1, 1).parameters(), "lion", lr=0.1)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen.parameters(), "sgd", lr=0.1)
    assert isinstance(build_optimizer(torch.nn.Linear(1, 1).parameters(), "adamw", lr=1e-3), torch.optim.AdamW)
    assert math.isclose(lr_factor(5, 10, "step", milestones=[3], gamma=0.5), 0.5)


def test_cosine_and_poly_end_at_min_ratio():
    assert lr_factor(100, 100, "cosine", min_ratio=0.05) == pytest.approx(0.05)
    assert lr_factor(0, 100, "poly", min_ratio=0.05) == pytest.approx(1.0)
    assert lr_factor(50, 100, "poly", poly_power=1.0, min_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
