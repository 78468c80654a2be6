"""The benchmark's level shapes, its reference-skip logic, and one tiny end-to-end run."""
import json
import os

import pytest

from acamkd.bench.acam import reference_bytes_estimate, run_worker
from acamkd.bench.levels import fpn_level_shapes, parse_image_size
from acamkd.cli import main


def test_retinanet_levels_at_coco_resolution():
    shapes = fpn_level_shapes("retinanet", 800, 1333)
    assert shapes == {"p3": (100, 168), "p4": (50, 84), "p5": (25, 42), "p6": (13, 21), "p7": (7, 11)}


def test_fasterrcnn_p2_has_67200_positions():
    assert fpn_level_shapes("segmenter", 512, 1024) == {"logits": (64, 128)}
    assert fpn_level_shapes("segmenter", 65, 97) == {"logits": (9, 13)}  # ceil(n/8), no padding
    shapes = fpn_level_shapes("fasterrcnn", 800, 1333)
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert shapes["p2"] == (200, 336) and 200 * 336 == 67_200
    assert shapes["p6"] == (13, 21)


def test_bad_image_and_detector_are_named():
    with pytest.raises(ValueError, match="--image"):
        parse_image_size("800by1333")
    with pytest.raises(ValueError, match="--image"):
        parse_image_size("0x10")
    with pytest.raises(ValueError, match="--detector"):
        fpn_level_shapes("yolo", 800, 1333)


def _cfg(**overrides):
    cfg = {"device": "cpu", "batch": 1, "image": [64, 64], "detector": "retinanet", "dtype": "fp32",
           "channels": 16, "num_masks": 3, "repeats": 1, "warmup": 0, "compile": "none",
           "variants": ["floor", "fast", "reference"]}
    cfg.update(overrides)
    return cfg


def test_reference_that_cannot_fit_is_reported_not_run():
    # Faster R-CNN P2 at 4000x4000 is 1e6 positions: a 1e12-entry attention matrix.
    result = run_worker("reference", _cfg(detector="fasterrcnn", image=[4000, 4000], channels=2))
    assert "would not fit" in result["skipped"]
    assert result["estimated_peak_gib"] > 1000
    assert "median_ms" not in result


def test_estimate_grows_with_the_square_of_positions():
    small = reference_bytes_estimate(2, [100], 4)
    assert reference_bytes_estimate(2, [200], 4) == 4 * small


def test_workers_measure_and_agree():
    fast = run_worker("fast", _cfg())
    assert fast["median_ms"] > 0 and fast["peak_mib"] >= 0
    assert any("scaled_dot_product" in op for op in fast["attention_ops"])
    ref = run_worker("reference", _cfg())
    assert ref["max_loss_rel_diff"] < 1e-5
    assert ref["max_grad_rel_diff"] < 1e-4


def test_cli_json_report(capsys):
    assert main(["bench", "acam", "--device", "cpu", "--image", "64x64", "--batch", "1", "--channels", "8",
                 "--repeats", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"floor", "fast", "reference"}
    assert all("median_ms" in r for r in report["results"].values()), report["results"]
    assert {"fast_over_floor_time", "reference_over_fast_time", "reference_over_fast_peak_memory"} <= set(report["ratios"])


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("task", ["det", "seg"])
@pytest.mark.parametrize("variant", ["student", "teacher", "distill"])
def test_distill_bench_workers_measure(variant, task):
    """Each variant times the engine's own step (or teacher forward) built from the paper config."""
    import argparse

    from acamkd.bench.distill import DEFAULT_CONFIGS, _run_worker, bench_overrides

    shortcuts = {"det": dict(arch="retinanet", teacher="resnet18", student="resnet18"),
                 "seg": dict(arch="pspnet", teacher="resnet18", student="resnet18")}[task]
    args = argparse.Namespace(overrides=[], dtype="fp32", **shortcuts)
    spec = {"device": "cpu", "config": str(DEFAULT_CONFIGS[task]), "overrides": bench_overrides(args),
            "image": [64, 96], "batch": 2 if task == "seg" else 1, "classes": 3, "repeats": 1, "warmup": 0}
    result = _run_worker(variant, spec)
    assert result["median_ms"] > 0 and result["images_per_s"] > 0 and result["peak_mib"] >= 0


def test_distill_bench_times_a_method_past_its_warm_up(monkeypatch):
    """MasKD's student masks join after ``custom_mask_warmup`` steps: the bench (and ``acamkd cost``)
    times the step with them on, the cost of a long run, not of its first steps."""
    import argparse

    from acamkd.bench.distill import DEFAULT_CONFIGS, _run_worker, bench_overrides
    from acamkd.methods.maskd import MasKD

    seen = []
    original = MasKD.student_masks_on
    monkeypatch.setattr(MasKD, "student_masks_on", lambda self: seen.append(original(self)) or seen[-1])
    args = argparse.Namespace(overrides=["method.name=maskd", "method.options={}"], dtype="fp32", arch="retinanet",
                              teacher="resnet18", student="resnet18")
    spec = {"device": "cpu", "config": str(DEFAULT_CONFIGS["det"]), "overrides": bench_overrides(args),
            "image": [64, 96], "batch": 1, "classes": 3, "repeats": 1, "warmup": 0}
    result = _run_worker("distill", spec)
    assert result["median_ms"] > 0 and seen and all(seen)  # default custom_mask_warmup 7000: on only when pushed past


def test_distill_bench_cli_json(capsys):
    """The whole command on a tiny demo config: three variants measured, the ratio reported."""
    from acamkd.cli import main as cli_main

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "shapes_det_acam.yaml")
    assert cli_main(["bench", "distill", config, "teacher.backbone=resnet18",
                     "--device", "cpu", "--image", "64x64", "--batch", "1", "--classes", "2",
                     "--repeats", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all("median_ms" in r for r in report["results"].values()), report["results"]
    assert report["config"]["teacher"] == "retinanet resnet18" and report["distill_over_student_plus_teacher"] > 0


def test_cpu_peak_counts_only_the_measured_calls():
    """The CPU peak is the resident-set high-water mark over the timed calls, not the process's
    lifetime peak: a 256 MiB step reads about 256 MiB, a tiny step measured after it reads little."""
    import torch

    from acamkd.bench.measure import reset_peak_rss, time_and_peak

    if not reset_peak_rss():
        pytest.skip("this kernel refuses /proc/self/clear_refs: the CPU peak is the process's lifetime peak")

    def big() -> None:
        torch.ones(64 * 2**20, dtype=torch.float32).sum()  # 256 MiB, written, then freed

    _, peak_big = time_and_peak(big, "cpu", warmup=0, repeats=1)
    assert 200 * 2**20 < peak_big < 400 * 2**20
    _, peak_small = time_and_peak(lambda: torch.ones(16).sum(), "cpu", warmup=0, repeats=2)
    assert peak_small < 64 * 2**20
