"""``acamkd bench distill``: the cost of a distillation step against its parts.

On random images of the given size (models from random init; speed and memory do not depend
on the weights), times and measures the peak memory of:

* ``student``: one student training step (forward with losses, backward, SGD step),
* ``teacher``: one teacher forward of what distillation needs (detectors: transform +
  backbone/FPN; segmenters: the stride-8 logits; no grad, eval mode),
* ``distill``: one distillation step (teacher forward + student step + the method).

It prints images/s and peak memory of each, and the ratio ``distill / (student + teacher)``
(the detection issue's goal: at most 1.15). Each variant runs in its own process.
``--task seg`` measures segmenters (19 classes, ACAM-KD on the logits with M = 19; the
segmentation issue's setting: DeepLabV3 R101 -> R18, 512x1024, batch 8, bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

__all__ = ["main", "build_parser"]

VARIANTS = ("student", "teacher", "distill")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd bench distill", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--task", choices=("det", "seg"), default="det",
                        help="det: detectors (defaults: RetinaNet R101 -> R50, 800x1333, batch 2); seg: "
                             "segmenters, 19 classes (defaults: DeepLabV3 R101 -> R18, 512x1024, batch 8)")
    parser.add_argument("--arch", default=None,
                        help="student arch: retinanet|fasterrcnn|fcos (det), deeplabv3|pspnet (seg)")
    parser.add_argument("--teacher", default="resnet101", help="teacher backbone (seg: a DeepLabV3 teacher)")
    parser.add_argument("--student", default=None, help="student backbone (det: resnet50, seg: resnet18)")
    parser.add_argument("--image", default=None, help="HEIGHTxWIDTH")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--method", default="acam")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _detection_parts(cfg: dict[str, Any], device: str):
    """(student losses fn, teacher features fn, student taps, params) for a detector pair."""
    import torch

    from acamkd.methods import build as build_method
    from acamkd.models import build_detector, detector_channels, student_taps, teacher_features

    h, w = cfg["image"]
    images = [torch.rand(3, h, w, device=device) for _ in range(cfg["batch"])]
    targets = [{"boxes": torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]],
                                      device=device), "labels": torch.tensor([1, 2], device=device)}
               for _ in range(cfg["batch"])]
    student = build_detector(cfg["arch"], cfg["student"], 81).to(device).train()
    teacher = build_detector(cfg["arch"], cfg["teacher"], 81).to(device).eval().requires_grad_(False)
    method = build_method(cfg["method"], teacher_channels=detector_channels(teacher),
                          student_channels=detector_channels(student)).to(device)
    return (lambda: student(images, targets)), (lambda: teacher_features(teacher, images)), \
        student_taps(student), student, method


def _calibrate_batchnorm(model, images) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (one train-mode forward with
    cumulative averaging), then eval mode: a randomly initialised deep teacher in eval mode with
    unit running variances produces logits large enough to make the distillation step diverge."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model.logits(images)
    model.eval()


def _segmentation_parts(cfg: dict[str, Any], device: str):
    """The same for a segmenter pair: DeepLabV3-R101 teacher (logits only), CE on the student."""
    import torch

    from acamkd.engine.segmentation import segmentation_task_losses
    from acamkd.methods import build as build_method
    from acamkd.models import FeatureTaps
    from acamkd.models.segmentation import build_segmenter, segmenter_taps

    h, w = cfg["image"]
    classes = 19
    images = torch.randn(cfg["batch"], 3, h, w, device=device)
    labels = torch.randint(0, classes, (cfg["batch"], h, w), device=device)
    student = build_segmenter(cfg["arch"], cfg["student"], classes).to(device).train()
    teacher = build_segmenter(cfg["teacher_arch"], cfg["teacher"], classes).to(device).requires_grad_(False)
    _calibrate_batchnorm(teacher, images)  # random-init BN statistics would give exploding logits
    channels = {"logits": classes}
    method = build_method(cfg["method"], teacher_channels=channels, student_channels=channels,
                          num_masks=classes).to(device)
    taps = FeatureTaps(student, segmenter_taps(student))

    def student_losses() -> dict:  # the engine's task losses (the auxiliary head's included)
        taps.clear()
        return segmentation_task_losses(student, images, labels)

    return student_losses, (lambda: {"logits": teacher.logits(images)}), taps, student, method


def _run_worker(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from acamkd.bench.measure import time_and_peak

    torch.manual_seed(0)
    device = cfg["device"]
    parts = _segmentation_parts if cfg["task"] == "seg" else _detection_parts
    student_losses, teacher_feats, taps, student, method = parts(cfg, device)
    params = list(student.parameters()) + list(method.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    use_bf16 = cfg["dtype"] == "bf16"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16)

    def student_step(distil: bool) -> None:
        with autocast:
            if distil:
                with torch.no_grad():
                    t_feats = teacher_feats()
            losses = dict(student_losses())
            if distil:
                losses.update(method(t_feats, taps.features()))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_step() -> None:
        with autocast, torch.no_grad():
            teacher_feats()

    step = {"student": lambda: student_step(False), "teacher": teacher_step,
            "distill": lambda: student_step(True)}[variant]
    times, peak = time_and_peak(step, device, cfg["warmup"], cfg["repeats"])
    median = statistics.median(times) / 1e3
    return {"variant": variant, "median_ms": median * 1e3, "images_per_s": cfg["batch"] / median,
            "peak_mib": peak / 2**20}


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    from acamkd.bench.measure import machine
    from acamkd.bench.levels import parse_image_size

    args = args or build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_run_worker(args.worker, json.loads(sys.stdin.read()))))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seg = args.task == "seg"
    arch = args.arch or ("deeplabv3" if seg else "retinanet")
    allowed = ("deeplabv3", "pspnet") if seg else ("retinanet", "fasterrcnn", "fcos")
    if arch not in allowed:
        raise SystemExit(f"acamkd bench distill: --arch {arch!r} is not a {args.task} arch; choose from {allowed}")
    cfg = {"device": device, "task": args.task, "arch": arch, "teacher_arch": "deeplabv3" if seg else arch,
           "teacher": args.teacher, "student": args.student or ("resnet18" if seg else "resnet50"),
           "image": list(parse_image_size(args.image or ("512x1024" if seg else "800x1333"))),
           "batch": args.batch or (8 if seg else 2), "dtype": args.dtype,
           "method": args.method, "repeats": args.repeats or (20 if device == "cuda" else 3),
           "warmup": args.warmup if args.warmup is not None else (5 if device == "cuda" else 1)}
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, "-m", "acamkd.bench.distill", "--worker", variant],
                              input=json.dumps(cfg), capture_output=True, text=True)
        results[variant] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                            {"variant": variant, "skipped": (proc.stderr or proc.stdout).strip()[-500:]})
    report: dict[str, Any] = {"config": cfg, "machine": machine(), "results": results}
    if all("median_ms" in r for r in results.values()):
        parts = results["student"]["median_ms"] + results["teacher"]["median_ms"]
        report["distill_over_student_plus_teacher"] = results["distill"]["median_ms"] / parts
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"acamkd bench distill: {cfg['teacher_arch']} {cfg['teacher']} -> {cfg['arch']} {cfg['student']}, "
          f"{cfg['image'][0]}x{cfg['image'][1]}, batch "
          f"{cfg['batch']}, {cfg['dtype']} on {device} ({report['machine'].get('gpu', report['machine']['platform'])})")
    for variant, r in results.items():
        if "median_ms" in r:
            print(f"{variant:<8} {r['median_ms']:>10.1f} ms {r['images_per_s']:>8.2f} img/s {r['peak_mib']:>9.1f} MiB")
        else:
            print(f"{variant:<8} failed: {r['skipped']}")
    if "distill_over_student_plus_teacher" in report:
        print(f"distill / (student + teacher): {report['distill_over_student_plus_teacher']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
