"""Runs that are never lost or mixed (docs/reliability.md, fault classes 4-6):

* signals (SIGTERM, Ctrl-C) save at the next step boundary and resume bit-identically;
* a validation that fails never costs trained steps (saved before validating);
* one run per folder (a lock), no silent restart over a finished run (--resume / --overwrite);
* half-written checkpoints are cleaned up, the previous checkpoint is kept, flipped bytes are caught;
* a resume with a changed configuration is refused, naming each key (allowed keys are used and recorded);
* output folders and exports that cannot be written, and a full disk, give named errors.
"""
from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
import yaml
from _cli_helpers import acamkd, signal_after_step

from acamkd.config import load_config
from acamkd.engine import checkpoint as ckpt_mod
from acamkd.engine.checkpoint import (
    CheckpointCorrupted,
    CheckpointWriteError,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from acamkd.engine.resume_config import ResumeConfigError
from acamkd.engine.run import prepare, train
from acamkd.engine.run_folder import OutputDirError, RunFolderBusy, RunFolderLock

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def tiny(root, out, iterations=4, workers=0):
    """A few seconds of RetinaNet-R18 training on 8 built-in images (4 batches an epoch)."""
    return [f"data.root={root}", "data.shapes.train=8", "data.shapes.val=2", "data.shapes.size=[64,64]",
            "data.min_size=64", "data.max_size=64", "data.batch_size=2", f"data.workers={workers}",
            "student.backbone=resnet18", "train.epochs=null", f"train.iterations={iterations}",
            "train.schedule=cosine", "train.warmup_iters=1", "train.log_every=1", "train.val_every=0",
            "train.checkpoint_every=0", f"train.output_dir={out}"]


def cfg_of(root, out, *extra, **kw):
    return load_config(os.path.join(DEMO, "shapes_det_student.yaml"), [*tiny(root, out, **kw), *extra])


def same_weights(a: str, b: str) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x["step"] == y["step"]
    for key in x["student"]:
        assert torch.equal(x["student"][key], y["student"][key]), key


# ------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("signum, workers, group", [(signal.SIGTERM, 2, False), (signal.SIGINT, 2, True)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_saves_and_resumes_bit_identically(tmp_path, signum, workers, group):
    root = tmp_path / "shapes"
    args = ["train", f"{DEMO}/shapes_det_student.yaml", *tiny(root, tmp_path / "straight", 6, workers)]
    acamkd(*args)
    stopped = tmp_path / "stopped"
    run = ["train", f"{DEMO}/shapes_det_student.yaml", *tiny(root, stopped, 6, workers)]
    proc = signal_after_step(run, stopped / "metrics.jsonl", signum, step=2, group=group)
    assert proc.returncode == 128 + signum, proc.stderr_text[-2000:]
    assert "Traceback" not in proc.stderr_text
    assert f"stopped by {signal.Signals(signum).name} at step" in proc.stderr_text
    assert "--resume" in proc.stderr_text.splitlines()[-1]
    state = torch.load(stopped / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 6  # saved at the step boundary after the signal
    acamkd(*run, "--resume")
    same_weights(tmp_path / "straight" / "last.pt", stopped / "last.pt")
    assert json.loads((tmp_path / "straight" / "final_metrics.json").read_text()) == json.loads(
        (stopped / "final_metrics.json").read_text())


# ------------------------------------------------------------------------------ validation failures
def test_a_failing_final_validation_keeps_every_trained_step(tmp_path, monkeypatch):
    trainer = prepare(cfg_of(tmp_path / "shapes", tmp_path / "run", iterations=3), "train")
    monkeypatch.setattr(trainer.task, "evaluate", lambda *a: (_ for _ in ()).throw(ValueError("bad val file")))
    with pytest.raises(ValueError, match="bad val file"):
        trainer.fit()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3  # checkpoint_every=0


def test_a_failing_periodic_validation_keeps_the_steps_before_it(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path / "shapes", tmp_path / "run", "train.val_every=2", iterations=4)
    trainer = prepare(cfg, "train")
    monkeypatch.setattr(trainer.task, "evaluate", lambda *a: (_ for _ in ()).throw(ValueError("bad val file")))
    with pytest.raises(ValueError):
        trainer.fit()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_an_unknown_label_id_in_one_val_label_map_loses_nothing(tmp_path):
    """The issue's case: segmentation, train.checkpoint_every=0, one val label map broken. The run
    stops with the file named, its steps saved; once the file is fixed, --resume only validates."""
    import numpy as np
    from PIL import Image

    root, out = tmp_path / "shapes", tmp_path / "seg"
    args = ["train", f"{DEMO}/shapes_seg_student.yaml", f"data.root={root}", "data.shapes.train=4",
            "data.shapes.val=2", "data.shapes.size=[64,64]", "data.crop=[48,48]", "data.batch_size=2",
            "data.workers=0", "train.iterations=2", "train.warmup_iters=1", "train.log_every=1", "train.val_every=0",
            "train.checkpoint_every=0", "eval.batch_size=1", f"train.output_dir={out}"]
    from acamkd.data.synthetic import make_shapes

    make_shapes(str(root), train=4, val=2, size=(64, 64), seed=0, difficulty="normal")
    label_file = sorted((root / "cityscapes" / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]
    good = np.array(Image.open(label_file))
    bad = good.copy()
    bad[0, 0] = 77  # not a class of the 9, not the ignore label 255
    Image.fromarray(bad).save(label_file)
    proc = acamkd(*args, check=False)
    assert proc.returncode == 1 and label_file.name in proc.stderr and "Traceback" not in proc.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    Image.fromarray(good).save(label_file)
    acamkd(*args, "--resume")
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2]  # nothing was trained twice


# ------------------------------------------------------------------------------ one run per folder
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    cfg = cfg_of(tmp_path / "shapes", tmp_path / "run", iterations=1)
    with RunFolderLock(tmp_path / "run"):  # another run holds the folder
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            train(cfg)
        proc = acamkd("train", f"{DEMO}/shapes_det_student.yaml", *tiny(tmp_path / "shapes", tmp_path / "run", 1),
                      check=False)
        assert proc.returncode == 1 and "being written by another acamkd run" in proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    train(cfg)  # the lock went with its holder
    assert (tmp_path / "run" / "last.pt").exists()


def test_a_new_run_over_a_finished_one_needs_resume_or_overwrite(tmp_path):
    cfg = cfg_of(tmp_path / "shapes", tmp_path / "run", iterations=1)
    train(cfg)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(OutputDirError, match="already holds a run .*--resume.*--overwrite"):
        train(cfg)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    (tmp_path / "run" / "tensorboard" / "keep-me").write_text("x")
    train(cfg, overwrite=True)
    assert not (tmp_path / "run" / "tensorboard" / "keep-me").exists()  # the old run's files are gone
    assert len([line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"]) == 1


# ------------------------------------------------------------------------------ checkpoints on disk
def _flip_a_tensor_byte(path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    needle = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = data.find(needle)
    assert at >= 0, "tensor bytes not found in the checkpoint"
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_caught_and_the_previous_checkpoint_is_used(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.full((256,), 1.5)})
    save_checkpoint(path, {"step": 2, "w": torch.full((256,), 2.5)})
    assert load_checkpoint(tmp_path / "prev.pt")["step"] == 1  # the previous one is kept
    _flip_a_tensor_byte(path, torch.full((256,), 2.5))
    with pytest.raises(CheckpointCorrupted, match="last.pt is damaged"):
        load_checkpoint(path)
    state, used = load_latest(tmp_path)
    assert state["step"] == 1 and used.endswith("prev.pt")


def test_a_kill_between_the_renames_resumes_from_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    save_checkpoint(tmp_path / "last.pt", {"step": 2})
    os.unlink(tmp_path / "last.pt")  # the instant after last.pt became prev.pt
    assert load_latest(tmp_path)[0]["step"] == 1


def test_resume_with_a_damaged_last_checkpoint_continues_from_prev(tmp_path):
    cfg = cfg_of(tmp_path / "shapes", tmp_path / "run", "train.checkpoint_every=1", iterations=3)
    train(cfg)
    student_weight = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["student"]["head.classification_head.cls_logits.weight"]
    _flip_a_tensor_byte(tmp_path / "run" / "last.pt", student_weight)
    more = cfg_of(tmp_path / "shapes", tmp_path / "run", "train.checkpoint_every=1", iterations=4)
    trainer = prepare(more, "train", resume=True)
    trainer.fit(resume=True)
    assert trainer.step == 4  # resumed from prev.pt (step 2 or 3), not from the damaged file


def test_half_written_checkpoints_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".tmp-abc123.pt"
    stale.write_bytes(b"\0" * 1024)
    train(cfg_of(tmp_path / "shapes", out, iterations=1))
    assert not stale.exists() and (out / "last.pt").exists()


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(8)})
    fake_tmp = tmp_path / ".tmp-full.pt"
    fake_tmp.write_bytes(b"")

    def full_disk(**_kw):  # every write into the temporary file fails with ENOSPC
        return os.open("/dev/full", os.O_WRONLY), str(fake_tmp)

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", full_disk)
    with pytest.raises(CheckpointWriteError, match=f"no space left on device writing {path}") as err:
        save_checkpoint(path, {"step": 2, "w": torch.ones(1 << 20)})
    assert err.value.errno == errno.ENOSPC
    assert load_checkpoint(path)["step"] == 1 and not fake_tmp.exists()


# ------------------------------------------------------------------------------ resume with another config
def test_resume_with_a_changed_lr_is_refused_naming_the_key(tmp_path):
    train(cfg_of(tmp_path / "shapes", tmp_path / "run", "train.lr=0.01", iterations=2))
    changed = cfg_of(tmp_path / "shapes", tmp_path / "run", "train.lr=0.05", "data.flip_prob=0.0", iterations=3)
    with pytest.raises(ResumeConfigError) as err:
        prepare(changed, "train", resume=True).fit(resume=True)
    message = str(err.value)
    assert "train.lr: 0.01 in the checkpoint, 0.05 now" in message
    assert "data.flip_prob: 0.5 in the checkpoint, 0.0 now" in message
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["lr"] == 0.01  # the folder still says what was used
    proc = acamkd("train", f"{DEMO}/shapes_det_student.yaml", *tiny(tmp_path / "shapes", tmp_path / "run", 3),
                  "train.lr=0.05", "--resume", check=False)
    assert proc.returncode == 1 and "train.lr: 0.01 in the checkpoint, 0.05 now" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_may_extend_the_run_and_change_logging_and_records_it(tmp_path):
    train(cfg_of(tmp_path / "shapes", tmp_path / "run", iterations=2))
    longer = cfg_of(tmp_path / "shapes", tmp_path / "run", "train.log_every=2", iterations=4)
    trainer = prepare(longer, "train", resume=True)
    trainer.fit(resume=True)
    assert trainer.step == 4
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["iterations"] == 4 and recorded["train"]["log_every"] == 2
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["train"]["iterations"] == 4


# ------------------------------------------------------------------------------ folders that cannot be written
def test_an_output_folder_under_a_file_fails_before_anything_is_built(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    from acamkd.engine import run

    monkeypatch.setattr(run, "build_task", lambda *a: pytest.fail("built before checking the folder"))
    with pytest.raises(OutputDirError, match="train.output_dir=.*afile/run: cannot write there: a file is in the way"):
        prepare(cfg_of(tmp_path / "shapes", tmp_path / "afile" / "run"), "train")


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_read_only_or_forbidden_output_folder_is_a_named_error(tmp_path, monkeypatch, code, words):
    from acamkd.engine import run_folder

    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run_folder.os, "makedirs", refuse)
    with pytest.raises(OutputDirError, match=f"cannot write there: it is on a {words}" if code == errno.EROFS
                       else f"cannot write there: {words}"):
        run_folder.check_writable(tmp_path / "x")


def test_export_to_a_path_that_cannot_be_written_is_a_named_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = acamkd("export", f"{DEMO}/shapes_det_student.yaml", "student.backbone=resnet18", "--checkpoint",
                  str(tmp_path / "missing.pt"), "--out", str(tmp_path / "afile" / "student.safetensors"), check=False)
    assert proc.returncode == 1 and "--out=" in proc.stderr and "a file of that name is in the way" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_damaged_teacher_or_eval_checkpoint_is_refused_by_name(tmp_path):
    from acamkd.models.weights import load_state_dict_file

    train(cfg_of(tmp_path / "shapes", tmp_path / "run", iterations=1))
    last = tmp_path / "run" / "last.pt"
    assert "head.classification_head.cls_logits.weight" in load_state_dict_file(last)  # intact: loads
    weight = torch.load(last, weights_only=True)["student"]["head.classification_head.cls_logits.weight"]
    _flip_a_tensor_byte(last, weight)
    with pytest.raises(ValueError, match="last.pt' is damaged"):
        load_state_dict_file(last)


@pytest.mark.parametrize("command, words, not_words", [
    ("train", "--resume", "same command"),
    ("distill", "--resume", "same command"),
    ("demo", "Run the same command again", "--resume"),
    ("compare", "Run the same command again", "--resume"),
])
def test_a_stop_signal_tells_how_to_continue_for_each_command(command, words, not_words, monkeypatch, capsys):
    """One run resumes with --resume; a run set (demo, compare) has no --resume: the same command
    line reuses finished runs and resumes the interrupted one (experiments.run_all)."""
    from acamkd import cli
    from acamkd.engine.trainer import TrainingInterrupted

    monkeypatch.setattr("sys.argv", ["acamkd", command, "cfg.yaml", "--out", "runs x"])

    def stopped():
        raise TrainingInterrupted(signal.SIGTERM, 7, "runs x/last.pt")

    assert cli._guarded(command, stopped) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 7" in err and "runs x/last.pt" in err
    assert words in err and not_words not in err
    assert f"acamkd {command} cfg.yaml --out 'runs x'" in err
