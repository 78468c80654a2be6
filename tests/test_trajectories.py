"""``acamkd.trajectories``: mask means and the distillation/task loss ratio at start, middle and end
of a run's metrics.jsonl, and their table (``acamkd compare``'s second table)."""
from __future__ import annotations

import json

import pytest

from acamkd.experiments import aggregate
from acamkd.trajectories import TRAJECTORY_COLUMNS, run_trajectory, trajectory_table


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def record(step, p3_spatial, p4_spatial, channel, distill, task, kind="train"):
    return {"step": step, "kind": kind, "stats.p3.spatial_mask_mean": p3_spatial,
            "stats.p4.spatial_mask_mean": p4_spatial, "stats.p3.channel_mask_mean": channel,
            "stats.p4.channel_mask_mean": channel, "stats.p3.spatial_dice": 0.9,
            "distill.p3.spatial": distill / 2, "distill.p4.spatial": distill / 2,
            "task.classification": task * 0.75, "task.bbox_regression": task * 0.25, "loss": distill + task}


def test_start_middle_and_end_of_the_train_records(tmp_path):
    write_log(tmp_path, [
        record(10, 0.5, 0.3, 0.5, 300.0, 1.5),
        {"step": 15, "kind": "val", "AP": 0.1},  # not a train record: ignored
        record(20, 0.2, 0.1, 0.25, 30.0, 1.2),
        record(30, 0.01, 0.002, 0.125, 2.0, 1.0),
        record(40, 1e-4, 2e-5, 0.0625, 0.5, 1.0),
    ])
    t = run_trajectory(tmp_path)
    assert t["spatial_mask_mean@start"] == pytest.approx(0.4)
    assert t["spatial_mask_mean@mid"] == pytest.approx(0.006)  # records[4 // 2] = step 30
    assert t["spatial_mask_mean@end"] == pytest.approx(6e-5)
    assert t["spatial_mask_min_level@end"] == pytest.approx(2e-5)
    assert t["channel_mask_mean@start"] == 0.5 and t["channel_mask_mean@end"] == 0.0625
    assert t["distill_to_task@start"] == pytest.approx(200.0)
    assert t["distill_to_task@mid"] == pytest.approx(2.0)
    assert t["distill_to_task@end"] == pytest.approx(0.5)
    assert "spatial_mask_min_level@start" not in t
    assert set(t) <= set(TRAJECTORY_COLUMNS)


def test_absent_log_no_masks_and_a_cut_last_line(tmp_path):
    assert run_trajectory(tmp_path / "nowhere") == {}
    write_log(tmp_path, [{"step": 10, "kind": "train", "task.classification": 2.0, "distill.p3.mse": 6.0}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "kind": "tra')  # a run killed mid-write
    assert run_trajectory(tmp_path) == {"distill_to_task@start": 3.0, "distill_to_task@mid": 3.0,
                                        "distill_to_task@end": 3.0}  # one record: all three points


def test_the_table_shows_rows_with_a_trajectory_and_the_spread_over_seeds():
    stats = aggregate({
        "plain": {0: {"AP": 0.1}, 1: {"AP": 0.2}},
        "acam": {0: {"AP": 0.1, "spatial_mask_mean@end": 1e-5, "distill_to_task@start": 100.0},
                 1: {"AP": 0.2, "spatial_mask_mean@end": 3e-5, "distill_to_task@start": 300.0}},
        "mimic": {0: {"AP": 0.3, "distill_to_task@start": 4.0}},
    })
    table = trajectory_table(stats)
    lines = table.splitlines()
    assert lines[0] == "| model | spatial_mask_mean@end | distill_to_task@start |"
    assert lines[2] == "| acam (n=2) | 2e-05 ± 1.4e-05 | 200 ± 1.4e+02 |"
    assert lines[3] == "| mimic | - | 4 |"
    assert len(lines) == 4  # plain has no trajectory
    assert trajectory_table(aggregate({"plain": {0: {"AP": 0.1}}})) == ""
