"""``acamkd viz history RUN_DIR [RUN_DIR ...]``: training curves of one or more runs, overlaid.

Reads each run's ``metrics.jsonl`` (:class:`acamkd.engine.run_log.RunLog`: one JSON object per
logged step, ``kind`` "train" or "val") and writes, into ``--out``:

* ``losses.png``: the total ``loss``, every ``task.<name>`` loss, every distillation loss kind
  summed over levels (``distill.<level>.<kind>`` -> ``distill.*.<kind>``), and ``lr``;
* ``masks.png``: per level (columns) the mask statistics (rows): every ``stats.<level>.<stat>``
  whose ``<stat>`` ends in ``_mask_mean`` or ``_dice`` (ACAM-KD: the mean mask value and the
  mean pairwise Dice of the M masks), on a fixed 0..1 axis, so a collapse shows as a mean going
  to 0 or a Dice going to 1;
* ``stats.png``: the other ``stats.<level>.<stat>`` values the method logged, laid out the same way;
* ``validation.png``: every numeric value of the ``kind == "val"`` records (a metric that is -1 at
  every evaluation, COCO's "no such objects", is left out).

A figure with nothing to show is not written (a plain run has no ``masks.png``). Each run has one
colour in every figure; runs are named by the shortest path suffix that tells them apart
(``acam/seed0``, ``mimic/seed0``). x is the optimizer step. A panel uses a log y axis when its
values are all positive and span more than two decades. A value logged as non-finite ("nan",
"inf") is drawn as a dotted vertical line at the first step where it happened.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acamkd.engine.run_log import METRICS_FILE
from acamkd.viz.figure import new_figure, run_colours, save_png

__all__ = ["RunHistory", "load_run", "run_labels", "history_figures", "build_parser", "main"]

_SKIP = ("step", "kind", "time", "epoch")
_PANEL_IN = (3.4, 2.4)  # inches per panel (width, height)


@dataclass
class RunHistory:
    """One run's log: ``train`` / ``val`` map a metric name to ``(steps, values)`` lists
    (values are floats; non-finite ones as ``nan``/``inf``)."""

    path: str
    label: str = ""
    train: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    val: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)  # RunLog writes non-finite values as strings
    return None


def load_run(run_dir: str | os.PathLike) -> RunHistory:
    """The numeric series of ``run_dir/metrics.jsonl``. A last line cut short (a run still
    writing, or killed mid-write) is ignored.

    Raises:
        FileNotFoundError: ``run_dir`` or its metrics.jsonl does not exist.
        ValueError: a line other than the last is not JSON (file:line named), or the file holds
            no record.
    """
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: give the train.output_dir of a run "
                                f"(the folder holding {METRICS_FILE} and last.pt)")
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    history = RunHistory(path=run_dir)
    for n, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:
                break  # a line being written
            raise ValueError(f"{path}:{lineno}: not a JSON object; is this an acamkd metrics file?") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{lineno}: a record without 'step'; is this an acamkd metrics file?")
        series = history.val if record.get("kind") == "val" else history.train if record.get(
            "kind", "train") == "train" else None
        if series is None:
            continue
        for key, value in record.items():
            number = _number(value)
            if key in _SKIP or number is None:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(record["step"]))
            values.append(number)
    if not history.train and not history.val:
        raise ValueError(f"{path} holds no train or val record with numbers")
    return history


def run_labels(paths: Sequence[str]) -> list[str]:
    """The shortest trailing path parts that tell ``paths`` apart (``a/seed0`` vs ``b/seed0``)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.fspath(p) for p in paths]  # the same folder given twice


# ------------------------------------------------------------------------------------- panels
def _summed(series: dict[str, tuple[list[int], list[float]]], keys: list[str]) -> tuple[list[int], list[float]]:
    """The per-step sum of ``keys`` (steps where every key was logged)."""
    per_step: dict[int, list[float]] = {}
    for key in keys:
        for step, value in zip(*series[key]):
            per_step.setdefault(step, []).append(value)
    steps = sorted(s for s, v in per_step.items() if len(v) == len(keys))
    return steps, [sum(per_step[s]) for s in steps]


def _split_level(key: str, prefix: str) -> tuple[str, str] | None:
    """``prefix.<level>.<name>`` -> ``(level, name)`` (level names may hold dots), else None."""
    if not key.startswith(prefix + "."):
        return None
    rest = key[len(prefix) + 1:]
    if "." not in rest:
        return None
    level, name = rest.rsplit(".", 1)
    return level, name


def _loss_panels(run: RunHistory) -> dict[str, tuple[list[int], list[float]]]:
    s = run.train
    panels: dict[str, tuple[list[int], list[float]]] = {}
    if "loss" in s:
        panels["loss (total)"] = s["loss"]
    for key in s:
        if key.startswith("task."):
            panels[key] = s[key]
    kinds: dict[str, list[str]] = {}
    for key in s:
        split = _split_level(key, "distill")
        if split:
            kinds.setdefault(split[1], []).append(key)
    for kind, keys in kinds.items():
        panels[f"distill.*.{kind} (sum over levels)"] = _summed(s, keys)
    if "lr" in s:
        panels["lr"] = s["lr"]
    return panels


def _is_mask_stat(name: str) -> bool:
    return name.endswith("_mask_mean") or name.endswith("_dice")


def _stat_grid(runs: list[RunHistory], masks: bool) -> tuple[list[str], list[str]]:
    """(stat names, levels) of the ``stats.<level>.<stat>`` keys, in order of first appearance."""
    stats: list[str] = []
    levels: list[str] = []
    for run in runs:
        for key in run.train:
            split = _split_level(key, "stats")
            if split is None or _is_mask_stat(split[1]) != masks:
                continue
            if split[0] not in levels:
                levels.append(split[0])
            if split[1] not in stats:
                stats.append(split[1])
    return stats, levels


# ------------------------------------------------------------------------------------- drawing
def _draw(ax: Any, data: tuple[list[int], list[float]], colour: Any, label: str) -> list[float]:
    """One run's line on ``ax``; a dotted vertical line at its first non-finite value. Returns
    the finite values (for the axis scale)."""
    steps, values = data
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if finite:
        ax.plot([s for s, _ in finite], [v for _, v in finite], color=colour, label=label, linewidth=1.2,
                marker="o" if len(finite) < 12 else None, markersize=3)
    bad = [s for s, v in zip(steps, values) if not math.isfinite(v)]
    if bad:
        ax.axvline(bad[0], color=colour, linestyle=":", linewidth=1.5)
    return [v for _, v in finite]


def _finish_axis(ax: Any, title: str, values: list[float], ylim: tuple[float, float] | None = None) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.4999 reads as 0.4999, not 1e-4 + 0.5


def _panel_figure(runs: list[RunHistory], colours: list[Any], panels: list[tuple[str, list[Any]]],
                  title: str, path: str, ncols: int = 4) -> str:
    """Panels in a grid; ``panels`` holds (title, one series or None per run)."""
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = new_figure(_PANEL_IN[0] * ncols, _PANEL_IN[1] * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, per_run) in zip(axes.flat, panels):
        values: list[float] = []
        for run, colour, data in zip(runs, colours, per_run):
            if data is not None:
                values += _draw(ax, data, colour, run.label)
        _finish_axis(ax, name, values)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    shown = [i for i in range(len(runs)) if any(per_run[i] is not None for _, per_run in panels)]
    _legend(fig, [runs[i] for i in shown], [colours[i] for i in shown], title)
    return save_png(fig, path)


def _legend(fig: Any, runs: list[RunHistory], colours: list[Any], title: str) -> None:
    from matplotlib.lines import Line2D

    import textwrap

    width_in = fig.get_size_inches()[0]
    # long run names (a study's variants) must not run off the figure: wrap the title at ~12
    # characters per inch (11 pt) and give the legend only as many columns as ~15 characters per
    # inch of 8 pt labels allow
    fig.suptitle("\n".join(textwrap.wrap(title, max(20, int(width_in * 12)))), fontsize=11)
    handles = [Line2D([], [], color=c, linewidth=2) for c in colours]
    labels = [r.label for r in runs]
    per_row = max(1, int(width_in * 15) // max(1, max(len(label) + 4 for label in labels)))
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(len(runs), 4, per_row)), fontsize=8,
               frameon=False)


def _grid_figure(runs: list[RunHistory], colours: list[Any], stats: list[str], levels: list[str], title: str,
                 path: str, ylim: tuple[float, float] | None = None) -> str:
    """Rows: ``stats``; columns: ``levels``; each cell one line per run (``ylim``: every cell's y range)."""
    fig = new_figure(_PANEL_IN[0] * 0.8 * len(levels), _PANEL_IN[1] * 0.9 * len(stats) + 0.6)
    axes = fig.subplots(len(stats), len(levels), squeeze=False)
    for i, stat in enumerate(stats):
        for j, level in enumerate(levels):
            ax, values = axes[i][j], []
            for run, colour in zip(runs, colours):
                data = run.train.get(f"stats.{level}.{stat}")
                if data is not None:
                    values += _draw(ax, data, colour, run.label)
            _finish_axis(ax, f"{level}: {stat}", values, ylim)
    shown = [i for i, run in enumerate(runs) if any(f"stats.{lv}.{st}" in run.train for st in stats for lv in levels)]
    _legend(fig, [runs[i] for i in shown], [colours[i] for i in shown], title)
    return save_png(fig, path)


def history_figures(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[str]:
    """Load every run of ``run_dirs`` and write the figures listed in the module docstring into
    ``out_dir``; returns the written paths in order (losses, masks, stats, validation).

    Raises:
        ValueError: no run given; or what :func:`load_run` raises.
        FileNotFoundError, OSError: a missing run folder or metrics file; a PNG that cannot be written.
    """
    if not run_dirs:
        raise ValueError("viz history: give at least one RUN_DIR (a run's train.output_dir)")
    runs = [load_run(d) for d in run_dirs]
    for run, label in zip(runs, run_labels([r.path for r in runs])):
        run.label = label
    colours = run_colours(len(runs))
    names = ", ".join(r.label for r in runs)
    out = os.fspath(out_dir)
    written: list[str] = []

    per_run = [_loss_panels(r) for r in runs]
    titles = list(dict.fromkeys(t for p in per_run for t in p))
    if titles:
        panels = [(t, [p.get(t) for p in per_run]) for t in titles]
        written.append(_panel_figure(runs, colours, panels, f"Training losses and lr: {names}",
                                     os.path.join(out, "losses.png")))
    for masks, name, what in ((True, "masks.png", "Mask statistics per level"),
                              (False, "stats.png", "Other method statistics per level")):
        stats, levels = _stat_grid(runs, masks)
        if stats:
            written.append(_grid_figure(runs, colours, stats, levels, f"{what}: {names}", os.path.join(out, name),
                                        ylim=(-0.02, 1.02) if masks else None))
    val_keys = list(dict.fromkeys(k for r in runs for k in r.val
                                  if not all(v == -1 for v in r.val[k][1])))
    if val_keys:
        panels = [(k, [r.val.get(k) for r in runs]) for k in val_keys]
        written.append(_panel_figure(runs, colours, panels, f"Validation: {names}",
                                     os.path.join(out, "validation.png")))
    return written


# ------------------------------------------------------------------------------------- command
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd viz history", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holding metrics.jsonl)")
    parser.add_argument("--out", default="history", help="folder for the PNGs (default: ./history)")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    print(json.dumps({"written": history_figures(args.run_dirs, args.out)}, indent=1))
    return 0
