"""Which task a method applies to, and the per-task defaults of its options, decided when a config
is loaded: FGD (masks from ground-truth boxes) is refused on segmentation by name, before anything
trains; CWD's weight is MMRazor's 5 on segmentation logits and 10 on detection FPN outputs."""
from __future__ import annotations

from pathlib import Path

import pytest

from acamkd import methods
from acamkd.compare import plan
from acamkd.config import ConfigError, load_config
from acamkd.methods.registry import register

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
SEG = str(CONFIGS / "shapes_seg_acam.yaml")
DET = str(CONFIGS / "shapes_det_acam.yaml")


def test_registered_tasks():
    assert methods.method_tasks("fgd") == ("detection",)
    for name in ("acam", "mimic", "cwd"):
        assert methods.method_tasks(name) == ("detection", "segmentation")
    with pytest.raises(KeyError, match="unknown distillation method 'fdg'.*fgd"):
        methods.method_tasks("fdg")


@pytest.mark.parametrize("tasks", [(), ("classification",)])
def test_register_refuses_unknown_tasks(tasks):
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        register("never_registered", tasks=tasks)
    assert "never_registered" not in methods.available()


def test_fgd_on_segmentation_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(SEG, ["method.name=fgd", "method.options={}", f"data.root={tmp_path}"])
    text = str(err.value)
    assert "method.name" in text and "'fgd' applies to detection only" in text
    assert "student.task is 'segmentation'" in text
    fit = text.split("methods for segmentation: ")[1].split(" (")[0].split("\n")[0].split(", ")
    assert fit == [m for m in methods.available() if m != "fgd"] and "cwd" in fit  # what to use instead


def test_fgd_on_detection_loads(tmp_path):
    cfg = load_config(DET, ["method.name=fgd", "method.options={}", f"data.root={tmp_path}"])
    assert cfg.method.name == "fgd"


def test_compare_refuses_fgd_on_segmentation_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="'fgd' applies to detection only"):
        plan(SEG, "plain,fgd", out=out, overrides=[f"data.root={tmp_path / 'data'}"])
    assert not out.exists()  # nothing planned, nothing written


@pytest.mark.parametrize("config, expected", [(SEG, 5.0), (DET, 10.0)])
def test_cwd_weight_default_follows_the_task(tmp_path, config, expected):
    cfg = load_config(config, ["method.name=cwd", "method.options={}", f"data.root={tmp_path}"])
    assert cfg.method.options["weight"] == expected
    assert cfg.method.options["tau"] == 1.0


def test_cwd_weight_given_is_kept_on_segmentation(tmp_path):
    cfg = load_config(SEG, ["method.name=cwd", "method.options={weight: 2.5}", f"data.root={tmp_path}"])
    assert cfg.method.options["weight"] == 2.5


def test_python_build_keeps_the_field_default():
    # Outside a config there is no task: the options dataclass keeps its (detection) default.
    assert methods.CWDOptions().weight == 10.0
