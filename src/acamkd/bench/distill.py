"""``acamkd bench distill [CONFIG] [overrides]``: the cost of the engine's distillation step against its parts.

Builds the run of a config as ``acamkd distill`` does (``engine/run.py``: task, models, taps,
method, optimizer, :class:`~acamkd.engine.step.TrainingStep`), but from random initialisation
(speed and memory do not depend on the weights) and on random batches of the given size
(``Task.random_batch``), then times and measures the peak memory of:

* ``student``: one training step of the student alone (the ``train`` step of the same config),
* ``teacher``: one teacher forward of what distillation needs (``Task.teacher_forward``:
  detectors transform + backbone/FPN, segmenters the stride-8 logits; no grad, eval mode),
* ``distill``: one distillation step (the engine's step: teacher forward, student losses and
  taps, the method, backward, optimizer step), timed in the steady state: a method with a
  warm-up (``set_step``: MasKD's student masks join after ``custom_mask_warmup`` steps) is set
  past it first, so the figure is what a long run pays per step.

It prints images/s and peak memory of each, and the ratio ``distill / (student + teacher)``
(the detection issue's goal: at most 1.15). Each variant runs in its own process. Without a
CONFIG, ``--task det`` uses ``configs/det/retinanet_r101_r50_acam.yaml`` (800x1333, batch 2)
and ``--task seg`` ``configs/seg/r101_deeplabv3_r18_acam.yaml`` (512x1024, batch 8);
``--arch``/``--student``/``--teacher`` are shortcuts for ``student.arch`` (and, for detection,
``teacher.arch``), ``student.backbone`` and ``teacher.backbone`` overrides. Models have 80 classes (det) or 19 (seg).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "bench_overrides", "calibrate_batchnorm", "run_variant", "DEFAULT_CONFIGS", "VARIANTS"]

VARIANTS = ("student", "teacher", "distill")
_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEFAULT_CONFIGS = {"det": _CONFIGS / "det" / "retinanet_r101_r50_acam.yaml",
                   "seg": _CONFIGS / "seg" / "r101_deeplabv3_r18_acam.yaml"}
_DEFAULTS = {"det": {"image": "800x1333", "batch": 2, "classes": 80},
             "seg": {"image": "512x1024", "batch": 8, "classes": 19}}
# Random weights and the configs' learning rates can diverge within a few steps: the bench steps
# with a small one (the cost of a step does not depend on it) and no warm-up.
_BENCH_OVERRIDES = ["train.lr=1e-4", "train.warmup_iters=0", "train.grad_clip=null", "train.accumulate=1"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd bench distill", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None,
                        help="a distillation config (default: the --task's paper config, see above)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.options.num_masks=3")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--task", choices=("det", "seg"), default="det",
                        help="which default config: det (RetinaNet R101 -> R50, 800x1333, batch 2) or seg "
                             "(DeepLabV3 R101 -> R18, 19 classes, 512x1024, batch 8)")
    parser.add_argument("--arch", default=None,
                        help="det: shortcut for student.arch=ARCH teacher.arch=ARCH; seg: student.arch=ARCH "
                             "(the teacher stays the config's)")
    parser.add_argument("--teacher", default=None, help="shortcut for teacher.backbone=NAME")
    parser.add_argument("--student", default=None, help="shortcut for student.backbone=NAME")
    parser.add_argument("--image", default=None, help="HEIGHTxWIDTH of the random images")
    parser.add_argument("--batch", type=int, default=None, help="images per step")
    parser.add_argument("--classes", type=int, default=None, help="model classes (det: foreground; default 80/19)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: train.amp=bf16 (CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides a bench applies to its config: the shortcuts, bf16, the bench's optimizer settings."""
    out = list(args.overrides or [])
    if args.arch:  # detection: one architecture for both (their FPN levels must pair up); segmentation:
        out.append(f"student.arch={args.arch}")  # the student only (logits pair up across architectures)
        if getattr(args, "task", "det") == "det":
            out.append(f"teacher.arch={args.arch}")
    for flag, key in (("student", "student.backbone"), ("teacher", "teacher.backbone")):
        if getattr(args, flag):
            out.append(f"{key}={getattr(args, flag)}")
    if args.dtype == "bf16":
        out.append("train.amp=bf16")
    return out + _BENCH_OVERRIDES


def calibrate_batchnorm(task, teacher, taps, images) -> None:
    """Set ``teacher``'s BatchNorm running statistics to those of ``images`` (what
    ``task.teacher_forward(teacher, taps, images)`` reaches: with ``taps`` None the registry's cheap
    pass, so a detector head's norms keep theirs): a randomly initialised deep teacher in eval mode, with unit running
    variances, produces logits large enough to make a benchmark's distillation step diverge, so the
    benchmarks and ``acamkd cost`` calibrate before timing. Each BatchNorm takes the mean and
    (unbiased) variance of its own input during one teacher forward (pre-hooks), in the order the
    layers run. Changes the running statistics in place; no parameter changes."""
    import torch

    def set_statistics(module, args) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        module.running_mean.copy_(x.mean(dims))
        module.running_var.copy_(x.var(dims, unbiased=True))

    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.running_mean is not None]
    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    try:
        task.teacher_forward(teacher, taps, images)
    finally:
        for handle in handles:
            handle.remove()


def _run_worker(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from acamkd.bench.measure import time_and_peak
    from acamkd.config import load_config
    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_models, build_step, build_task

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cfg = load_config(spec["config"], spec["overrides"])
    info = DistInfo(device=device)
    task = build_task(cfg, info)
    mode = "train" if variant == "student" else "distill"
    batch = task.random_batch(spec["batch"], tuple(spec["image"]), spec["classes"],
                              torch.Generator().manual_seed(0))
    first_image = (lambda: [task.to_device(batch, torch.device("cpu"))[0][0]])  # for configured taps' channels
    models = build_models(cfg, task, mode, spec["classes"], sample=first_image, random_init=True)
    step = build_step(cfg, task, models, info, total_steps=10**6)
    past_warmup = getattr(step.trained.method, "set_step", None)  # method None: training alone
    if past_warmup is not None:  # time the steady state: a method's warm-up over (MasKD's student masks on)
        past_warmup(10**6)
    if models.teacher is not None:
        images, _ = task.to_device(batch, device)
        calibrate_batchnorm(task, models.teacher, models.teacher_taps, images)

    def teacher_forward() -> None:
        images, _ = task.to_device(batch, device)
        with step.autocast():
            task.teacher_forward(models.teacher, models.teacher_taps, images)

    run = teacher_forward if variant == "teacher" else (lambda: step([batch]))
    times, peak = time_and_peak(run, spec["device"], spec["warmup"], spec["repeats"])
    median = statistics.median(times) / 1e3
    return {"variant": variant, "median_ms": median * 1e3, "images_per_s": spec["batch"] / median,
            "peak_mib": peak / 2**20}


def run_variant(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one of :data:`VARIANTS` in its own process (a clean peak memory): ``median_ms``,
    ``images_per_s``, ``peak_mib``; or ``{"skipped": <the error's last 500 characters>}``.
    ``spec``: device, config, overrides, image [H, W], batch, classes, repeats, warmup (also
    used by ``acamkd cost``)."""
    proc = subprocess.run([sys.executable, "-m", "acamkd.bench.distill", "--worker", variant],
                          input=json.dumps(spec), capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return {"variant": variant, "skipped": (proc.stderr or proc.stdout).strip()[-500:]}


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    from acamkd.bench.levels import parse_image_size
    from acamkd.bench.measure import machine
    from acamkd.config import load_config

    args = args or build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_run_worker(args.worker, json.loads(sys.stdin.read()))))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = _DEFAULTS[args.task]
    config = str(args.config or DEFAULT_CONFIGS[args.task])
    overrides = bench_overrides(args)
    cfg = load_config(config, overrides)  # errors here, named, before any worker starts
    if cfg.teacher is None or cfg.method.name is None:
        raise SystemExit(f"acamkd bench distill: {config} has no teacher or method.name: give a distillation config")
    spec = {"device": device, "config": config, "overrides": overrides,
            "image": list(parse_image_size(args.image or defaults["image"])),
            "batch": args.batch or defaults["batch"], "classes": args.classes or defaults["classes"],
            "repeats": args.repeats or (20 if device == "cuda" else 3),
            "warmup": args.warmup if args.warmup is not None else (5 if device == "cuda" else 1)}
    results = {variant: run_variant(variant, spec) for variant in VARIANTS}
    s, t = cfg.student, cfg.teacher
    report: dict[str, Any] = {
        "config": {**spec, "teacher": f"{t.arch} {t.backbone}", "student": f"{s.arch} {s.backbone}",
                   "method": cfg.method.name, "dtype": args.dtype},
        "machine": machine(), "results": results}
    if all("median_ms" in r for r in results.values()):
        parts = results["student"]["median_ms"] + results["teacher"]["median_ms"]
        report["distill_over_student_plus_teacher"] = results["distill"]["median_ms"] / parts
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    h, w = spec["image"]
    print(f"acamkd bench distill: {t.arch} {t.backbone} -> {s.arch} {s.backbone} ({cfg.method.name}), {h}x{w}, "
          f"batch {spec['batch']}, {args.dtype} on {device} "
          f"({report['machine'].get('gpu', report['machine']['platform'])})")
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
