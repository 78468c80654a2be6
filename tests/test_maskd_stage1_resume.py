"""MasKD's stage 1 is kill-safe: a crash or a stop signal mid-way, then the same call again,
gives the same tokens as an uninterrupted run (acamkd.engine.maskd_tokens.learn_tokens)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from acamkd.config import load_config
from acamkd.engine.distributed import DistInfo
from acamkd.engine.maskd_tokens import PARTIAL_SUFFIX, learn_tokens, partial_path
from acamkd.engine.run import build_task
from acamkd.engine.trainer import TrainingInterrupted
from acamkd.methods.maskd import load_token_file
from test_maskd import DEMO, _random_teacher, tiny

ITERATIONS = 5  # 4 images, batch 2: two batches an epoch, so the run crosses two epoch boundaries


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(cfg, task, train_set, uninterrupted tokens) for a tiny detection teacher."""
    tmp = tmp_path_factory.mktemp("stage1")
    teacher = tmp / "teacher.pt"
    cfg = load_config(os.path.join(DEMO, "shapes_det_maskd.yaml"), [
        *tiny(tmp / "shapes", tmp / "run"), "teacher.backbone=resnet18", "train.steps=[2]", f"teacher.checkpoint={teacher}",
        f"method.options.token_iterations={ITERATIONS}", "method.options.token_checkpoint_every=2"])
    _random_teacher(cfg, teacher)
    task = build_task(cfg, DistInfo())
    train_set, _ = task.datasets()
    reference = str(tmp / "uninterrupted.safetensors")
    summary = learn_tokens(cfg, task, train_set, reference)
    assert summary["resumed_from"] == 0 and not os.path.exists(partial_path(reference))
    return cfg, task, train_set, load_token_file(reference)[0]


class FailingTask:
    """The task, except that its ``call``-th training forward (1-based) runs ``fault`` first."""

    def __init__(self, task, call: int, fault) -> None:
        self._task, self._call, self._fault, self.calls = task, call, fault, 0

    def student_forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self._call:
            self._fault()
        return self._task.student_forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._task, name)


def _crash():
    raise RuntimeError("simulated crash")


def test_a_crash_then_the_same_call_resumes_from_the_last_checkpoint_to_the_same_tokens(stage1, tmp_path):
    cfg, task, train_set, expected = stage1
    out = str(tmp_path / "tokens.safetensors")
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn_tokens(cfg, FailingTask(task, 4, _crash), train_set, out)  # after iteration 3; checkpoint at 2
    assert os.path.isfile(out + PARTIAL_SUFFIX) and not os.path.exists(out)
    summary = learn_tokens(cfg, task, train_set, out)
    assert summary["resumed_from"] == 2
    tokens = load_token_file(out)[0]
    assert tokens.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(tokens[name], value), name
    assert not os.path.exists(out + PARTIAL_SUFFIX)  # removed once the tokens are written


def test_a_stop_signal_saves_at_the_iteration_boundary_and_the_rerun_matches(stage1, tmp_path):
    cfg, task, train_set, expected = stage1
    out = str(tmp_path / "tokens.safetensors")
    with pytest.raises(TrainingInterrupted) as stop:  # mid-epoch: iteration 3 of 5, no periodic checkpoint there
        learn_tokens(cfg, FailingTask(task, 3, lambda: signal.raise_signal(signal.SIGTERM)), train_set, out)
    assert stop.value.step == 3 and stop.value.checkpoint == out + PARTIAL_SUFFIX
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is taken off again
    summary = learn_tokens(cfg, task, train_set, out)
    assert summary["resumed_from"] == 3
    tokens = load_token_file(out)[0]
    for name, value in expected.items():
        assert torch.equal(tokens[name], value), name


def test_a_checkpoint_of_other_settings_is_not_resumed(stage1, tmp_path):
    import dataclasses

    cfg, task, train_set, _ = stage1
    out = str(tmp_path / "tokens.safetensors")
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn_tokens(cfg, FailingTask(task, 4, _crash), train_set, out)
    other = dataclasses.replace(cfg, method=dataclasses.replace(
        cfg.method, options={**cfg.method.options, "token_lr": 0.005}))
    assert learn_tokens(other, task, train_set, out)["resumed_from"] == 0


def test_the_continue_hint_of_a_stage1_stop_is_the_same_command_without_resume(monkeypatch):
    from acamkd import cli

    monkeypatch.setattr("sys.argv", ["acamkd", "distill", "c.yaml", "--resume", "train.seed=1"])
    hint = cli._continue_hint("distill", "/runs/x/maskd_tokens.safetensors" + PARTIAL_SUFFIX)
    assert "stage 1 resumes" in hint and hint.endswith("acamkd distill c.yaml train.seed=1")
    assert "--resume" in cli._continue_hint("distill", "/runs/x/last.pt")


def test_the_checkpoint_cadence_is_a_checked_option():
    from acamkd.methods import parse_options
    from acamkd.methods.base import OptionError

    assert parse_options("maskd", {"token_checkpoint_every": 0}).token_checkpoint_every == 0
    with pytest.raises(OptionError, match="token_checkpoint_every"):
        parse_options("maskd", {"token_checkpoint_every": -1})
