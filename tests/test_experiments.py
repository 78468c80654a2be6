"""The experiment runner: cache keyed by the resolved config, resume, dependency order, tables."""
import json
import logging
import math
import os

import pytest

from acamkd.config import load_config
from acamkd.demo import TASKS
from acamkd.engine import run as engine
from acamkd.experiments import (MARKER, Run, aggregate, by_name, format_table, markdown_table, read_finished,
                                run_all, run_key, write_results)

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")
SMOKE = TASKS["det"].profiles["smoke"]


def smoke(tmp_path, role="student", out="student", *extra):
    """The demo's smoke-sized detection config for ``role`` (a validated Config; nothing is built)."""
    extra = [*extra, f"teacher.checkpoint={tmp_path / 'teacher' / 'last.pt'}"] if role == "acam" else list(extra)
    return load_config(f"{DEMO}/shapes_det_{role}.yaml", [*SMOKE, f"data.root={tmp_path / 'data'}",
                                                          f"train.output_dir={tmp_path / out}", *extra])


@pytest.fixture
def fake_engine(monkeypatch):
    """Replace train and distill with fakes that write what a finished run writes; record calls."""
    calls = []

    def finish(kind, cfg, resume, **kw):
        calls.append((kind, os.path.basename(cfg.train.output_dir), resume, kw))
        out = cfg.train.output_dir
        os.makedirs(out, exist_ok=True)
        for name in ("prev.pt", "last.pt"):  # the engine's final checkpoint and the one before it
            open(os.path.join(out, name), "wb").close()
        with open(os.path.join(out, "final_metrics.json"), "w") as f:
            json.dump({"step": 2, "AP": 0.25, "AP50": 0.5, "APs": -1.0, "lr_seen": cfg.train.lr}, f)
        with open(os.path.join(out, "timing.json"), "w") as f:
            json.dump({"sec_per_step": 0.5, "steps_timed": 2}, f)
        return {}

    monkeypatch.setattr(engine, "train", lambda cfg, resume=False: finish("train", cfg, resume))
    monkeypatch.setattr(engine, "distill", lambda cfg, resume=False, eval_teacher=None, **kw:
                        finish("distill", cfg, resume, eval_teacher=eval_teacher, **kw))
    return calls


# ------------------------------------------------------------------------------------ cache


@pytest.mark.slow
def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    cfg = smoke(tmp_path)
    [first] = run_all([Run("student", "train", cfg)])  # the real engine: a few seconds
    assert first.status == "ran" and first.metrics["step"] == 2 and "AP" in first.metrics
    assert first.metrics["sec_per_step"] > 0
    marker = json.loads((tmp_path / "student" / MARKER).read_text())
    assert marker["status"] == "finished" and marker["sha256"] == first.key
    assert marker["config"]["train"]["output_dir"] == str(tmp_path / "student")

    calls = []
    monkeypatch.setattr(engine, "train", lambda *a, **k: calls.append(a))
    [again] = run_all([Run("student", "train", smoke(tmp_path))])  # an equal config, built anew
    assert calls == [] and again.status == "cached" and again.metrics == first.metrics


def test_a_finished_run_keeps_its_last_checkpoint_only(tmp_path, fake_engine, monkeypatch):
    """prev.pt guards a run against a kill between a checkpoint's two renames; once the run has
    finished it is dead weight (a sweep's disk doubled), so the runner removes it. A run that stops
    early keeps it (it resumes from it)."""
    run_all([Run("student", "train", smoke(tmp_path))])
    assert (tmp_path / "student" / "last.pt").is_file() and not (tmp_path / "student" / "prev.pt").exists()

    def killed(cfg, resume=False):
        open(os.path.join(cfg.train.output_dir, "prev.pt"), "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_all([Run("other", "train", smoke(tmp_path, "student", "other"))])
    assert (tmp_path / "other" / "prev.pt").is_file()  # not finished: kept for the resume


def test_a_folder_holding_another_config_is_moved_aside_not_reused(tmp_path, fake_engine):
    run_all([Run("student", "train", smoke(tmp_path))])
    [res] = run_all([Run("student", "train", smoke(tmp_path, "student", "student", "train.lr=0.001"))])
    assert [c[:3] for c in fake_engine] == [("train", "student", False), ("train", "student", False)]
    assert res.status == "ran" and res.metrics["lr_seen"] == 0.001
    old = json.loads((tmp_path / "student.stale-1" / MARKER).read_text())  # the first run, untouched
    assert old["config"]["train"]["lr"] == 0.01 and (tmp_path / "student.stale-1" / "final_metrics.json").exists()
    assert json.loads((tmp_path / "student" / MARKER).read_text())["config"]["train"]["lr"] == 0.001
    # a third config: the next free name
    run_all([Run("student", "train", smoke(tmp_path, "student", "student", "train.lr=0.002"))])
    assert (tmp_path / "student.stale-2" / MARKER).exists()


def test_a_folder_the_runner_did_not_write_is_moved_aside(tmp_path, fake_engine):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "last.pt").write_bytes(b"someone else's")
    [res] = run_all([Run("student", "train", smoke(tmp_path))])
    assert res.status == "ran" and fake_engine[0][2] is False
    assert (tmp_path / "student.stale-1" / "last.pt").read_bytes() == b"someone else's"


def test_a_run_killed_mid_way_is_resumed(tmp_path, fake_engine):
    cfg = smoke(tmp_path)
    [done] = run_all([Run("student", "train", cfg)])
    marker = json.loads((tmp_path / "student" / MARKER).read_text())
    # as a kill leaves it: the marker says started, a checkpoint, no final metrics
    (tmp_path / "student" / MARKER).write_text(json.dumps({**marker, "status": "started"}))
    (tmp_path / "student" / "final_metrics.json").unlink()
    [res] = run_all([Run("student", "train", cfg)])
    assert fake_engine[-1][:3] == ("train", "student", True) and res.status == "resumed"
    assert res.key == done.key and json.loads((tmp_path / "student" / MARKER).read_text())["status"] == "finished"
    # killed before its first checkpoint: nothing to resume, started over in a clean folder
    (tmp_path / "student" / MARKER).write_text(json.dumps({**marker, "status": "started"}))
    (tmp_path / "student" / "last.pt").unlink()
    [res] = run_all([Run("student", "train", cfg)])
    assert fake_engine[-1][:3] == ("train", "student", False) and res.status == "ran"
    assert (tmp_path / "student.stale-1").is_dir()


def test_a_run_in_progress_in_another_runner_is_neither_moved_nor_started(tmp_path, fake_engine):
    """Two runners on one --out: the second must not take the first's run (started, no checkpoint
    yet) for a killed one and move it aside (found running two acamkd compare on one --out)."""
    from acamkd.engine.run_folder import RunFolderBusy, RunFolderLock

    cfg = smoke(tmp_path)
    key = run_key(Run("student", "train", cfg), {})
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / MARKER).write_text(json.dumps({"status": "started", "sha256": key}))
    other = RunFolderLock(tmp_path, lock_name=".student.runner.lock")  # the other runner holds its lock
    other.acquire()
    try:
        with pytest.raises(RunFolderBusy, match=r"run student \(seed 0\) in .* another acamkd process \(pid \d+\)"):
            run_all([Run("student", "train", cfg)])
    finally:
        other.release()
    assert fake_engine == [] and not (tmp_path / "student.stale-1").exists()
    assert json.loads((tmp_path / "student" / MARKER).read_text())["status"] == "started"
    # once the other runner is gone: the usual rule (no checkpoint: started over), and the lock is free again
    [res] = run_all([Run("student", "train", cfg)])
    assert res.status == "ran" and (tmp_path / "student.stale-1").is_dir()
    with RunFolderLock(tmp_path, lock_name=".student.runner.lock"):
        pass


@pytest.mark.slow
def test_a_really_interrupted_run_resumes_to_the_end(tmp_path, monkeypatch):
    from acamkd.engine.trainer import Trainer

    cfg = smoke(tmp_path, "student", "student", "train.iterations=3", "train.steps=[2]", "train.checkpoint_every=1")
    save = Trainer.save

    def killed_after_checkpoint_two(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.step == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Trainer, "save", killed_after_checkpoint_two)
    with pytest.raises(KeyboardInterrupt):
        run_all([Run("student", "train", cfg)])
    assert json.loads((tmp_path / "student" / MARKER).read_text())["status"] == "started"
    assert not (tmp_path / "student" / "final_metrics.json").exists()
    monkeypatch.setattr(Trainer, "save", save)
    [res] = run_all([Run("student", "train", cfg)])
    assert res.status == "resumed" and res.metrics["step"] == 3
    lines = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"] == [1, 2, 3]


def test_the_old_demo_marker_counts_as_finished(tmp_path, fake_engine):
    from acamkd.config import to_dict

    cfg = smoke(tmp_path)
    out = tmp_path / "student"
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps(to_dict(cfg)))
    (out / "final_metrics.json").write_text(json.dumps({"step": 2, "AP": 0.1}))
    [res] = run_all([Run("student", "train", cfg)])
    assert fake_engine == [] and res.status == "cached" and res.metrics == {"step": 2, "AP": 0.1}
    assert json.loads((out / MARKER).read_text())["status"] == "finished"


# ------------------------------------------------------------------------------ dependencies


def test_a_maskd_run_killed_in_stage1_starts_again_in_place_keeping_only_the_stage1_files(tmp_path, fake_engine):
    maskd = load_config(f"{DEMO}/shapes_det_maskd.yaml", [
        *SMOKE, f"data.root={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'maskd'}",
        f"teacher.checkpoint={tmp_path / 'teacher' / 'last.pt'}"])
    runs = [Run("teacher", "train", smoke(tmp_path, "teacher", "teacher")),
            Run("maskd", "distill", maskd, needs=["teacher"])]
    run_all(runs)
    folder = tmp_path / "maskd"
    marker = json.loads((folder / MARKER).read_text())
    for stage1_file in ("maskd_tokens.safetensors.partial.pt", "maskd_tokens.safetensors"):
        # killed in stage 1 (its checkpoint) or after it (its tokens), before stage 2's first checkpoint
        (folder / MARKER).write_text(json.dumps({**marker, "status": "started"}))
        for name in ("last.pt", "final_metrics.json"):
            (folder / name).unlink()
        (folder / "metrics.jsonl").write_text('{"step": 1}\n')  # stage 2 logged before the kill
        (folder / stage1_file).write_bytes(b"kept")
        fake_engine.clear()
        [_, res] = run_all(runs)
        assert fake_engine == [("distill", "maskd", False, {"eval_teacher": False})]
        assert res.status == "ran" and (folder / stage1_file).read_bytes() == b"kept"
        assert not (folder / "metrics.jsonl").exists()  # stage 2's log removed before starting again
        assert not list(tmp_path.glob("maskd.stale-*"))  # not moved aside: stage 1 resumes in place
        (folder / stage1_file).unlink()


def test_the_runners_file_names_are_the_engines():
    """experiments names the engine's files without importing it (torch): the names must agree."""
    from acamkd import experiments
    from acamkd.engine.checkpoint import LAST_NAME, PREV_NAME
    from acamkd.engine.maskd_tokens import TOKEN_FILE_NAME, partial_path

    assert (experiments._LAST, experiments._PREV) == (LAST_NAME, PREV_NAME)
    assert experiments._STAGE1_FILES == (TOKEN_FILE_NAME, partial_path(TOKEN_FILE_NAME))


def test_a_stage1_file_in_another_methods_folder_does_not_keep_a_killed_run(tmp_path, fake_engine):
    runs = [Run("teacher", "train", smoke(tmp_path, "teacher", "teacher")),
            Run("acam", "distill", smoke(tmp_path, "acam", "acam"), needs=["teacher"])]
    run_all(runs)
    folder = tmp_path / "acam"
    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "status": "started"}))
    (folder / "last.pt").unlink()
    (folder / "maskd_tokens.safetensors").write_bytes(b"from `acamkd maskd-tokens` without --out")
    run_all(runs)
    assert (tmp_path / "acam.stale-1" / "maskd_tokens.safetensors").exists()  # moved aside, as any such run


def test_a_run_killed_between_a_checkpoints_two_renames_resumes_from_prev(tmp_path, fake_engine, caplog):
    cfg = smoke(tmp_path)
    run_all([Run("student", "train", cfg)])
    marker = json.loads((tmp_path / "student" / MARKER).read_text())
    (tmp_path / "student" / MARKER).write_text(json.dumps({**marker, "status": "started"}))
    (tmp_path / "student" / "final_metrics.json").unlink()
    os.replace(tmp_path / "student" / "last.pt", tmp_path / "student" / "prev.pt")  # only prev.pt is whole
    with caplog.at_level(logging.INFO, logger="acamkd"):
        [res] = run_all([Run("student", "train", cfg)])
    assert fake_engine[-1][:3] == ("train", "student", True) and res.status == "resumed"
    assert not list(tmp_path.glob("student.stale-*"))
    assert "run student (seed 0): resuming from prev.pt in" in caplog.text  # the file the engine reads


def test_a_diverged_run_is_recorded_and_the_run_set_goes_on(tmp_path, fake_engine, monkeypatch):
    from acamkd.engine.trainer import TrainingDiverged
    from acamkd.experiments import STATUS_DIVERGED

    fake_distill = engine.distill

    def distill(cfg, resume=False, eval_teacher=None, **kw):
        if cfg.train.seed == 1:  # this seed blows up
            raise TrainingDiverged("non-finite values in ['student_feats'] at step 14 (epoch 0): ...")
        return fake_distill(cfg, resume, eval_teacher=eval_teacher, **kw)

    monkeypatch.setattr(engine, "distill", distill)
    teacher = smoke(tmp_path, "teacher", "teacher")
    runs = [Run("teacher", "train", teacher)]
    for seed in (0, 1, 2):
        cfg = smoke(tmp_path, "acam", f"acam{seed}", f"train.seed={seed}")
        runs.append(Run("acam", "distill", cfg, seed=seed, needs=["teacher"]))
    runs.append(Run("student", "train", smoke(tmp_path)))  # after the diverged run: still runs
    results = run_all(runs)
    assert [r.status for r in results] == ["ran", "ran", STATUS_DIVERGED, "ran", "ran"]
    assert "step 14" in results[2].metrics["diverged"]
    marker = json.loads((tmp_path / "acam1" / MARKER).read_text())
    assert marker["status"] == "diverged" and "step 14" in marker["error"]
    stats = aggregate(by_name(results))
    assert stats["acam"]["n"] == 2 and stats["acam"]["diverged"] == [1]
    table = markdown_table(stats, ["AP"])
    assert "| acam (n=2; diverged: seed 1) | 25.0 ± 0.0 |" in table
    # the next call reads it back as diverged: the engine is not called again for it
    fake_engine.clear()
    again = run_all(runs)
    assert fake_engine == [] and again[2].status == STATUS_DIVERGED and again[0].status == "cached"
    finished, missing = read_finished(runs)
    assert len(finished) == 5 and not missing


def test_runs_that_need_a_diverged_run_are_not_run(tmp_path, fake_engine, monkeypatch):
    from acamkd.engine.trainer import TrainingDiverged

    def train(cfg, resume=False):
        raise TrainingDiverged("non-finite loss at step 3")

    monkeypatch.setattr(engine, "train", train)
    runs = [Run("teacher", "train", smoke(tmp_path, "teacher", "teacher")),
            Run("acam", "distill", smoke(tmp_path, "acam", "acam"), needs=["teacher"])]
    teacher, acam = run_all(runs)
    assert teacher.status == acam.status == "diverged" and fake_engine == []
    assert "needs teacher (seed 0), which diverged" in acam.metrics["diverged"]
    assert "| acam (n=0; diverged: seed 0) | - |" in markdown_table(aggregate(by_name([acam])), ["AP"])


def test_non_finite_method_inputs_in_a_training_step_are_a_divergence():
    from types import SimpleNamespace

    from acamkd.engine.trainer import Trainer, TrainingDiverged
    from acamkd.methods.base import NonFiniteValues

    def step(batches, accumulate=1):
        raise NonFiniteValues(["student_feats['p3']"])

    trainer = Trainer.__new__(Trainer)  # only what _train_step reads
    trainer.step_fn, trainer.step, trainer.epoch = step, 7, 0
    trainer.cfg = SimpleNamespace(train=SimpleNamespace(accumulate=1))
    with pytest.raises(TrainingDiverged, match=r"non-finite values in \[\"student_feats\['p3'\]\"\] at step 7"):
        trainer._train_step([])


def test_distillation_runs_after_its_teacher_and_follows_it(tmp_path, fake_engine):
    runs = [Run("acam", "distill", smoke(tmp_path, "acam", "acam"), needs=["teacher"]),
            Run("student", "train", smoke(tmp_path)),
            Run("teacher", "train", smoke(tmp_path, "teacher", "teacher"))]
    results = run_all(runs)
    assert [c[:2] for c in fake_engine] == [("train", "teacher"), ("distill", "acam"), ("train", "student")]
    assert fake_engine[1][3] == {"eval_teacher": False}
    assert [r.run.name for r in results] == ["acam", "student", "teacher"]  # input order
    assert results[0].key == run_key(runs[0], {runs[2].id: results[2].key})
    # the teacher's config changes: the teacher and the ACAM run (same config, new teacher) run again
    fake_engine.clear()
    runs[2] = Run("teacher", "train", smoke(tmp_path, "teacher", "teacher", "train.lr=0.001"))
    run_all(runs)
    assert [c[:2] for c in fake_engine] == [("train", "teacher"), ("distill", "acam")]
    assert (tmp_path / "acam.stale-1").is_dir() and (tmp_path / "teacher.stale-1").is_dir()


def test_a_need_resolves_to_the_same_seed_or_to_the_only_run(tmp_path, fake_engine):
    runs = [Run("teacher", "train", smoke(tmp_path, "teacher", "teacher"))]
    runs += [Run("acam", "distill", smoke(tmp_path, "acam", f"acam{s}", f"train.seed={s}"), needs=["teacher"])
             for s in (1, 2)]
    results = run_all(runs)
    assert [r.run.seed for r in results] == [0, 1, 2] and fake_engine[0][:2] == ("train", "teacher")


def test_bad_run_sets_are_refused_before_anything_runs(tmp_path, fake_engine):
    s, t = smoke(tmp_path), smoke(tmp_path, "teacher", "teacher")
    with pytest.raises(ValueError, match="not among the runs"):
        run_all([Run("s", "train", s, needs=["nobody"])])
    with pytest.raises(ValueError, match="cycle"):
        run_all([Run("s", "train", s, needs=["t"]), Run("t", "train", t, needs=["s"])])
    with pytest.raises(ValueError, match="share train.output_dir"):
        run_all([Run("s", "train", s), Run("t", "train", smoke(tmp_path, "teacher", "student"))])
    with pytest.raises(ValueError, match="same name and seed|with seed 0"):
        run_all([Run("s", "train", s), Run("s", "train", t)])
    with pytest.raises(ValueError, match="kind"):
        Run("s", "eval", s)
    assert fake_engine == []


# ------------------------------------------------------------------------------------ tables


def test_seeds_of_a_row_aggregate_to_mean_and_sample_std():
    per_seed = {
        "acam": {0: {"AP": 0.30, "APs": -1.0, "sec_per_step": 1.0}, 1: {"AP": 0.32, "APs": -1.0, "sec_per_step": 2.0},
                 2: {"AP": 0.34, "APs": -1.0, "sec_per_step": 4.0}},
        "student": {5: {"AP": 0.2, "sec_per_step": 1.5}, 3: {"AP": 0.1, "sec_per_step": 0.5}},
        "teacher": {0: {"AP": 0.4, "APs": 0.05, "sec_per_step": 3.0, "note": "text", "flag": True}},
    }
    stats = aggregate(per_seed)
    # AP 0.30/0.32/0.34: mean 0.32, deviations -0.02/0/0.02, sum of squares 0.0008 / (3 - 1) -> std 0.02
    assert stats["acam"]["mean"]["AP"] == pytest.approx(0.32) and stats["acam"]["std"]["AP"] == pytest.approx(0.02)
    # s/step 1/2/4: mean 7/3, squares (16 + 1 + 25) / 9 / 2 = 7/3 -> std sqrt(7/3)
    assert stats["acam"]["mean"]["sec_per_step"] == pytest.approx(7 / 3)
    assert stats["acam"]["std"]["sec_per_step"] == pytest.approx(math.sqrt(7 / 3))
    # two seeds 0.1/0.2: mean 0.15, std sqrt(2 * 0.05^2 / 1) = 0.0707...
    assert stats["student"]["seeds"] == [3, 5] and stats["student"]["n"] == 2
    assert stats["student"]["std"]["AP"] == pytest.approx(0.05 * math.sqrt(2))
    assert stats["teacher"]["std"]["AP"] is None and set(stats["teacher"]["mean"]) == {"AP", "APs", "sec_per_step"}
    assert markdown_table(stats, ("AP", "APs")).splitlines() == [
        "| model | AP | APs | train s/step |",
        "|---|---|---|---|",
        "| acam (n=3) | 32.0 ± 2.0 | - | 2.33 ± 1.53 |",
        "| student (n=2) | 15.0 ± 7.1 | - | 1.00 ± 0.71 |",
        "| teacher | 40.0 | 5.0 | 3.00 |",
    ]


def test_one_seed_table_is_the_demo_table():
    rows = {"teacher (retinanet resnet50)": {"AP": 0.088, "AP50": 0.2, "APs": -1.0, "APm": 0.1, "APl": 0.0,
                                             "sec_per_step": 2.346},
            "student + ACAM-KD": {"AP": 0.067}}
    assert format_table(rows).splitlines() == [
        "| model | AP | AP50 | APs | APm | APl | train s/step |",
        "|---|---|---|---|---|---|---|",
        "| teacher (retinanet resnet50) | 8.8 | 20.0 | - | 10.0 | 0.0 | 2.35 |",
        "| student + ACAM-KD | 6.7 | - | - | - | - | - |",
    ]


def test_results_are_written_as_markdown_and_json(tmp_path, fake_engine):
    runs = [Run("student", "train", smoke(tmp_path, "student", f"s{s}", f"train.seed={s}")) for s in (0, 1)]
    results = run_all(runs)
    md, js = write_results(tmp_path / "out" / "results", results, ("AP", "APs"), header="two seeds")
    assert md.read_text() == ("two seeds\n\n| model | AP | APs | train s/step |\n|---|---|---|---|\n"
                              "| student (n=2) | 25.0 ± 0.0 | - | 0.50 ± 0.00 |\n")
    data = json.loads(js.read_text())
    assert data["columns"] == ["AP", "APs"]
    row = data["rows"]["student"]
    assert row["n"] == 2 and row["seeds"] == [0, 1] and row["mean"]["AP"] == 0.25 and row["std"]["AP"] == 0.0
    assert set(row["runs"]) == {"0", "1"} and row["runs"]["1"]["metrics"]["AP"] == 0.25
    assert row["runs"]["0"]["status"] == "ran" and row["runs"]["0"]["output_dir"] == str(tmp_path / "s0")
