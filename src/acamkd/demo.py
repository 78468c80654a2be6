"""``acamkd demo``: the whole story offline on the built-in ``shapes`` dataset.

Trains a large teacher and a small student baseline, distils the same student from that teacher
with plain feature mimicking (``mimic``: aligned MSE, the yardstick) and with ACAM-KD, and prints
one table of real evaluation numbers (teacher, student, student + mimic, student + ACAM-KD, with
train seconds per step):

* ``--task det`` (default): RetinaNet R50 teacher, RetinaNet R18 student; COCO box AP, AP50,
  APs, APm, APl. Configs ``configs/demo/shapes_det_*.yaml`` (200/50 images of 256x320, 12 SGD
  epochs: sized for a GPU, run them with ``acamkd train``/``distill``).
* ``--task seg``: DeepLabV3-R18 teacher, DeepLabV3-MobileNetV2 student (one of the paper's
  students; its R101 teacher costs 2.4 s per step on 2 CPU cores even on 64x80 crops), ACAM-KD
  on the stride-8 logits with one mask per class; mIoU, mAcc, aAcc. Configs
  ``configs/demo/shapes_seg_*.yaml`` (256x320 crops, 4000 SGD poly iterations: sized for a GPU).

A profile scales the configs for a CPU (easy scenes of 128x160, AdamW: from random init it
learns in the few hundred steps a CPU affords, where the configs' SGD scores 0 that early):

* ``full`` (default): at most an hour on 2 CPU cores; the teacher trains twice as many steps as
  the student (it must end clearly above the student for distillation to mean anything; the
  student and the distilled students always share one schedule);
* ``--quick``: under 10 minutes on 2 CPU cores (numbers are real, but these are very short runs);
* ``--smoke``: seconds, for CI (2 steps on 8 tiny images).

The generated data (``<data>/shapes-<profile>``, shared by both tasks) and each finished run
(``<out>/<profile>/<run>`` for detection, ``<out>/seg-<profile>/<run>`` for segmentation) are
cached between invocations: the runs go through :func:`acamkd.experiments.run_all`, which reuses a
finished run whose resolved config is unchanged, resumes one killed mid-way, and moves a folder
holding another config aside to ``<run>.stale-<n>``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acamkd.experiments import Run, format_table, run_all

__all__ = ["main", "build_parser", "build_configs", "TASKS", "DemoTask", "demo_config_dir", "format_table"]


def _iterations(n: int, warmup: int = 10, step: int | None = None) -> list[str]:
    """A step schedule of ``n`` iterations, lr x0.1 at ``step`` (default 80%)."""
    return [f"train.iterations={n}", f"train.steps=[{step or int(0.8 * n)}]", f"train.warmup_iters={warmup}"]


# Shared by the CPU-sized profiles: small easy images, AdamW (at 5e-4 it learns from random init
# in ~150 steps where the configs' SGD 0.01 scores 0: measured, RetinaNet R18, 150 steps, AP50 2.7
# vs 0.0 with SGD after 80 steps), no periodic validation.
_CPU = ["data.shapes.size=[128,160]", "data.shapes.difficulty=easy", "data.workers=0", "train.epochs=null",
        "train.optimizer=adamw", "train.lr=5e-4", "train.weight_decay=1e-4", "train.val_every=0"]
_SMOKE = ["data.shapes.train=8", "data.shapes.val=4", "data.shapes.size=[96,128]", "data.batch_size=2",
          "data.workers=0", "train.epochs=null", "train.iterations=2", "train.steps=[1]", "train.warmup_iters=1",
          "train.log_every=1", "train.val_every=0", "train.checkpoint_every=0"]


@dataclass(frozen=True)
class DemoTask:
    """One task of the demo: its configs, metric columns and CPU profiles."""

    config_prefix: str  # configs/demo/<prefix>_{teacher,student,acam}.yaml
    out_prefix: str  # runs go to <out>/<out_prefix><profile>/
    columns: tuple[str, ...]  # metric keys printed x100
    metric_name: str  # what the columns are, for the table's header
    profiles: dict[str, list[str]]  # overrides for every run
    teacher_extra: dict[str, list[str]] = field(default_factory=dict)  # extra overrides for the teacher run


_DET_CPU = [*_CPU, "data.min_size=128", "data.max_size=160"]
# Segmentation: crops of the randomly rescaled (0.5-2.0) 128x160 images, poly schedule, gradients
# clipped at 35 (the distillation loss on raw logits can spike early; the paper's Cityscapes recipe
# does not clip); evaluation on whole 128x160 images.
_SEG_CPU = [*_CPU, "data.batch_size=4", "eval.batch_size=10", "train.schedule=poly", "train.grad_clip=35"]

TASKS: dict[str, DemoTask] = {
    "det": DemoTask(
        "shapes_det", "", ("AP", "AP50", "APs", "APm", "APl"), "COCO box metrics",
        profiles={
            # 400/100 images, 500 steps for the student and the distilled student, 1000 for the teacher.
            "full": [*_DET_CPU, "data.shapes.train=400", "data.shapes.val=100", *_iterations(500, 25),
                     "train.log_every=20", "train.checkpoint_every=100"],
            # 5 runs, one teacher shared by the three distillations: 130 steps for the teacher (at 110
            # it scored below the student), 80 for each student (with 100 the five runs took 10:53 on
            # a quiet 2-core machine, over the 10-minute promise).
            "quick": [*_DET_CPU, "data.shapes.train=120", "data.shapes.val=30", *_iterations(80, step=64),
                      "train.log_every=10", "train.checkpoint_every=40"],
            "smoke": [*_SMOKE, "data.min_size=96", "data.max_size=128"],
        },
        teacher_extra={"full": _iterations(1000, 25), "quick": _iterations(130, step=105)},
    ),
    "seg": DemoTask(
        "shapes_seg", "seg-", ("mIoU", "mAcc", "aAcc"), "segmentation metrics",
        profiles={
            # 400/100 images, 128x160 crops, 400 steps for the student and the distilled student, 800 for the teacher.
            "full": [*_SEG_CPU, "data.crop=[128,160]", "train.lr=1e-3", "data.shapes.train=400", "data.shapes.val=100",
                     "train.iterations=400", "train.warmup_iters=25", "train.log_every=20",
                     "train.checkpoint_every=100"],
            "quick": [*_SEG_CPU, "data.crop=[96,120]", "train.lr=1e-3", "data.shapes.train=120", "data.shapes.val=30",
                      "train.iterations=150", "train.warmup_iters=10", "train.log_every=10",
                      "train.checkpoint_every=50"],
            "smoke": [*_SMOKE, "data.crop=[48,64]", "train.schedule=poly", "eval.batch_size=2"],
        },
        teacher_extra={"full": ["train.iterations=800"]},
    ),
}


def demo_config_dir() -> Path:
    """``configs/demo`` of the source tree (the README installs acamkd editable)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "demo"
    if not path.is_dir():
        raise FileNotFoundError(f"demo configs not found at {path}: run acamkd demo from a checkout of the "
                                f"repository installed with `pip install -e .` (scripts/setup.sh does)")
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="det",
                        help="det: RetinaNet R50 -> R18, COCO AP; seg: DeepLabV3 R18 -> MobileNetV2, mIoU")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_const", const="quick", dest="profile",
                         help="short runs: under 10 minutes on 2 CPU cores")
    profile.add_argument("--smoke", action="store_const", const="smoke", dest="profile",
                         help="seconds: checks the pipeline, numbers mean nothing")
    parser.set_defaults(profile="full")
    parser.add_argument("--out", default="runs/demo",
                        help="runs go to OUT/<profile>/ (det) or OUT/seg-<profile>/ (seg), one folder per run")
    parser.add_argument("--data", default="data", help="generated data goes to DATA/shapes-<profile>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    return parser


def _config(task: DemoTask, role: str, overrides: list[str]):
    from acamkd.config import load_config

    return load_config(demo_config_dir() / f"{task.config_prefix}_{role}.yaml", overrides)


def run_dir(args: argparse.Namespace) -> Path:
    """Where this task and profile's runs go."""
    return Path(args.out) / f"{TASKS[args.task].out_prefix}{args.profile}"


def build_configs(args: argparse.Namespace) -> dict[str, Any]:
    """The runs' configs (``teacher``, ``student``, ``mimic``, ``acam``, ``acam_paper``) for parsed
    demo arguments: ``mimic`` is the ACAM-KD config with plain aligned-MSE feature distillation on
    standardised features instead (PKD-style, as ACAM-KD's default mode standardises: the yardstick
    of what the cooperative masks add over plain feature mimicking);
    ``acam_paper`` is ACAM-KD exactly as the paper specifies it (``*_acam_paper.yaml``), beside the
    project's default mode (``*_acam.yaml``)."""
    task, out = TASKS[args.task], run_dir(args)
    common = [*task.profiles[args.profile], f"data.root={Path(args.data) / f'shapes-{args.profile}'}",
              f"train.seed={args.seed}"]
    # the user's overrides come last: they win over the profile, the teacher's extras included
    teacher = [*common, *task.teacher_extra.get(args.profile, []), *args.overrides]
    common = [*common, *args.overrides]
    return {"teacher": _config(task, "teacher", [*teacher, f"train.output_dir={out / 'teacher'}"]),
            "student": _config(task, "student", [*common, f"train.output_dir={out / 'student'}"]),
            "mimic": _config(task, "acam", [*common, "method.name=mimic", "method.options={feature_norm: standardise}",
                                            f"train.output_dir={out / 'mimic'}",
                                            f"teacher.checkpoint={out / 'teacher' / 'last.pt'}"]),
            "acam": _config(task, "acam", [*common, f"train.output_dir={out / 'acam'}",
                                           f"teacher.checkpoint={out / 'teacher' / 'last.pt'}"]),
            "acam_paper": _config(task, "acam_paper", [*common, f"train.output_dir={out / 'acam_paper'}",
                                                       f"teacher.checkpoint={out / 'teacher' / 'last.pt'}"])}


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    import logging

    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    task, out = TASKS[args.task], run_dir(args)
    cfgs = build_configs(args)
    teacher_cfg, student_cfg = cfgs["teacher"], cfgs["student"]
    teacher = f"teacher ({teacher_cfg.student.arch} {teacher_cfg.student.backbone})"
    runs = [Run(teacher, "train", teacher_cfg),
            Run(f"student ({student_cfg.student.arch} {student_cfg.student.backbone})", "train", student_cfg),
            Run("student + mimic (standardised MSE)", "distill", cfgs["mimic"], needs=[teacher]),
            Run("student + ACAM-KD", "distill", cfgs["acam"], needs=[teacher]),
            Run("student + ACAM-KD (paper mode)", "distill", cfgs["acam_paper"], needs=[teacher])]
    rows = {res.run.name: res.metrics for res in run_all(runs)}
    table = format_table(rows, task.columns)
    header = (f"acamkd demo --task {args.task} ({args.profile}, seed {args.seed}): {task.metric_name} (x100) on "
              f"the shapes val split, {teacher_cfg.data.shapes.val} images")
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{header}\n\n{table}\n\n(written to {out / 'results.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
