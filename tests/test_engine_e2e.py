"""Detection end to end through the CLI on tiny built-in data: train a teacher, distil, kill
with SIGKILL mid-epoch and resume to the same result, export and reload the student."""
import json
import os

import pytest
import torch
from _cli_helpers import acamkd, sigkill_after_step

from acamkd.config import load_config
from acamkd.engine.run import load_student

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def tiny(root, out, iterations=6):
    return [f"data.root={root}", "data.shapes.train=8", "data.shapes.val=4", "data.shapes.size=[96,128]",
            "data.min_size=96", "data.max_size=128", "data.batch_size=2", "data.workers=0",
            "train.epochs=null", f"train.iterations={iterations}", f"train.steps=[{iterations - 1}]", "train.warmup_iters=1",
            "train.log_every=1", "train.val_every=0", "train.checkpoint_every=2", f"train.output_dir={out}"]




@pytest.fixture(scope="module")
def teacher(module_tmp_dir):
    base = module_tmp_dir("e2e")
    root, out = base / "shapes", base / "teacher"
    acamkd("train", f"{DEMO}/shapes_det_teacher.yaml", *tiny(root, out, iterations=2), "student.backbone=resnet18")
    return base, root, out / "last.pt"


def distill_args(base, root, teacher_ckpt, out, iterations=6):
    return ["distill", f"{DEMO}/shapes_det_acam.yaml", *tiny(root, out, iterations), "teacher.backbone=resnet18",
            f"teacher.checkpoint={teacher_ckpt}"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(teacher):
    base, root, ckpt = teacher
    straight = base / "straight"
    acamkd(*distill_args(base, root, ckpt, straight))

    killed = base / "killed"
    sigkill_after_step(distill_args(base, root, ckpt, killed), killed / "metrics.jsonl", step=3)  # checkpoint at 2
    state = torch.load(killed / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 6 and 0 < state["batches_done"] < 4  # a mid-epoch checkpoint (4 batches/epoch)

    acamkd(*distill_args(base, root, ckpt, killed), "--resume")
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("student", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert json.loads((straight / "final_metrics.json").read_text()) == json.loads(
        (killed / "final_metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 7))  # the log reads as one run


def test_export_loads_into_a_fresh_student_with_identical_outputs(teacher, tmp_path):
    base, root, ckpt = teacher
    out = tmp_path / "student.safetensors"
    cfg_args = [f"{DEMO}/shapes_det_student.yaml", *tiny(root, base / "teacher")[:-1], "student.backbone=resnet18"]
    acamkd("export", *cfg_args, "--checkpoint", str(ckpt), "--out", str(out))
    from safetensors.torch import load_file

    cfg = load_config(cfg_args[0], cfg_args[1:])
    _, reference, _ = load_student(cfg, str(ckpt))
    from acamkd.engine.detection import DetectionTask
    from acamkd.engine.distributed import DistInfo

    fresh = DetectionTask(cfg, DistInfo()).build_model(cfg.student, 8, "student")
    fresh.load_state_dict(load_file(out), strict=True)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 128)]
    reference.eval(), fresh.eval()
    with torch.no_grad():
        for a, b in zip(reference(images), fresh(images)):
            for key in a:
                assert torch.equal(a[key], b[key])


def test_distill_refuses_without_teacher_checkpoint(teacher, tmp_path):
    base, root, _ = teacher
    proc = acamkd("distill", f"{DEMO}/shapes_det_acam.yaml", *tiny(root, tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "teacher.checkpoint" in proc.stderr


def test_teacher_of_another_architecture_lists_mismatched_keys(teacher, tmp_path):
    base, root, ckpt = teacher  # a resnet18 RetinaNet checkpoint, configured as a resnet50 teacher
    proc = acamkd(*distill_args(base, root, ckpt, tmp_path / "y")[:-2], f"teacher.checkpoint={ckpt}", check=False)
    assert proc.returncode != 0
    assert "do not fit retinanet with resnet50" in proc.stderr and "backbone.body" in proc.stderr


def test_nan_guard_stops_with_the_step_and_the_losses(teacher, tmp_path):
    base, root, _ = teacher
    proc = acamkd("train", f"{DEMO}/shapes_det_student.yaml", *tiny(root, tmp_path / "nan", iterations=4),
                  "train.lr=1e12", "train.grad_clip=null", "train.warmup_iters=0", check=False)
    assert proc.returncode == 1
    assert "TrainingDiverged: non-finite loss at step" in proc.stderr and "task.classification" in proc.stderr
