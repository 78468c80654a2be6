"""metrics.jsonl lines, TensorBoard events, resume truncation, rank-0 only."""
import json
import os

import torch

from acamkd.engine.run_log import METRICS_FILE, RunLog, read_metrics


def test_lines_scalars_and_events(tmp_path):
    with RunLog(tmp_path, progress=False) as log:
        log.log(1, {"loss": torch.tensor(0.5), "lr": 0.01, "p3.spatial_mask_mean": 0.4})
        log.log(2, {"loss": float("nan")})
        log.log(2, {"AP": 0.3}, kind="val")
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (2, "val")]
    assert records[0]["loss"] == 0.5 and records[0]["p3.spatial_mask_mean"] == 0.4
    assert records[1]["loss"] == "nan"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


def test_resume_drops_lines_past_the_checkpoint(tmp_path):
    with RunLog(tmp_path, tensorboard=False, progress=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": step})
    with RunLog(tmp_path, tensorboard=False, progress=False, resume_step=3) as log:
        log.log(4, {"loss": 40})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / METRICS_FILE)] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path / "run", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_lines_are_valid_json(tmp_path):
    with RunLog(tmp_path, tensorboard=False, progress=False) as log:
        log.log(7, {"x": 1, "y": float("inf")})
    line = (tmp_path / METRICS_FILE).read_text().strip()
    assert json.loads(line)["y"] == "inf"
