"""What a run reports: one JSON line per logged step, TensorBoard scalars, a progress bar.

``metrics.jsonl`` is the machine-readable record (one object per line: ``step``, ``kind``
("train", "val", ...), the metrics, wall ``time``); TensorBoard gets the same scalars under
``<kind>/<name>``; a progress bar shows loss and speed only on a terminal. Only rank 0
writes. On resume, lines past the checkpoint's step (written by the killed run after its last
checkpoint) are dropped, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

__all__ = ["RunLog", "METRICS_FILE", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class RunLog:
    """Rank-0 writer of metrics.jsonl + TensorBoard, and an optional progress bar."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, total: int | None = None, progress: bool | None = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(os.fspath(output_dir), METRICS_FILE)
        self._writer = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(os.path.join(os.fspath(output_dir), "tensorboard"),
                                             purge_step=resume_step)
            except ImportError:  # tensorboard not installed: the JSON lines remain
                self._writer = None
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=resume_step or 0, dynamic_ncols=True, unit="it")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Record ``metrics`` at ``step`` (tensors are converted with ``.item()``)."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _jsonable(v) for k, v in metrics.items()}, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("step", "kind", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)
        if self._bar is not None and kind == "train":
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "lr", "img_per_s") if isinstance(record.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (for tests, reports and the demo table)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
