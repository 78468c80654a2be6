"""The per-class table ``acamkd eval`` prints: one row per class name, from the metrics dict.

The tasks report per-class scores as ``IoU.<class name>`` (segmentation) and ``AP.<category
name>`` (detection) keys next to their summary (``mIoU``, ``AP``); this turns them into text.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PER_CLASS_PREFIXES", "per_class_table"]

# per-class key prefix -> the summary key printed under the rows
PER_CLASS_PREFIXES = {"IoU.": "mIoU", "AP.": "AP"}


def per_class_table(metrics: Mapping[str, float]) -> str:
    """Rows ``<class name>  <value x 100>`` for every ``IoU.<name>`` / ``AP.<name>`` key of
    ``metrics`` (in its order), then the summary row; ``""`` when there is no per-class key.
    Values are on the metrics' 0..1 scale and printed as percentages with two decimals."""
    for prefix, summary in PER_CLASS_PREFIXES.items():
        rows = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
        if rows:
            break
    else:
        return ""
    metric = prefix.rstrip(".")
    if summary in metrics:
        rows.append((summary, metrics[summary]))
    width = max(len("class"), *(len(name) for name, _ in rows))
    lines = [f"{'class':<{width}}  {metric:>6}", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{name:<{width}}  {100 * value:6.2f}" for name, value in rows]
    if summary in metrics:
        lines.insert(-1, f"{'-' * width}  {'-' * 6}")
    return "\n".join(lines)
