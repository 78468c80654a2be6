"""acamkd cost: the exported distilled student costs what the bare student costs (FLOPs and
parameters), each method's training-only parameters are counted, and the table says what was skipped."""
import os

import pytest
import torch

from acamkd.cost import _build, exported_student, inference_cost, markdown_table, method_parameters

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def spec(root):
    overrides = [f"data.root={root}", "data.shapes.train=4", "data.shapes.val=2", "data.shapes.size=[64,96]",
                 "data.min_size=64", "data.max_size=96", "data.workers=0", "teacher.backbone=resnet18",
                 "student.backbone=resnet18", "method.options.num_masks=2"]
    return {"device": "cpu", "config": f"{DEMO}/shapes_det_acam.yaml", "overrides": overrides, "image": [64, 96],
            "batch": 2, "classes": 8, "repeats": 1, "warmup": 0}  # shapes: 8 foreground classes


def test_exported_student_costs_what_the_student_costs(tmp_path):
    s = spec(tmp_path / "shapes")
    cfg, task, batch, models = _build(s)
    exported = exported_student(cfg, task, models, s["classes"], str(tmp_path))
    student = inference_cost(task, models.student, batch, "cpu", warmup=0, repeats=1)
    deployed = inference_cost(task, exported, batch, "cpu", warmup=0, repeats=1)
    assert student["flops"] > 0 and student["params"] > 0
    assert deployed["flops"] == student["flops"]
    assert deployed["params"] == student["params"] == sum(p.numel() for p in models.student.parameters())
    assert student["images_per_s"] > 0 and student["median_ms"] > 0
    from safetensors.torch import load_file

    exported_keys = set(load_file(tmp_path / "student.safetensors"))
    assert exported_keys == set(models.student.state_dict())  # no method tensor in the export
    sample = list(task.to_device(batch, torch.device("cpu"))[0][:1])
    params = method_parameters(cfg, task, models, ["acam", "mimic"], sample)
    assert params["acam"]["params"] == sum(p.numel() for p in models.method.parameters())
    # mimic: one 1x1 conv 256 -> 256 (+ bias) per FPN level p3..p7
    assert params["mimic"]["params"] == 5 * (256 * 256 + 256)


def test_table_shows_every_row_and_why_one_was_skipped():
    step = {"median_ms": 12.5, "images_per_s": 160.0, "peak_mib": 30.0}
    infer = {"median_ms": 5.0, "images_per_s": 400.0, "peak_mib": 10.0, "params": 1000, "flops": 3 * 10**9}
    report = {"command": "acamkd cost c.yaml", "exported_equals_student": True,
              "config": {"device": "cpu", "image": [64, 96], "batch": 2, "classes": 8, "repeats": 3, "warmup": 1,
                         "teacher": "retinanet resnet50", "student": "retinanet resnet18", "method": "acam",
                         "dtype": "fp32"},
              "machine": {"platform": "Linux", "cpu_count": 2, "torch": "2.4"},
              "training": {"student": step, "teacher": step},
              "methods": {"acam": {"step": step, "training_only": {"params": 12345}},
                          "fgd": {"step": {"skipped": "Traceback ...\nValueError: fgd needs boxes"},
                                  "training_only": {"skipped": "ValueError"}}},
              "inference": {"teacher": infer, "student": infer, "exported": infer}}
    table = markdown_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("`acamkd cost c.yaml`: retinanet resnet50 -> retinanet resnet18, 64x96, batch 2")
    assert "| train step: distill with acam (params: its training-only modules) | 12.5 | 160.00 | 30 | 12,345 | – |" in lines
    assert "| train step: distill with fgd (params: its training-only modules) | skipped: ValueError: fgd needs boxes | | | | |" in lines
    assert "| inference: exported distilled student | 5.0 | 400.00 | 10 | 1,000 | 3.00 |" in lines
    assert lines[-1].endswith("equal the student's: True")


@pytest.mark.slow
def test_cost_command_end_to_end(tmp_path):
    """The whole command, each measurement in its own process, on a tiny image."""
    import json

    from _cli_helpers import acamkd

    s = spec(tmp_path / "shapes")
    proc = acamkd("cost", s["config"], *s["overrides"], "--device", "cpu", "--image", "64x96", "--batch", "2",
                  "--methods", "acam,mimic", "--repeats", "1", "--warmup", "0", "--json", "--out", str(tmp_path / "c"))
    report = json.loads(proc.stdout)
    assert report["exported_equals_student"] is True
    assert set(report["methods"]) == {"acam", "mimic"}
    for r in [*report["training"].values(), *(m["step"] for m in report["methods"].values()),
              *report["inference"].values()]:
        assert "median_ms" in r, r
    assert report["inference"]["teacher"]["flops"] == report["inference"]["student"]["flops"]  # both R18 here
    assert (tmp_path / "c" / "cost.md").read_text().count("\n| ") == 1 + 7  # header + 7 rows
