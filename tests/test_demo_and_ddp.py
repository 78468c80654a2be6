"""The smoke-sized demo (what CI runs of `acamkd demo`) and a 2-process gloo training run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from acamkd.demo import main as demo_main

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def test_smoke_demo_prints_the_table_and_reuses_its_runs(tmp_path, capsys):
    args = ["--smoke", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    assert demo_main(args) == 0
    out = capsys.readouterr().out
    for row in ("teacher (retinanet resnet50)", "student (retinanet resnet18)", "student + mimic (standardised MSE)",
                "student + ACAM-KD", "student + ACAM-KD (paper mode)"):
        assert row in out
    results = json.loads((tmp_path / "runs" / "smoke" / "results.json").read_text())
    assert all("AP" in r and "sec_per_step" in r for r in results.values())
    stamp = os.path.getmtime(tmp_path / "runs" / "smoke" / "acam" / "last.pt")
    assert demo_main(args) == 0  # second call: cached data and runs, nothing retrained
    assert os.path.getmtime(tmp_path / "runs" / "smoke" / "acam" / "last.pt") == stamp


@pytest.mark.slow
def test_segmentation_smoke_demo_prints_miou_for_every_run(tmp_path, capsys):
    args = ["--task", "seg", "--smoke", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    assert demo_main(args) == 0
    out = capsys.readouterr().out
    assert "| model | mIoU | mAcc | aAcc | train s/step |" in out
    for row in ("teacher (deeplabv3 resnet18)", "student (deeplabv3 mobilenet_v2)", "student + mimic (standardised MSE)",
                "student + ACAM-KD", "student + ACAM-KD (paper mode)"):
        assert row in out
    results = json.loads((tmp_path / "runs" / "seg-smoke" / "results.json").read_text())
    assert len(results) == 5 and all(0 <= r["mIoU"] <= 1 and "sec_per_step" in r for r in results.values())
    # the ACAM-KD run distilled the 9-class logits of the R18 teacher with one mask per class
    acam_log = (tmp_path / "runs" / "seg-smoke" / "acam" / "metrics.jsonl").read_text().splitlines()
    assert "distill.logits.diversity" in json.loads(acam_log[0])


@pytest.mark.slow
def test_two_cpu_processes_train_with_gloo(tmp_path):
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.shapes.train=8", "data.shapes.val=4",
                 "data.shapes.size=[96,128]", "data.min_size=96", "data.max_size=128", "data.batch_size=2",
                 "data.workers=0", "train.epochs=null", "train.iterations=3", "train.steps=[2]",
                 "train.warmup_iters=1", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=0",
                 f"train.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acamkd.cli", "train", f"{DEMO}/shapes_det_student.yaml", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3 and len(state["rng"]) == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if json.loads(line)["kind"] == "train"] == [1, 2, 3]
    # 8 images over 2 ranks at batch 2: 2 batches per rank per epoch, so 3 steps cross an epoch
    assert json.loads(lines[-1])["kind"] == "val"


@pytest.mark.slow
def test_two_cpu_processes_train_segmentation_and_count_each_val_image_once(tmp_path):
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.shapes.train=8", "data.shapes.val=3",
                 "data.shapes.size=[64,80]", "data.crop=[48,64]", "data.batch_size=2", "data.workers=0",
                 "train.iterations=2", "train.warmup_iters=1", "train.log_every=1", "train.val_every=0",
                 "train.checkpoint_every=0", "eval.batch_size=2", f"train.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acamkd.cli", "train", f"{DEMO}/shapes_seg_student.yaml", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    # 3 val images over 2 ranks: rank 1 gets a padding copy of image 0, which must not be counted,
    # so the two-process mIoU equals a one-process evaluation of the same weights.
    single = subprocess.run([sys.executable, "-m", "acamkd.cli", "eval", f"{DEMO}/shapes_seg_student.yaml",
                             *overrides, "--checkpoint", str(tmp_path / "run" / "last.pt")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads(single.stdout)
    assert final["step"] == 2
    for key in ("mIoU", "aAcc", "mAcc"):
        assert final[key] == pytest.approx(alone[key], abs=1e-12), key


def test_demo_overrides_win_over_the_profile_for_every_run():
    from acamkd.demo import build_configs, build_parser

    for task in ("det", "seg"):
        args = build_parser().parse_args(["--task", task, "train.iterations=50", "train.schedule=poly"])
        cfgs = build_configs(args)
        assert {role: c.train.iterations for role, c in cfgs.items()} == {"teacher": 50, "student": 50, "mimic": 50,
                                                                          "acam": 50, "acam_paper": 50}
        paper = cfgs["acam_paper"].method.options  # the paper mode, whatever the default mode is
        assert (paper["mask_norm"], paper["mask_activation"], paper["mask_grad"], paper["feature_norm"],
                paper["fusion_student_grad"], paper["mass_beta"]) == ("mass", "sigmoid", "descend", "none", True, None)
        assert cfgs["acam_paper"].teacher.checkpoint == cfgs["acam"].teacher.checkpoint
        assert cfgs["mimic"].method.options["feature_norm"] == "standardise"  # as the default ACAM-KD mode
        assert cfgs["mimic"].method.name == "mimic" and cfgs["mimic"].teacher.checkpoint == cfgs["acam"].teacher.checkpoint
    full = build_configs(build_parser().parse_args([]))  # the full profile: teacher twice the student's steps
    assert full["teacher"].train.iterations == 2 * full["student"].train.iterations
    assert full["acam"].train.iterations == full["student"].train.iterations
    assert full["acam"].teacher.checkpoint.endswith("teacher/last.pt")
