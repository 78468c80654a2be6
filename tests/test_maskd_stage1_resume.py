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


TASKS = {  # detection: RetinaNet (no randomness in its forward); segmentation: DeepLabV3, whose
    # Dropout2d draws from the CPU generator in stage 1's training mode, with 5 images (the last
    # batch of an epoch is dropped there, kept in detection)
    "det": ("shapes_det_maskd.yaml", ["teacher.backbone=resnet18", "train.steps=[2]"]),
    "seg": ("shapes_seg_maskd.yaml", ["data.crop=[48,64]", "data.shapes.train=5"]),
}


@pytest.fixture(scope="module", params=sorted(TASKS))
def stage1(request, module_tmp_dir):
    """(cfg, task, train_set, uninterrupted tokens) for a tiny teacher of each task."""
    tmp = module_tmp_dir("stage1")
    teacher = tmp / "teacher.pt"
    config, extra = TASKS[request.param]
    cfg = load_config(os.path.join(DEMO, config), [
        *tiny(tmp / "shapes", tmp / "run"), *extra, f"teacher.checkpoint={teacher}",
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


def test_the_continue_hint_of_a_stage1_stop_is_the_same_command(monkeypatch, tmp_path):
    from acamkd import cli

    monkeypatch.setattr("sys.argv", ["acamkd", "distill", "c.yaml", "--resume", "train.seed=1"])
    partial = str(tmp_path / ("maskd_tokens.safetensors" + PARTIAL_SUFFIX))
    hint = cli._continue_hint("distill", partial)
    assert "stage 1 continues" in hint and hint.endswith("acamkd distill c.yaml train.seed=1")  # no checkpoint yet
    (tmp_path / "last.pt").write_bytes(b"")  # stage 1 rerun inside a resumed run: keep --resume
    assert cli._continue_hint("distill", partial).endswith("acamkd distill c.yaml --resume train.seed=1")
    assert "Resume with" in cli._continue_hint("distill", str(tmp_path / "last.pt"))


def test_a_stop_signal_in_the_last_iteration_writes_the_tokens_then_stops_distill(stage1, tmp_path, monkeypatch):
    from acamkd.engine import maskd_tokens

    cfg, task, train_set, expected = stage1
    out = str(tmp_path / "tokens.safetensors")
    failing = FailingTask(task, ITERATIONS, lambda: signal.raise_signal(signal.SIGTERM))
    summary = learn_tokens(cfg, failing, train_set, out)
    assert summary["stop_signal"] == signal.SIGTERM and not os.path.exists(out + PARTIAL_SUFFIX)
    for name, value in load_token_file(out)[0].items():
        assert torch.equal(value, expected[name]), name
    # inside distill (resolve_token_file), the signal stops the run before stage 2
    monkeypatch.setattr(maskd_tokens, "learn_tokens", lambda *a, **k: {"stop_signal": signal.SIGTERM})
    import dataclasses

    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "run")))
    with pytest.raises(TrainingInterrupted) as stop:
        maskd_tokens.resolve_token_file(run_cfg, task, train_set)
    assert stop.value.checkpoint == str(tmp_path / "run" / maskd_tokens.TOKEN_FILE_NAME)


def test_the_checkpoint_cadence_is_a_checked_option():
    from acamkd.methods import parse_options
    from acamkd.methods.base import OptionError

    assert parse_options("maskd", {"token_checkpoint_every": 0}).token_checkpoint_every == 0
    with pytest.raises(OptionError, match="token_checkpoint_every"):
        parse_options("maskd", {"token_checkpoint_every": -1})
