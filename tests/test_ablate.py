"""``acamkd ablate``: the ablation rows and sweeps of ACAM-KD as compare run sets (engine faked, as
in tests/test_compare.py), the legend, the cache, and the refusals."""
from __future__ import annotations

import pytest

from acamkd import ablate, cli
from acamkd.methods import ACAMOptions
from tests.test_compare import ACAM, fake_engine, tiny  # noqa: F401  (fake_engine is a fixture)

ROW_NAMES = ["plain", "acam", "acam masks=spatial", "acam masks=channel", "acam query=student",
             "acam mask_source=uniform", "acam mask_source=teacher", "maskd token_iterations=5"]


def test_rows_run_once_per_seed_with_the_legend_and_are_cached(tmp_path, fake_engine):  # noqa: F811
    out = tmp_path / "abl"
    argv = ["ablate", ACAM, "--seeds", "2", "--out", str(out), "--with", "maskd:token_iterations=5", *tiny(tmp_path)]
    assert cli.main(argv) == 0
    runs = [folder for _, folder, _ in fake_engine]
    assert runs[0] == "teacher/seed0" and len(runs) == 1 + 2 * len(ROW_NAMES)
    assert "maskd-token_iterations-5/seed1" in runs and "acam-mask_source-uniform/seed0" in runs
    md = (out / "results.md").read_text()
    table = [line.split(" | ")[0].lstrip("| ") for line in md.split("What each row is")[0].splitlines()
             if line.startswith("| ") and "(n=2)" in line]
    assert table == [f"{name} (n=2)" for name in ROW_NAMES]  # every row, in the order of the rows
    legend = md.split("What each row is")[1]
    assert "| acam mask_source=uniform | uniform mask (ours)" in legend
    assert "| maskd token_iterations=5 | teacher offline fixed mask" in legend
    fake_engine.clear()
    assert cli.main(argv) == 0
    assert fake_engine == []  # every run finished before: read back, nothing trains


def test_sweeps_skip_the_configs_own_values():
    rows = [row for row, _ in ablate.ablation_rows("sweeps", vars(ACAMOptions()))]
    assert rows == ["acam", "acam:num_masks=3", "acam:num_masks=12", "acam:alpha=0.5", "acam:alpha=2.0",
                    "acam:lam=0.5", "acam:lam=2.0", "acam:channel_mask=elementwise", "acam:channel_mask=article",
                    "acam:mask_norm=energy"]
    options = {**vars(ACAMOptions()), "num_masks": 3, "mask_norm": "energy"}
    rows = [row for row, _ in ablate.ablation_rows("sweeps", options)]
    assert "acam:num_masks=6" in rows and "acam:num_masks=3" not in rows and "acam:mask_norm=mass" in rows


def test_sweeps_plan_every_row(tmp_path, fake_engine):  # noqa: F811
    out = tmp_path / "sw"
    assert cli.main(["ablate", ACAM, "--set", "sweeps", "--out", str(out), *tiny(tmp_path)]) == 0
    assert len(fake_engine) == 1 + 10
    assert "sweep of channel_mask: article" in (out / "results.md").read_text()


def test_a_config_of_another_method_is_refused(tmp_path, capsys):
    code = cli.main(["ablate", ACAM, "--out", str(tmp_path / "x"), "method.name=mimic", "method.options={}",
                     *tiny(tmp_path)])
    assert code != 0
    assert "the ablations are of ACAM-KD" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("item, message", [
    ("acam:num_masks=3", "CONFIG's own method takes its options as overrides"),
    ("maskd", "expected METHOD:key=value"),
    ("maskdd:token_iterations=5", "unknown"),
])
def test_bad_with_options_are_refused(tmp_path, capsys, item, message):
    code = cli.main(["ablate", ACAM, "--out", str(tmp_path / "x"), "--with", item, *tiny(tmp_path)])
    assert code != 0
    assert message in capsys.readouterr().err


def test_rows_skip_what_the_config_already_is_and_the_legend_says_so():
    options = {**vars(ACAMOptions()), "masks": "spatial", "query": "student"}
    rows = dict(ablate.ablation_rows("rows", options))
    assert "acam:masks=spatial" not in rows and "acam:query=student" not in rows
    assert "acam:masks=channel" in rows and rows["acam"].endswith("masks=spatial, query=student")


def test_with_options_keep_their_quoting():
    rows = dict(ablate.ablation_rows("rows", vars(ACAMOptions()), {"maskd": ["train.steps=[2, 3]"]}))
    assert "maskd:'train.steps=[2, 3]'" in rows


def test_a_config_with_another_mask_source_is_refused(tmp_path, capsys):
    code = cli.main(["ablate", ACAM, "--out", str(tmp_path / "x"), "method.options.mask_source=teacher",
                     *tiny(tmp_path)])
    assert code != 0 and "mask_source='teacher'" in capsys.readouterr().err
