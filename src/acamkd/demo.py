"""``acamkd demo``: the whole story offline on the built-in ``shapes`` dataset.

Trains a large teacher (RetinaNet R50) and a small student baseline (RetinaNet R18), distils
the same student with ACAM-KD from that teacher, and prints one table of real evaluation
numbers (teacher, student, student + ACAM-KD: AP, AP50, APs, APm, APl, train seconds per step).
The configs are ``configs/demo/shapes_det_*.yaml`` (200/50 images of 256x320, 12 SGD epochs:
sized for a GPU, run them with ``acamkd train``/``distill``); a profile scales them for a CPU:

* ``full`` (default): at most an hour on 2 CPU cores: easy difficulty, 400/100 images of
  128x160, AdamW, 500 steps of batch 4 for the student and the distilled student, 1000 for the
  teacher (it must end clearly above the student for distillation to mean anything);
* ``--quick``: the same data recipe with 120/30 images and 130 steps per run: under 10 minutes
  on 2 CPU cores (numbers are real, but these are very short runs);
* ``--smoke``: seconds, for CI (2 steps on 8 tiny images).

The generated data (``<data>/shapes-<profile>``) and each finished run (``<out>/<profile>/<run>``,
reused when its resolved config is unchanged) are cached between invocations.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "PROFILES", "TEACHER_EXTRA", "demo_config_dir"]

# Shared by the CPU-sized profiles: small easy images, AdamW (at 5e-4 it learns from random init
# in ~150 steps where the configs' SGD 0.01 scores 0: measured, RetinaNet R18, 150 steps, AP50 2.7
# vs 0.0 with SGD after 80 steps), no periodic validation.
_CPU_DET = ["data.shapes.size=[128,160]", "data.shapes.difficulty=easy", "data.min_size=128", "data.max_size=160",
            "data.workers=0", "train.epochs=null", "train.optimizer=adamw", "train.lr=5e-4",
            "train.weight_decay=1e-4", "train.val_every=0"]


def _iterations(n: int, warmup: int = 10, step: int | None = None) -> list[str]:
    """A step schedule of ``n`` iterations, lr x0.1 at ``step`` (default 80%)."""
    return [f"train.iterations={n}", f"train.steps=[{step or int(0.8 * n)}]", f"train.warmup_iters={warmup}"]


# Per profile: overrides for all three runs, then extra ones for the teacher run only.
PROFILES: dict[str, list[str]] = {
    # At most an hour on 2 CPU cores (the "full demo" without a GPU): 400/100 images,
    # 500 steps for the student and the distilled student, 1000 for the teacher (below).
    "full": [*_CPU_DET, "data.shapes.train=400", "data.shapes.val=100", *_iterations(500, 25),
             "train.log_every=20", "train.checkpoint_every=100"],
    "quick": [*_CPU_DET, "data.shapes.train=120", "data.shapes.val=30", *_iterations(130, step=105),
              "train.log_every=10", "train.checkpoint_every=25"],
    "smoke": ["data.shapes.train=8", "data.shapes.val=4", "data.shapes.size=[96,128]", "data.min_size=96",
              "data.max_size=128", "data.batch_size=2", "data.workers=0", "train.epochs=null",
              "train.iterations=2", "train.steps=[1]", "train.warmup_iters=1", "train.log_every=1",
              "train.val_every=0", "train.checkpoint_every=0"],
}
# The teacher is a fixed, given input to distillation, so it may be trained longer than the student
# (as the paper's teachers are stronger models): twice the student's steps in the full profile, so
# that it ends clearly above the student. Student and student + ACAM-KD always share one schedule.
TEACHER_EXTRA: dict[str, list[str]] = {"full": _iterations(1000, 25), "quick": [], "smoke": []}
COLUMNS = ("AP", "AP50", "APs", "APm", "APl")


def demo_config_dir() -> Path:
    """``configs/demo`` of the source tree (the README installs acamkd editable)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "demo"
    if not path.is_dir():
        raise FileNotFoundError(f"demo configs not found at {path}: run acamkd demo from a checkout of the "
                                f"repository installed with `pip install -e .` (scripts/setup.sh does)")
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd demo", description=__doc__.splitlines()[0])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_const", const="quick", dest="profile",
                         help="short runs: under 10 minutes on 2 CPU cores")
    profile.add_argument("--smoke", action="store_const", const="smoke", dest="profile",
                         help="seconds: checks the pipeline, numbers mean nothing")
    parser.set_defaults(profile="full")
    parser.add_argument("--out", default="runs/demo", help="runs go to OUT/<profile>/{teacher,student,acam}")
    parser.add_argument("--data", default="data", help="generated data goes to DATA/shapes-<profile>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for all three runs")
    return parser


def _config(name: str, overrides: list[str]):
    from acamkd.config import load_config

    return load_config(demo_config_dir() / f"shapes_det_{name}.yaml", overrides)


def _cached(cfg) -> dict[str, Any] | None:
    """The finished run's metrics if ``train.output_dir`` holds one made with this same config."""
    from acamkd.config import to_dict

    out = Path(cfg.train.output_dir)
    try:
        same = json.loads((out / "demo_config.json").read_text()) == to_dict(cfg)
        return json.loads((out / "final_metrics.json").read_text()) if same else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _run(kind: str, cfg) -> dict[str, Any]:
    from acamkd.config import to_dict
    from acamkd.engine import run

    cached = _cached(cfg)
    if cached is None:
        if kind == "distill":
            run.distill(cfg, eval_teacher=False)
        else:
            run.train(cfg)
        Path(cfg.train.output_dir, "demo_config.json").write_text(json.dumps(to_dict(cfg)))
        cached = _cached(cfg)
    timing_file = Path(cfg.train.output_dir, "timing.json")
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    return {**cached, **timing}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " | train s/step |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:.1f}" if r.get(c, -1) >= 0 else "-" for c in COLUMNS]
        step = f"{r['sec_per_step']:.2f}" if "sec_per_step" in r else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {step} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    import logging

    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out) / args.profile
    common = [*PROFILES[args.profile], f"data.root={Path(args.data) / f'shapes-{args.profile}'}",
              f"train.seed={args.seed}", *args.overrides]
    teacher_cfg = _config("teacher", [*common, *TEACHER_EXTRA[args.profile], f"train.output_dir={out / 'teacher'}"])
    student_cfg = _config("student", [*common, f"train.output_dir={out / 'student'}"])
    rows = {f"teacher ({teacher_cfg.student.arch} {teacher_cfg.student.backbone})": _run("train", teacher_cfg),
            f"student ({student_cfg.student.arch} {student_cfg.student.backbone})": _run("train", student_cfg)}
    acam_cfg = _config("acam", [*common, f"train.output_dir={out / 'acam'}",
                                f"teacher.checkpoint={out / 'teacher' / 'last.pt'}"])
    rows["student + ACAM-KD"] = _run("distill", acam_cfg)
    table = format_table(rows)
    header = (f"acamkd demo ({args.profile}, seed {args.seed}): COCO box metrics (x100) on the shapes val split, "
              f"{teacher_cfg.data.shapes.val} images")
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{header}\n\n{table}\n\n(written to {out / 'results.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
