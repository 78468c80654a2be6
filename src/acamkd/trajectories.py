"""What a run's training log says about its masks and its loss balance at the start, middle and end.

``acamkd compare`` adds these to every distilled row (a second table in ``results.md``, the
values in ``results.json``), so a study shows *why* a variant scores as it does: whether its
masks stayed alive and whether its distillation losses swamped the task loss.

Read from ``metrics.jsonl`` (:class:`acamkd.engine.run_log.RunLog`): the ``kind == "train"``
records, at the first logged step (``start``), the middle record (index ``n // 2``, ``mid``) and
the last (``end``):

* ``<family>_mask_mean@<point>``: the mean over levels of ``stats.<level>.<family>_mask_mean``
  (ACAM-KD's mean mask value; family ``spatial`` or ``channel``); ``<family>_mask_min_level@end``:
  the smallest level's mean at the end (a collapse often starts at one level);
* ``distill_to_task@<point>``: the sum of the ``distill.*`` losses over the sum of the
  ``task.*`` losses of that record (weighted values, as trained on).

A key is absent when the log has no such value (a method without masks, a plain run, a run
logged once: then ``start``, ``mid`` and ``end`` are the same record).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "POINTS", "TRAJECTORY_COLUMNS", "run_trajectory", "trajectory_table"]

FAMILIES = ("spatial", "channel")
POINTS = ("start", "mid", "end")
_MASK_KEY = re.compile(r"^stats\.(?P<level>.+)\.(?P<family>spatial|channel)_mask_mean$")
# the table's columns, in order (results.json holds the same keys)
TRAJECTORY_COLUMNS = (*(f"{f}_mask_mean@{p}" for f in FAMILIES for p in POINTS),
                      *(f"{f}_mask_min_level@end" for f in FAMILIES),
                      *(f"distill_to_task@{p}" for p in POINTS))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_values(record: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    per_family: dict[str, list[float]] = {}
    for key, value in record.items():
        match = _MASK_KEY.match(key)
        if match and _finite(value):
            per_family.setdefault(match["family"], []).append(float(value))
    for family, values in per_family.items():
        out[f"{family}_mask_mean"] = sum(values) / len(values)
        out[f"{family}_mask_min_level"] = min(values)
    distill = [float(v) for k, v in record.items() if k.startswith("distill.") and _finite(v)]
    task = [float(v) for k, v in record.items() if k.startswith("task.") and _finite(v)]
    if distill and task and sum(task) > 0:
        out["distill_to_task"] = sum(distill) / sum(task)
    return out


def run_trajectory(output_dir: str | os.PathLike) -> dict[str, float]:
    """The trajectory keys (module docstring) of the run in ``output_dir``; ``{}`` when its
    ``metrics.jsonl`` is missing or has no train record. Unreadable lines are skipped (a run
    killed mid-write leaves at most a partial last line)."""
    import json

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == "train":
            records.append(record)
    if not records:
        return {}
    out: dict[str, float] = {}
    for point, record in zip(POINTS, (records[0], records[len(records) // 2], records[-1])):
        for key, value in _record_values(record).items():
            if "_min_level" in key and point != "end":
                continue
            out[f"{key}@{point}"] = value
    return out


def _cell(row: Mapping[str, Any], key: str) -> str:
    mean, std = row["mean"].get(key), row["std"].get(key)
    if mean is None:
        return "-"
    return f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"


def trajectory_table(stats: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = TRAJECTORY_COLUMNS) -> str:
    """A markdown table of the rows of :func:`acamkd.experiments.aggregate` output that hold any
    trajectory key: mean (± sample std over seeds) to 3 significant digits, ``-`` where absent.
    Empty string when no row has one."""
    shown = [c for c in columns if any(c in row["mean"] for row in stats.values())]
    rows = {name: row for name, row in stats.items() if any(c in row["mean"] for c in shown)}
    if not rows:
        return ""
    lines = ["| model | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, row in rows.items():
        label = name if row["n"] <= 1 else f"{name} (n={row['n']})"
        lines.append(f"| {label} | " + " | ".join(_cell(row, c) for c in shown) + " |")
    return "\n".join(lines)
