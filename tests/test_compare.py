"""``acamkd compare``: runs derived from one distillation config, variants, seeds, the cached table.

Most tests replace the engine's ``train``/``distill`` with fakes that write what a finished run
writes (``tests/test_experiments.py`` does the same); one slow test trains for real, tiny.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from acamkd import cli
from acamkd.compare import UnknownMethodError, main, parse_variant, plan, row_slug
from acamkd.config import ConfigError
from acamkd.demo import TASKS
from acamkd.engine import run as engine
from acamkd.experiments import MARKER

ACAM = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes_det_acam.yaml")
STUDENT = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes_det_student.yaml")
# The demo's smoke profile (2 steps on 8 tiny images), at 64x64, with a ResNet-18 teacher.
TINY = [*TASKS["det"].profiles["smoke"], "data.shapes.size=[64,64]", "data.min_size=64", "data.max_size=64",
        "teacher.backbone=resnet18"]


def tiny(tmp_path, *extra):
    return [*TINY, f"data.root={tmp_path / 'data'}", *extra]


@pytest.fixture
def fake_engine(monkeypatch):
    """Fakes of train and distill that write a finished run's files; record (kind, folder) per call.
    Distillation runs record a peak memory, training runs none (the table shows '-' for them)."""
    calls = []

    def finish(kind, cfg, resume):
        out = Path(cfg.train.output_dir)
        calls.append((kind, str(out.relative_to(out.parents[1])), resume))
        out.mkdir(parents=True, exist_ok=True)
        (out / "last.pt").write_bytes(b"")
        ap = 0.1 + 0.01 * cfg.train.seed + (0.1 if kind == "distill" else 0.0)
        (out / "final_metrics.json").write_text(json.dumps({"step": 2, "AP": ap, "AP50": 0.5, "APs": -1.0,
                                                            "APm": 0.2, "APl": 0.3}))
        timing = {"sec_per_step": 0.5, "steps_timed": 2}
        if kind == "distill":
            timing.update(peak_mem_mib=100.0 + cfg.train.seed, peak_mem_kind="cuda_max_allocated")
        (out / "timing.json").write_text(json.dumps(timing))
        return {}

    monkeypatch.setattr(engine, "train", lambda cfg, resume=False, **kw: finish("train", cfg, resume))
    monkeypatch.setattr(engine, "distill", lambda cfg, resume=False, eval_teacher=None, **kw:
                        finish("distill", cfg, resume))
    return calls


# ------------------------------------------------------------------------------------ the plan


def test_one_teacher_then_plain_and_each_method_per_seed(tmp_path):
    out = tmp_path / "cmp"
    p = plan(ACAM, "plain,mimic,acam", seeds=2, out=out, overrides=tiny(tmp_path))
    assert [(r.name, r.kind, r.seed) for r in p.runs] == [
        ("teacher", "train", 0),
        ("plain", "train", 0), ("mimic", "distill", 0), ("acam", "distill", 0),
        ("plain", "train", 1), ("mimic", "distill", 1), ("acam", "distill", 1)]
    teacher, plain0, mimic0, acam0, plain1, mimic1, acam1 = (r.cfg for r in p.runs)
    # the teacher: CONFIG's teacher section trained on CONFIG's data and schedule
    assert (teacher.student.arch, teacher.student.backbone, teacher.student.checkpoint) == ("retinanet", "resnet18",
                                                                                            None)
    assert teacher.teacher is None and teacher.method.name is None and not teacher.train.inherit_teacher
    assert teacher.train.output_dir == str(out / "teacher" / "seed0") and teacher.train.seed == 0
    assert teacher.train.iterations == plain0.train.iterations == acam1.train.iterations == 2
    assert teacher.data == plain0.data == acam1.data
    # plain: the student alone
    assert plain0.teacher is None and plain0.method.name is None and not plain0.train.inherit_teacher
    assert plain0.student.backbone == "resnet18" and plain0.train.output_dir == str(out / "plain" / "seed0")
    # other methods with their defaults; CONFIG's own method keeps its options; all from the teacher run
    assert mimic0.method.name == "mimic" and mimic0.method.options == {"check_finite": True, "weight": 1.0, "feature_norm": "none"}
    assert acam0.method.name == "acam" and acam0.method.options["num_masks"] == 6
    for cfg in (mimic0, acam0, mimic1, acam1):
        assert cfg.teacher.checkpoint == str(out / "teacher" / "seed0" / "last.pt")
        assert cfg.train.inherit_teacher  # CONFIG's, the same for every distilled row
    assert [c.train.seed for c in (plain1, mimic1, acam1)] == [1, 1, 1]
    assert acam1.train.output_dir == str(out / "acam" / "seed1")
    assert [r.needs for r in p.runs] == [(), (), ("teacher",), ("teacher",), (), ("teacher",), ("teacher",)]
    assert p.columns == ("AP", "AP50", "APs", "APm", "APl")
    assert "teacher retinanet resnet18 trained once (seed 0) and shared by all rows and seeds" in p.header
    assert "mean ± std over seeds 0..1" in p.header


def test_a_variant_row_is_named_by_its_overrides():
    row = parse_variant("acam:mask_norm=energy")
    assert row.name == "acam mask_norm=energy" and row.overrides == ("method.options.mask_norm=energy",)
    assert row_slug(row.name) == "acam-mask_norm-energy"
    row = parse_variant("acam:train.lr=1e-3 alpha=0.5")
    assert row.name == "acam train.lr=1e-3 alpha=0.5"
    assert row.overrides == ("train.lr=1e-3", "method.options.alpha=0.5")
    with pytest.raises(ValueError, match="no method options"):
        parse_variant("plain:weight=2")
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        parse_variant("mask_norm=energy")
    with pytest.raises(ValueError, match="set by compare"):
        parse_variant("acam:train.seed=3")


def test_variants_follow_their_method_and_change_only_their_row(tmp_path):
    out = tmp_path / "cmp"
    p = plan(ACAM, "plain,acam", variants=["acam:mask_norm=energy", "mimic:weight=2", "plain:train.lr=0.001"],
             out=out, overrides=tiny(tmp_path))
    assert [r.name for r in p.rows] == ["plain", "plain train.lr=0.001", "acam", "acam mask_norm=energy",
                                        "mimic weight=2"]
    cfgs = {r.name: r.cfg for r in p.runs}
    assert cfgs["acam mask_norm=energy"].method.options["mask_norm"] == "energy"
    assert cfgs["acam"].method.options["mask_norm"] == "mass"
    assert cfgs["acam mask_norm=energy"].train.output_dir == str(out / "acam-mask_norm-energy" / "seed0")
    assert cfgs["mimic weight=2"].method.options["weight"] == 2
    assert cfgs["plain train.lr=0.001"].train.lr == 0.001 and cfgs["plain"].train.lr == cfgs["acam"].train.lr
    with pytest.raises(ConfigError, match="method.options.mask_nrom"):  # checked before anything runs
        plan(ACAM, "acam", variants=["acam:mask_nrom=energy"], out=out, overrides=tiny(tmp_path))


def test_unknown_method_is_a_named_error_before_any_run(tmp_path, fake_engine, capsys):
    with pytest.raises(UnknownMethodError, match=r"unknown method 'mimik'; did you mean 'mimic'"):
        main([ACAM, "--methods", "plain,mimik,acam", "--out", str(tmp_path / "cmp"), *tiny(tmp_path)])
    with pytest.raises(UnknownMethodError, match="'acma'"):
        main([ACAM, "--methods", "plain", "--set", "acma:alpha=2", "--out", str(tmp_path / "cmp"), *tiny(tmp_path)])
    # through the CLI: one named line, exit status 1
    assert cli.main(["compare", ACAM, "--methods", "mimik", "--out", str(tmp_path / "cmp"), *tiny(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "acamkd compare: UnknownMethodError: --methods: unknown method 'mimik'" in err
    assert fake_engine == [] and not (tmp_path / "cmp").exists()


def test_bad_arguments_are_refused_before_any_run(tmp_path, fake_engine):
    out = ["--out", str(tmp_path / "cmp")]
    with pytest.raises(ValueError, match="train.seed is set by compare.*--seeds"):
        main([ACAM, *out, *tiny(tmp_path), "train.seed=3"])
    with pytest.raises(ValueError, match="needs a distillation config"):
        main([STUDENT, *out, *TINY[:-1], f"data.root={tmp_path / 'data'}"])  # no teacher.backbone: no teacher
    with pytest.raises(ValueError, match="--seeds"):
        main([ACAM, "--seeds", "0", *out, *tiny(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        main([ACAM, "--teacher-checkpoint", str(tmp_path / "nope.pt"), *out, *tiny(tmp_path)])
    assert fake_engine == []


# ------------------------------------------------------------------------------- running it


def test_the_table_is_written_and_a_second_call_runs_nothing(tmp_path, fake_engine, capsys):
    args = [ACAM, "--methods", "plain,mimic,acam", "--seeds", "2", "--out", str(tmp_path / "cmp"), *tiny(tmp_path)]
    assert main(args) == 0
    assert fake_engine[0] == ("train", "teacher/seed0", False) and len(fake_engine) == 7
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert md in capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0].startswith("acamkd compare ") and "seeds 0..1" in lines[0]
    assert "Peak MiB: cuda_max_allocated" in lines[0]
    assert lines[2] == "| model | AP | AP50 | APs | APm | APl | train s/step | peak MiB |"
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines[4:]]
    assert rows == ["teacher", "plain (n=2)", "mimic (n=2)", "acam (n=2)"]
    acam = lines[-1].split(" | ")
    assert acam[1] == "20.5 ± 0.7" and acam[3] == "-" and acam[-1] == "100 ± 1 |"  # AP; APs -1; peak MiB
    assert lines[5].split(" | ")[-1] == "- |"  # plain: no peak memory recorded
    data = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert data["columns"] == ["AP", "AP50", "APs", "APm", "APl"]
    assert list(data["rows"]) == ["teacher", "plain", "mimic", "acam"]
    assert [data["rows"][n]["n"] for n in data["rows"]] == [1, 2, 2, 2]
    assert data["rows"]["mimic"]["runs"]["1"]["output_dir"] == str(tmp_path / "cmp" / "mimic" / "seed1")
    assert data["rows"]["acam"]["mean"]["AP"] == pytest.approx(0.205)

    fake_engine.clear()
    assert main(args) == 0  # every run finished before with the same config: read back
    assert fake_engine == []
    data = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {run["status"] for row in data["rows"].values() for run in row["runs"].values()} == {"cached"}
    # one more seed: only its runs train
    assert main([*args[:4], "3", *args[5:]]) == 0
    assert sorted(fake_engine) == [("distill", "acam/seed2", False), ("distill", "mimic/seed2", False),
                                   ("train", "plain/seed2", False)]


def test_report_only_tables_the_finished_runs_and_trains_nothing(tmp_path, fake_engine, capsys):
    out = tmp_path / "cmp"
    def args(seeds, *flags):
        return [ACAM, "--methods", "plain,mimic", "--seeds", str(seeds), "--out", str(out), *flags, *tiny(tmp_path)]

    assert main(args(2, "--report-only")) == 0 and fake_engine == []  # nothing finished, nothing trained
    assert "Report only: 0 of 5 runs finished" in (out / "results.md").read_text()
    assert main(args(1)) == 0  # the teacher and seed 0 of each row
    trained = len(fake_engine)
    assert main(args(2, "--report-only")) == 0 and len(fake_engine) == trained  # still nothing more
    text = (out / "results.md").read_text()
    assert "Report only: 3 of 5 runs finished with this config; not finished: plain (seed 1), mimic (seed 1)." in text
    data = json.loads((out / "results.json").read_text())
    assert [row["n"] for row in data["rows"].values()] == [1, 1, 1] and not (out / "plain" / "seed1").exists()


def test_the_teacher_override_changes_the_teacher_run_only(tmp_path, fake_engine):
    p = plan(ACAM, "plain,acam", out=tmp_path / "cmp", overrides=tiny(tmp_path),
             teacher_overrides=["train.iterations=3", "train.steps=[2]"])
    cfgs = {r.name: r.cfg for r in p.runs}
    assert cfgs["teacher"].train.iterations == 3 and cfgs["plain"].train.iterations == 2
    assert cfgs["acam"].train.iterations == 2


def test_a_given_teacher_checkpoint_is_used_not_trained(tmp_path, fake_engine):
    folder = tmp_path / "my_teacher"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"")
    (folder / "final_metrics.json").write_text(json.dumps({"step": 9, "AP": 0.4, "AP50": 0.6}))
    out = tmp_path / "cmp"
    assert main([ACAM, "--methods", "mimic", "--teacher-checkpoint", str(folder / "last.pt"), "--out", str(out),
                 *tiny(tmp_path)]) == 0
    assert fake_engine == [("distill", "mimic/seed0", False)] and not (out / "teacher").exists()
    assert json.loads((out / "mimic" / "seed0" / MARKER).read_text())["config"]["teacher"]["checkpoint"] == \
        str(folder / "last.pt")
    data = json.loads((out / "results.json").read_text())
    assert list(data["rows"]) == ["teacher", "mimic"] and data["rows"]["teacher"]["mean"]["AP"] == 0.4
    assert data["rows"]["teacher"]["runs"]["0"]["status"] == "external"
    with pytest.raises(ValueError, match="drop one of them"):  # CONFIG's own teacher.checkpoint counts as given
        plan(ACAM, "mimic", out=out, overrides=tiny(tmp_path, f"teacher.checkpoint={folder / 'last.pt'}"),
             teacher_overrides=["train.iterations=3"])


@pytest.mark.slow
def test_real_runs_two_seeds_plain_mimic_acam(tmp_path, monkeypatch):
    """Teacher + 2 seeds x (plain, mimic, acam), 2 steps each on 8 images of 64x64; then all cached."""
    out = tmp_path / "cmp"
    args = [ACAM, "--methods", "plain,mimic,acam", "--seeds", "2", "--out", str(out), *tiny(tmp_path)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["rows"]) == ["teacher", "plain", "mimic", "acam"]
    assert [row["n"] for row in data["rows"].values()] == [1, 2, 2, 2]
    for name, row in data["rows"].items():
        assert {"AP", "AP50", "sec_per_step"} <= set(row["mean"]), name
        assert all(run["metrics"]["step"] == 2 for run in row["runs"].values()), name
    log = (out / "mimic" / "seed1" / "metrics.jsonl").read_text().splitlines()
    assert "distill.p3.mse" in json.loads(log[0])  # the mimic loss was trained on
    assert "| model | AP | AP50 | APs | APm | APl | train s/step | peak MiB |" in (out / "results.md").read_text()
    # the second table: masks and loss balance of the distilled rows, from their metrics.jsonl
    assert "Masks and loss balance" in (out / "results.md").read_text()
    acam_seed0 = data["rows"]["acam"]["runs"]["0"]["metrics"]
    assert 0.0 < acam_seed0["spatial_mask_mean@start"] < 1.0 and acam_seed0["distill_to_task@end"] > 0.0
    assert "spatial_mask_mean@start" not in data["rows"]["mimic"]["mean"] and "distill_to_task@start" in \
        data["rows"]["mimic"]["mean"]
    assert "distill_to_task@start" not in data["rows"]["plain"]["mean"]

    calls = []
    monkeypatch.setattr(engine, "train", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(engine, "distill", lambda *a, **k: calls.append(a))
    assert main(args) == 0 and calls == []
    assert os.path.isfile(out / "teacher" / "seed0" / "last.pt")
