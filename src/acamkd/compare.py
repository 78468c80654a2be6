"""``acamkd compare``: one distillation config, several methods, one table (mean ± std over seeds).

``acamkd compare CONFIG --methods plain,mimic,acam [--set NAME:key=value ...] [--seeds N] [--out DIR]
[overrides...]`` trains the config's teacher once, then the student once per row and seed on the
same schedule (CONFIG's ``train`` section), and writes ``<out>/results.md`` and ``<out>/results.json``.

How the runs are derived from CONFIG (a distillation config: it has ``teacher`` and ``method``;
``overrides`` apply to every run, first):

* **teacher** (``<out>/teacher/seed0``, ``acamkd train``): CONFIG with its ``teacher`` section
  moved into ``student`` (``checkpoint`` cleared: it trains from the same init a student would),
  ``teacher: null``, ``method: {name: null, options: {}}``, ``train.inherit_teacher: false``,
  ``train.seed: 0``; so the same data and schedule as the students. ``--teacher-override KEY=VALUE``
  (repeatable) changes that run only; its keys are the teacher's own training config, where the
  teacher model is ``student`` (as in ``acamkd train``), e.g. ``--teacher-override
  train.iterations=1000``. This is the demo's rule: its ``shapes_*_teacher.yaml`` is the student's
  base config with the teacher's model, and the teacher gets a longer schedule only through
  extra overrides. One teacher, seed 0, serves every row and seed (the table's header says so).
  A teacher given by ``--teacher-checkpoint PATH`` (or CONFIG's own ``teacher.checkpoint``) is used
  as it is and not trained; its row shows the ``final_metrics.json`` next to it if there is one
  (a folder written by ``acamkd train``), else the table has no teacher row.
* **plain**: the student without distillation: ``method.name: null``, ``method.options: {}``,
  ``teacher: null``, ``train.inherit_teacher: false`` (``acamkd train``).
* **a method NAME** (any of :func:`acamkd.methods.available`): ``method.name: NAME`` with
  ``method.options: {}`` (the method's defaults), except CONFIG's own method, whose options are
  kept; ``teacher.checkpoint`` is the teacher run's ``last.pt`` (``acamkd distill``). Everything
  else, ``train.inherit_teacher`` included, is CONFIG's: every distilled row starts alike.
* **a variant** ``--set NAME:key=value [key=value ...]`` (repeatable; several overrides in one
  quoted argument, separated by spaces): one more row of method NAME (or ``plain``) named
  ``"NAME key=value ..."``, each ``key`` meaning ``method.options.<key>`` unless it holds a dot
  (then it is a full config key: ``acam:train.lr=1e-3``). A variant follows its method's row.
* **seeds**: ``--seeds N`` runs every row with ``train.seed`` 0..N-1 in ``<out>/<row-slug>/seed<k>``
  (the slug is the row name with anything but letters, digits, ``.``, ``_`` and ``-`` turned into
  ``-``: ``acam mask_norm=energy`` -> ``acam-mask_norm-energy``). ``train.seed`` and
  ``train.output_dir`` are compare's to set: overriding them is an error.

Every name, variant and config is checked before anything runs: an unknown method is an
:class:`UnknownMethodError` (a ValueError) with close matches; a bad override a
:class:`~acamkd.config.ConfigError`. The runs go through :func:`acamkd.experiments.run_all`: a
finished run whose resolved config is unchanged is read back, not retrained; one killed mid-way
resumes from its last checkpoint; a folder holding another config is moved aside. The distilled
rows' cache keys include the teacher run's, so retraining the teacher retrains them. (A teacher
given by path is keyed by its path, not its content.)

The table: rows teacher, plain, then the methods and variants; columns COCO box AP, AP50, APs,
APm, APl (detection) or mIoU, mAcc, aAcc (segmentation), x100, mean ± std (sample, n - 1) over
the seeds; train s/step (median of the run's steps) and peak memory in MiB when the run's
``timing.json`` records it (``-`` otherwise): on a GPU the most memory tensors held during the run,
on a CPU the run's peak resident set of the whole process (reset at each run's start on Linux).

``--report-only`` trains, resumes and moves nothing: it writes the table of the runs already
finished with this config (:func:`acamkd.experiments.read_finished`), a row's ``n`` its finished
seeds, and names the runs that are not in the header (a look at a long study while it runs, or
the table of a study stopped part-way).

A second table (``results.md``, under "Masks and loss balance") gives each distilled row's
trajectory from its ``metrics.jsonl`` (:mod:`acamkd.trajectories`): the mean spatial and channel
mask at the first, middle and last logged step, the smallest level's at the end, and the ratio of
the distillation losses to the task loss at those steps; ``results.json`` holds the same keys per
seed and aggregated.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import shlex
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acamkd.config import Config, load_config, parse_override, to_dict
from acamkd.experiments import Run, RunResult, aggregate, by_name, read_finished, run_all, write_results
from acamkd.trajectories import run_trajectory, trajectory_table

__all__ = ["PLAIN", "COLUMNS", "ComparePlan", "Row", "UnknownMethodError", "build_parser", "main", "parse_methods",
           "parse_variant", "plan", "plan_rows", "row_slug"]

logger = logging.getLogger("acamkd")

PLAIN = "plain"  # the row trained without distillation
TEACHER = "teacher"  # the teacher's row and run name
COLUMNS: dict[str, tuple[tuple[str, ...], str]] = {
    "detection": (("AP", "AP50", "APs", "APm", "APl"), "COCO box metrics"),
    "segmentation": (("mIoU", "mAcc", "aAcc"), "segmentation metrics"),
}
_RESERVED = ("train.seed", "train.output_dir")  # set by compare per run


class UnknownMethodError(ValueError):
    """A method name that is neither ``plain`` nor a registered method (with close matches)."""


@dataclass(frozen=True)
class Row:
    """One row of the table: ``name`` (``"acam"``, ``"acam mask_norm=energy"``), ``method``
    (None for plain) and the dotted config overrides that make it (``method.options.<key>=...``
    for a variant's bare keys; not the per-seed ``train.seed`` / ``train.output_dir``)."""

    name: str
    method: str | None
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return row_slug(self.name)


@dataclass
class ComparePlan:
    """What :func:`plan` derives from the arguments: the runs in order (teacher first), the rows,
    the metric columns, the table header, the output folder, and the teacher's result read from
    the folder of a given checkpoint (None when the teacher is trained here or has no metrics)."""

    runs: list[Run]
    rows: list[Row]
    columns: tuple[str, ...]
    header: str
    out: Path
    teacher_checkpoint: str
    external_teacher: RunResult | None = None
    seeds: list[int] = field(default_factory=list)


# ======================================================================== names and variants


def row_slug(name: str) -> str:
    """A folder name for a row: ``"acam mask_norm=energy"`` -> ``"acam-mask_norm-energy"``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "row"


def _check_names(names: Sequence[str], where: str) -> None:
    """Raise :class:`UnknownMethodError` for the first name that is neither plain nor registered."""
    from acamkd import methods  # imports torch

    known = [PLAIN, *methods.available()]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise UnknownMethodError(f"{where}: unknown method {name!r}; {hint}choose {PLAIN!r} (no distillation) "
                                     f"or a registered method: {', '.join(methods.available())}")


def parse_methods(text: str) -> list[str]:
    """``"plain,mimic,acam"`` -> ``["plain", "mimic", "acam"]`` (spaces ignored). Raises ValueError
    for an empty list or a name given twice, :class:`UnknownMethodError` for an unknown name."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods {text!r}: name at least one method, e.g. --methods plain,mimic,acam")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--methods {text!r}: {twice} given more than once")
    _check_names(names, "--methods")
    return names


def parse_variant(text: str) -> Row:
    """``"acam:mask_norm=energy alpha=0.5"`` -> the row ``"acam mask_norm=energy alpha=0.5"`` with
    overrides ``method.options.mask_norm=energy``, ``method.options.alpha=0.5``; a key holding a
    dot is a full config key (``acam:train.lr=1e-3``). Values are YAML, as in every override.

    Raises ValueError (no ``NAME:``, no override, a malformed ``key=value``, a bare key for
    ``plain``, a key compare sets itself), :class:`UnknownMethodError` (unknown NAME)."""
    name, sep, rest = str(text).partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--set {text!r}: expected NAME:key=value, e.g. --set acam:mask_norm=energy")
    _check_names([name], f"--set {text!r}")
    items = shlex.split(rest)
    if not items:
        raise ValueError(f"--set {text!r}: give at least one key=value after {name}:")
    overrides = []
    for item in items:
        key = item.partition("=")[0].strip()
        if "." not in key:
            if name == PLAIN:
                raise ValueError(f"--set {text!r}: {PLAIN!r} has no method options; give a dotted config key, "
                                 f"e.g. {PLAIN}:train.lr=1e-3")
            item = f"method.options.{item.strip()}"
        parse_override(item)  # KEY=VALUE with a YAML value, else a ConfigError naming it
        _check_reserved([item], f"--set {text!r}")
        overrides.append(item.strip())
    return Row(f"{name} {' '.join(i.strip() for i in items)}", None if name == PLAIN else name, tuple(overrides))


def _check_reserved(overrides: Sequence[str], where: str) -> None:
    for text in overrides:
        key = str(text).partition("=")[0].strip()
        if key in _RESERVED or any(r.startswith(key + ".") for r in _RESERVED):
            flag = "--seeds" if key == "train.seed" else "--out"
            raise ValueError(f"{where}: {key} is set by compare for every run (use {flag}); remove {text!r}")


def plan_rows(methods: Sequence[str], variants: Sequence[Row]) -> list[Row]:
    """The rows in table order: each of ``methods`` followed by its variants, then the variants
    of methods not listed (in the order given). Raises ValueError when two rows would share a
    name or a folder."""
    rows: list[Row] = []
    for name in methods:
        rows.append(Row(name, None if name == PLAIN else name))
        rows += [v for v in variants if (v.method or PLAIN) == name]
    rows += [v for v in variants if (v.method or PLAIN) not in methods]
    seen: dict[str, str] = {TEACHER: TEACHER}
    for row in rows:
        if row.slug in seen:
            raise ValueError(f"rows {seen[row.slug]!r} and {row.name!r} would share the folder {row.slug!r}: "
                             f"give each variant other overrides")
        seen[row.slug] = row.name
    return rows


# ============================================================================= configs


def _yaml(value: Any) -> str:
    """A value as an override's YAML (JSON is YAML)."""
    return json.dumps(value, default=str)


def _teacher_overrides(base: Config, teacher_overrides: Sequence[str], out_dir: Path) -> list[str]:
    section = to_dict(base.teacher)
    section["checkpoint"] = None  # a teacher trains from the init a student would; the CONFIG's is its result
    return [f"student={_yaml(section)}", "teacher=null", "method.name=null", "method.options={}",
            "train.inherit_teacher=false", *teacher_overrides, "train.seed=0", f"train.output_dir={out_dir}"]


def _row_overrides(row: Row, own_method: str | None, checkpoint: str, seed: int, out_dir: Path) -> list[str]:
    if row.method is None:
        make = ["method.name=null", "method.options={}", "teacher=null", "train.inherit_teacher=false"]
    elif row.method == own_method:
        make = [f"teacher.checkpoint={_yaml(checkpoint)}"]
    else:
        make = [f"method.name={row.method}", "method.options={}", f"teacher.checkpoint={_yaml(checkpoint)}"]
    return [*make, *row.overrides, f"train.seed={seed}", f"train.output_dir={out_dir}"]


def _model(m) -> str:
    return f"{m.arch} {m.backbone}"


def _schedule(cfg: Config) -> str:
    t = cfg.train
    length = f"{t.iterations} iterations" if t.iterations is not None else f"{t.epochs} epochs"
    return f"{length}, {t.optimizer} lr {t.lr:g}, batch {cfg.data.batch_size}"


def _external_teacher(cfg: Config, checkpoint: str) -> RunResult | None:
    """The teacher's row from ``final_metrics.json`` (+ ``timing.json``) beside a given checkpoint."""
    folder = Path(checkpoint).parent
    metrics = _read(folder / "final_metrics.json")
    if not isinstance(metrics, dict):
        return None
    timing = _read(folder / "timing.json")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(folder)))
    return RunResult(Run(TEACHER, "train", cfg, seed=0), {**metrics, **(timing if isinstance(timing, dict) else {})},
                     "external")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def plan(config: str, methods: Sequence[str] | str | None = None, variants: Sequence[str] = (), seeds: int = 1,
         out: str | Path | None = None, overrides: Sequence[str] = (), teacher_overrides: Sequence[str] = (),
         teacher_checkpoint: str | None = None) -> ComparePlan:
    """Every run of a comparison, each config loaded and checked; nothing runs.

    ``methods`` (a list or ``"plain,mimic,acam"``; None: ``plain``, ``mimic`` and CONFIG's own
    method), ``variants`` (``["acam:mask_norm=energy", ...]``), ``seeds`` (>= 1) and the rest as
    in the module docstring. Raises :class:`UnknownMethodError`, ValueError (bad arguments, a
    CONFIG without a teacher, a reserved key), :class:`~acamkd.config.ConfigError` (any run's
    config), FileNotFoundError (a given teacher checkpoint that does not exist).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    _check_reserved(overrides, "override")
    _check_reserved(teacher_overrides, "--teacher-override")
    base = load_config(config, overrides)
    if base.teacher is None:
        raise ValueError(f"{config}: compare needs a distillation config (with a teacher section and a method); "
                         f"this one trains {_model(base.student)} alone. Add teacher: {{arch: ..., backbone: ...}}")
    own = base.method.name
    if methods is None:
        methods = list(dict.fromkeys([PLAIN, "mimic", *([own] if own else [])]))
    names = parse_methods(methods if isinstance(methods, str) else ",".join(methods))
    rows = plan_rows(names, [parse_variant(v) for v in variants])
    out = Path(out) if out is not None else Path("runs") / "compare" / Path(config).stem

    given = teacher_checkpoint or base.teacher.checkpoint
    if given and teacher_overrides:
        raise ValueError("--teacher-override changes the teacher's training, but the teacher is given "
                         f"({given}) and not trained here: drop one of them")
    teacher_dir = out / TEACHER / "seed0"
    teacher_cfg = load_config(config, [*overrides, *_teacher_overrides(base, teacher_overrides, teacher_dir)])
    runs: list[Run] = []
    external = None
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"teacher checkpoint {given}: no such file (--teacher-checkpoint or "
                                    f"teacher.checkpoint)")
        checkpoint = str(given)
        external = _external_teacher(teacher_cfg, checkpoint)
    else:
        checkpoint = str(teacher_dir / "last.pt")
        runs.append(Run(TEACHER, "train", teacher_cfg, seed=0))
    for seed in range(seeds):  # seed-major: after seed 0 every row has a number
        for row in rows:
            cfg = load_config(config, [*overrides, *_row_overrides(row, own, checkpoint, seed,
                                                                   out / row.slug / f"seed{seed}")])
            distilled = cfg.method.name is not None
            runs.append(Run(row.name, "distill" if distilled else "train", cfg, seed=seed,
                            needs=[TEACHER] if distilled and not given else []))

    columns, metric_name = COLUMNS[base.student.task]
    teacher_text = (f"teacher {_model(base.teacher)} trained once (seed 0) and shared by all rows and seeds"
                    if not given else f"teacher {_model(base.teacher)} from {checkpoint}, not trained here"
                    + ("" if external else " (no final_metrics.json beside it: no teacher row)"))
    seed_text = "seed 0" if seeds == 1 else f"mean ± std over seeds 0..{seeds - 1} (train.seed)"
    header = (f"acamkd compare {config}: {metric_name} (x100) on the {base.data.dataset} {base.data.val_split} split, "
              f"{seed_text}; {teacher_text}; student {_model(base.student)}, every row on the same schedule "
              f"({_schedule(base)}).")
    return ComparePlan(runs, rows, columns, header, out, checkpoint, external, list(range(seeds)))


# ================================================================================= command


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd compare", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated rows: {PLAIN} (no distillation) and registered methods; default "
                             f"{PLAIN},mimic,<CONFIG's method>")
    parser.add_argument("--set", dest="variants", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a variant row of method NAME, e.g. acam:mask_norm=energy (KEY: method.options.KEY, "
                             "or a full config key if it holds a dot; several in one quoted argument, "
                             "space-separated); repeatable")
    return add_run_set_arguments(parser, "runs/compare/<config stem>")


def add_run_set_arguments(parser: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    """The arguments every run set of this runner takes (``compare``, ``ablate``): CONFIG, seeds,
    ``--report-only``, ``--out``, the teacher's, and overrides (also after the options)."""
    parser.add_argument("config", help="a distillation config (teacher + method), e.g. "
                                       "configs/demo/shapes_det_acam.yaml")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row (train.seed); default 1")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the table of the runs already finished with this config "
                             "(each row's n says how many seeds it has; the header lists the runs not finished)")
    parser.add_argument("--out", default=None, help="runs go to OUT/<row>/seed<k>, the teacher to OUT/teacher/seed0, "
                                                    f"the table to OUT/results.{{md,json}}; default {default_out}")
    teacher = parser.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-checkpoint", default=None, metavar="PATH",
                         help="use this trained teacher instead of training one")
    teacher.add_argument("--teacher-override", "--teacher-overrides", dest="teacher_overrides", action="append",
                         default=[], metavar="KEY=VALUE",
                         help="an override of the teacher's training run only (its model is `student` there), "
                              "e.g. train.iterations=1000; repeatable")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. data.root=/data/coco")
    # Runs resume by themselves (acamkd.experiments.run_all); accepted so that the command the CLI
    # prints after a stop signal ("... --resume") works as printed.
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    # argparse hands every positional to `config` and `overrides` in the first run of positionals, so
    # overrides after the options (`compare CONFIG --seeds 2 data.root=...`) would be "unrecognized":
    # collect them into `overrides`, in order (the instance method is what the `acamkd` parser calls).
    parser.parse_known_args = types.MethodType(_parse_known_with_trailing_overrides, parser)
    return parser


def _parse_known_with_trailing_overrides(self: argparse.ArgumentParser, args=None, namespace=None):
    namespace, extras = type(self).parse_known_args(self, args, namespace)
    trailing = [a for a in extras if "=" in a and not a.startswith("-")]
    if trailing:
        namespace.overrides = [*(namespace.overrides or []), *trailing]
    return namespace, [a for a in extras if a not in trailing]


_MEMORY_KINDS = {
    "cuda_max_allocated": "the most GPU memory tensors held during the run (torch.cuda.max_memory_allocated)",
    "cpu_peak_rss": ("the peak resident set of the whole process during the run (Linux VmHWM, reset at each run's "
                     "start; data loading and Python included)"),
}


TRAJECTORY_HEADER = ("Masks and loss balance (from each run's metrics.jsonl; start / mid / end = the first, middle "
                     "and last logged train step; mask means averaged over levels; distill_to_task = the "
                     "distillation losses over the task loss):")


def _with_trajectory(result: RunResult) -> RunResult:
    """A distilled run's result with its :func:`~acamkd.trajectories.run_trajectory` keys added."""
    if result.run.kind != "distill":
        return result
    return dataclasses.replace(result, metrics={**result.metrics, **run_trajectory(result.run.output_dir)})


def _memory_note(results: Sequence[RunResult]) -> str:
    """What the peak MiB column measured, from the runs' ``timing.json`` (empty if none recorded it)."""
    kinds = sorted({str(r.metrics["peak_mem_kind"]) for r in results if "peak_mem_kind" in r.metrics})
    if not kinds:
        return ""
    return " Peak MiB: " + "; ".join(f"{k}, {_MEMORY_KINDS.get(k, 'as timing.json names it')}" for k in kinds) + "."


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Plan (everything checked), run (cached, resumable), print and write the table."""
    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = plan(args.config, args.methods, args.variants, args.seeds, args.out, args.overrides,
             args.teacher_overrides, args.teacher_checkpoint)
    header = p.header
    if args.report_only:  # the table of what is finished; nothing trains
        finished, missing = read_finished(p.runs)
        header += (f" Report only: {len(finished)} of {len(p.runs)} runs finished with this config"
                   + (f"; not finished: {', '.join(r.id for r in missing)}." if missing else "."))
        results = [_with_trajectory(r) for r in finished]
    else:
        results = [_with_trajectory(r) for r in run_all(p.runs)]
    if p.external_teacher is not None:
        results = [p.external_teacher, *results]
    md, js = write_results(p.out / "results", results, p.columns, header + _memory_note(results), peak_memory=True)
    trajectories = trajectory_table(aggregate(by_name(results)))
    if trajectories:
        md.write_text(md.read_text() + f"\n{TRAJECTORY_HEADER}\n\n{trajectories}\n")
    print(f"\n{md.read_text()}\n(written to {md} and {js})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
