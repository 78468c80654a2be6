"""``acamkd bench distill``: the cost of a distillation step against its parts.

On random images of the given size (models from random init; speed and memory do not depend
on the weights), times and measures the peak memory of:

* ``student``: one student training step (forward with losses, backward, SGD step),
* ``teacher``: one teacher forward of what distillation needs (transform + backbone/FPN,
  no grad, eval mode),
* ``distill``: one distillation step (teacher forward + student step + the method).

It prints images/s and peak memory of each, and the ratio ``distill / (student + teacher)``
(the detection issue's goal: at most 1.15). Each variant runs in its own process.
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
    parser.add_argument("--arch", choices=("retinanet", "fasterrcnn", "fcos"), default="retinanet")
    parser.add_argument("--teacher", default="resnet101", help="teacher backbone")
    parser.add_argument("--student", default="resnet50", help="student backbone")
    parser.add_argument("--image", default="800x1333", help="HEIGHTxWIDTH")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--method", default="acam")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _run_worker(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from acamkd.bench.measure import time_and_peak
    from acamkd.methods import build as build_method
    from acamkd.models import build_detector, detector_channels, student_taps, teacher_features

    torch.manual_seed(0)
    device = cfg["device"]
    h, w = cfg["image"]
    images = [torch.rand(3, h, w, device=device) for _ in range(cfg["batch"])]
    targets = [{"boxes": torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]],
                                      device=device), "labels": torch.tensor([1, 2], device=device)}
               for _ in range(cfg["batch"])]
    student = build_detector(cfg["arch"], cfg["student"], 81).to(device).train()
    teacher = build_detector(cfg["arch"], cfg["teacher"], 81).to(device).eval().requires_grad_(False)
    taps = student_taps(student)
    method = build_method(cfg["method"], teacher_channels=detector_channels(teacher),
                          student_channels=detector_channels(student)).to(device)
    params = list(student.parameters()) + list(method.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    use_bf16 = cfg["dtype"] == "bf16"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16)

    def student_step(distil: bool) -> None:
        with autocast:
            t_feats = teacher_features(teacher, images) if distil else None
            losses = student(images, targets)
            if distil:
                losses.update(method(t_feats, taps.features()))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_step() -> None:
        with autocast:
            teacher_features(teacher, images)

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
    cfg = {"device": device, "arch": args.arch, "teacher": args.teacher, "student": args.student,
           "image": list(parse_image_size(args.image)), "batch": args.batch, "dtype": args.dtype,
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
    print(f"acamkd bench distill: {cfg['arch']} {cfg['teacher']} -> {cfg['student']}, {args.image}, batch "
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
