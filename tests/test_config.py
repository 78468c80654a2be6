"""Typed config: YAML files with ``_base_``, dotted overrides, type checks, cross-field rules."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from acamkd.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_override,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUNNABLE = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
BASES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name.startswith("_"))
MINIMAL = """\
student:
  arch: retinanet
  backbone: resnet18
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def minimal(overrides: list[str] = ()) -> Config:
    return load_config(None, ["student.arch=retinanet", "student.backbone=resnet18", *overrides])


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


# ------------------------------------------------------------------------------ shipped files
def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in RUNNABLE}
    for expected in ("det/retinanet_r101_r50_acam.yaml", "det/retinanet_x101_r50_acam.yaml",
                     "det/fasterrcnn_r101_r50_acam.yaml", "det/fasterrcnn_x101_r50_acam.yaml",
                     "det/fcos_r101_r50_acam.yaml", "det/retinanet_r50_coco.yaml",
                     "demo/shapes_det_teacher.yaml", "demo/shapes_det_student.yaml", "demo/shapes_det_acam.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config) and validate(cfg) is cfg
    assert cfg.train.output_dir != "runs/default", "each shipped config names its own output_dir"
    out = tmp_path / "resolved.yaml"
    dump_yaml(cfg, out)
    assert "_base_" not in out.read_text()
    assert load_config(str(out)) == cfg


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_base_files_are_partial(path):
    """Bases hold settings only; loading one alone asks for the model."""
    assert "missing required key 'student'" in error_of(load_config, str(path))


@pytest.mark.parametrize("arch,lr", [("retinanet", 0.01), ("fasterrcnn", 0.02)])
@pytest.mark.parametrize("teacher", ["r101", "x101"])
def test_paper_coco_settings(arch, lr, teacher):
    cfg = load_config(str(CONFIGS / f"det/{arch}_{teacher}_r50_acam.yaml"))
    t, d = cfg.train, cfg.data
    assert (d.dataset, d.min_size, d.max_size, d.batch_size) == ("coco", 800, 1333, 2)
    assert (t.optimizer, t.momentum, t.weight_decay, t.lr) == ("sgd", 0.9, 1e-4, lr)
    assert (t.epochs, t.schedule, t.steps, t.gamma) == (24, "step", [16, 22], 0.1)
    assert (t.grad_clip, t.warmup_iters, t.warmup_ratio) == (35.0, 500, 0.001)
    assert t.inherit_teacher and t.eval_teacher_first
    assert cfg.method.name == "acam"
    given = {"num_masks": 6, "alpha": 1.0, "lam": 1.0, "query": "teacher", "channel_mask": "paper",
             "mask_norm": "mass", "masks": "both"}
    from dataclasses import asdict

    from acamkd.methods import ACAMOptions

    assert cfg.method.options == {**asdict(ACAMOptions()), **given}  # as given, the rest the method's defaults
    assert cfg.student.backbone == "resnet50" and cfg.student.arch == cfg.teacher.arch == arch
    assert cfg.teacher.backbone == {"r101": "resnet101", "x101": "resnext101_64x4d"}[teacher]
    assert cfg.teacher.checkpoint is None  # given on the command line; `distill` refuses without it


def test_lr_says_where_it_comes_from():
    """Every detection config's lr says whether it was inferred (the paper gives none) or which
    published config it was read from."""
    for path in CONFIGS.glob("det/*.yaml"):
        text = path.read_text()
        if "\n  lr:" in text and "_base_coco.yaml" not in path.name:
            line = text.split("\n  lr:")[1].splitlines()[0]
            comment = line.partition("#")[2]
            assert "inferred" in comment or "config" in comment, (path, line)


def test_demo_configs_fit_together():
    teacher = load_config(str(CONFIGS / "demo/shapes_det_teacher.yaml"))
    student = load_config(str(CONFIGS / "demo/shapes_det_student.yaml"))
    acam = load_config(str(CONFIGS / "demo/shapes_det_acam.yaml"))
    assert {c.data.dataset for c in (teacher, student, acam)} == {"shapes"}
    assert acam.teacher == teacher.student  # the teacher run's checkpoint loads into the distillation's teacher
    assert acam.student == student.student and acam.train.epochs == student.train.epochs
    assert (teacher.student.backbone, student.student.backbone) == ("resnet50", "resnet18")
    assert acam.method.name == "acam" and acam.method.options["num_masks"] == 6
    assert len({c.train.output_dir for c in (teacher, student, acam)}) == 3
    assert acam.data.shapes.size == [256, 320] and acam.data.min_size == 256 and acam.data.max_size == 320


# ---------------------------------------------------------------------------------- overrides
def test_overrides_of_every_kind():
    cfg = load_config(str(CONFIGS / "det/retinanet_r101_r50_acam.yaml"), [
        "train.epochs=2",  # int
        "train.steps=[1]",  # list[int]
        "train.lr=1e-4",  # float written the way PyYAML reads as a string
        "train.grad_clip=10",  # int accepted where a float is expected
        "train.amp=bf16",  # Literal
        "train.inherit_teacher=false",  # bool
        "student.pretrained=null",  # Optional -> None
        "student.taps=[fpn.0, fpn.1]",  # list[str]
        "data.root=/data/coco",  # str
        "data.crop=[512, 1024]",
        "method.options.num_masks=19",  # inside the method's typed options
        "method.options.query=student",  # a Literal option of the method
        "eval.batch_size=8",  # Optional[int] with a value
    ])
    t = cfg.train
    assert (t.epochs, t.steps, t.amp, t.inherit_teacher) == (2, [1], "bf16", False)
    assert t.lr == 1e-4 and type(t.lr) is float
    assert t.grad_clip == 10.0 and type(t.grad_clip) is float
    assert cfg.student.pretrained is None and cfg.student.taps == ["fpn.0", "fpn.1"]
    assert cfg.data.root == "/data/coco" and cfg.data.crop == [512, 1024]
    assert cfg.method.options["num_masks"] == 19 and cfg.method.options["alpha"] == 1.0
    assert cfg.method.options["query"] == "student"  # (unknown option keys are errors: test_method_options.py)
    assert cfg.eval.batch_size == 8


def test_override_replaces_a_whole_section_or_removes_it():
    cfg = load_config(str(CONFIGS / "demo/shapes_det_acam.yaml"),
                      ["teacher=null", "method.name=null", "train.inherit_teacher=false"])
    assert cfg.teacher is None and cfg.method.name is None
    cfg = load_config(str(CONFIGS / "demo/shapes_det_acam.yaml"), ["method.options={num_masks: 3}"])
    assert cfg.method.options["num_masks"] == 3 and cfg.method.options["alpha"] == 1.0  # the rest: defaults
    assert cfg.method.options["channel_mask"] == "paper"
    cfg = minimal(["train.epochs=null", "train.iterations=300", "train.steps=[200, 250]"])
    assert (cfg.train.epochs, cfg.train.iterations) == (None, 300)


def test_apply_overrides_returns_a_new_config():
    cfg = minimal()
    new = apply_overrides(cfg, ["train.epochs=20", "method.options.num_masks=4"])
    assert new.train.epochs == 20 and new.method.options == {"num_masks": 4}
    assert cfg.train.epochs == 12 and cfg.method.options == {}
    assert apply_overrides(cfg, "train.seed=5").train.seed == 5  # one string is one override
    assert "train.epoch" in error_of(apply_overrides, cfg, ["train.epoch=3"])


def test_parse_override():
    assert parse_override("train.steps=[16,22]") == ("train.steps", [16, 22])
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")  # splits at the first '='
    assert parse_override("student.pretrained=") == ("student.pretrained", None)
    assert parse_override("data.root='5'") == ("data.root", "5")
    for bad in ("train.epochs", "=3", "train..epochs=3", "train.epochs =[1", "train.steps=[1,2"):
        assert "override" in error_of(parse_override, bad)


def test_unknown_keys_suggest_close_names():
    msg = error_of(minimal, ["train.epoch=2"])
    assert "unknown key 'train.epoch'" in msg and "'train.epochs'" in msg and "train.epoch=2" in msg
    msg = error_of(minimal, ["train.batch_size=2"])  # same name in another section
    assert "'train.batch_size'" in msg and "'data.batch_size'" in msg
    msg = error_of(minimal, ["trian.epochs=2"])
    assert "unknown key 'trian'" in msg and "'train'" in msg and "trian.epochs=2" in msg
    msg = error_of(minimal, ["data.shapes.sise=[64,64]"])
    assert "'data.shapes.sise'" in msg and "'data.shapes.size'" in msg
    msg = error_of(minimal, ["train.zzzzqqq=1"])  # nothing close: list what is there
    assert "train has: epochs, iterations" in msg


def test_unknown_key_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL + "train:\n  epochs: 2\n  warmup_iter: 10\n")
    msg = error_of(load_config, str(path))
    assert "'train.warmup_iter'" in msg and f"{path}:6" in msg and "'train.warmup_iters'" in msg


def test_free_form_options_accept_any_key_but_only_plain_data():
    cfg = config_from_dict({"student": {"arch": "fcos", "backbone": "resnet34"},
                            "method": {"name": None, "options": {"anything": (1, 2), "nested": {"k": None}}}})
    assert cfg.method.options == {"anything": [1, 2], "nested": {"k": None}}  # tuples become lists
    msg = error_of(config_from_dict, {"student": {"arch": "fcos", "backbone": "resnet34"},
                                      "method": {"options": {"f": object()}}})
    assert "method.options.f" in msg and "free-form" in msg
    assert "keys must be strings" in error_of(config_from_dict, {"student": {"arch": "fcos", "backbone": "resnet34"},
                                                                 "method": {"options": {1: 2}}})


# ------------------------------------------------------------------------------- type checks
@pytest.mark.parametrize("override,key,expected", [
    ("train.epochs=2.5", "train.epochs", "int or null"),
    ("train.epochs=true", "train.epochs", "int or null"),  # bools are not ints
    ("train.lr=fast", "train.lr", "float"),
    ("train.lr=true", "train.lr", "float"),
    ("train.lr=.nan", "train.lr", "float"),
    ("train.grad_clip=.inf", "train.grad_clip", "float or null"),
    ("train.amp=1", "train.amp", "one of 'none', 'bf16', 'fp16'"),
    ("train.inherit_teacher=1", "train.inherit_teacher", "bool"),
    ("train.steps=16", "train.steps", "list of int"),
    ("train.steps=[16, x]", "train.steps[1]", "int"),
    ("data.root=5", "data.root", "str"),
    ("data.root=[a]", "data.root", "str"),
    ("student.taps=fpn", "student.taps", "list of str or null"),
    ("method.options=[1]", "method.options", "mapping"),
    ("data.shapes=3", "data.shapes", "a mapping (ShapesConfig)"),
    ("teacher=resnet50", "teacher", "a mapping (ModelConfig) or null"),
])
def test_wrong_types_name_key_expected_type_and_value(override, key, expected):
    msg = error_of(minimal, [override])
    value = override.partition("=")[2]
    assert msg.startswith(f"{key}: expected {expected}, got "), msg
    assert f"from override {override!r}" in msg
    assert repr(yaml.safe_load(value)).split(",")[0].strip("[") in msg


def test_string_field_hint_and_quoted_string():
    assert "quote it" in error_of(minimal, ["data.root=2017"])
    assert minimal(["data.root='2017'"]).data.root == "2017"


def test_literal_choices_and_suggestion(tmp_path):
    msg = error_of(minimal, ["train.amp=BF16"])
    assert "one of 'none', 'bf16', 'fp16'" in msg and "'BF16'" in msg and "did you mean 'bf16'" in msg
    msg = error_of(minimal, ["student.backbone=resnet51"])
    assert "student.backbone" in msg and "'resnet50'" in msg
    path = write(tmp_path, "x.yaml", MINIMAL + "data:\n  on_bad_image: ignore\n")
    msg = error_of(load_config, str(path))
    assert "data.on_bad_image: expected one of 'error', 'skip', got str 'ignore'" in msg and f"{path}:5" in msg


def test_float_strings_from_yaml_files(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL + "train:\n  lr: 1e-3\n  weight_decay: 5.0e-4\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4


def test_missing_required_keys(tmp_path):
    msg = error_of(load_config, str(write(tmp_path, "x.yaml", "student:\n  arch: retinanet\n")))
    assert "missing required key 'student.backbone'" in msg and "x.yaml:1" in msg
    assert "missing required key 'student'" in error_of(load_config, None)
    assert "missing required key 'teacher.arch'" in error_of(minimal, ["teacher.backbone=resnet50"])


def test_config_from_dict_accepts_and_rechecks_sections():
    cfg = config_from_dict({"student": ModelConfig(arch="fcos", backbone="resnet50")})
    assert cfg.student.arch == "fcos" and cfg.data.dataset == "shapes"
    assert "student.arch" in error_of(config_from_dict, {"student": ModelConfig(arch="bad", backbone="resnet50")})
    assert "the config: expected" in error_of(config_from_dict, [1, 2])


# ------------------------------------------------------------------------------------ _base_
def test_base_deep_merge_list_replace_relative_paths(tmp_path):
    write(tmp_path, "common/base.yaml", """\
        student: {arch: retinanet, backbone: resnet50, taps: [a, b, c]}
        train: {epochs: 24, steps: [16, 22], lr: 0.02}
        method: {name: null, options: {num_masks: 6, alpha: 1.0}}
        """)
    child = write(tmp_path, "exp/child.yaml", """\
        _base_: ../common/base.yaml
        student: {backbone: resnet18, taps: [z]}
        train: {steps: [8]}
        method: {options: {alpha: 2.0}}
        """)
    cfg = load_config(str(child))
    assert (cfg.student.arch, cfg.student.backbone, cfg.student.taps) == ("retinanet", "resnet18", ["z"])
    assert (cfg.train.epochs, cfg.train.steps, cfg.train.lr) == (24, [8], 0.02)
    assert cfg.method.options == {"num_masks": 6, "alpha": 2.0}


def test_base_list_order_chain_and_replace(tmp_path):
    write(tmp_path, "a.yaml", "student: {arch: fcos, backbone: resnet50}\ntrain: {lr: 0.1, seed: 1}\n")
    write(tmp_path, "b.yaml", "train: {lr: 0.2}\nmethod: {options: {x: 1, y: 2}}\n")
    write(tmp_path, "mid.yaml", "_base_: [a.yaml, b.yaml]\ntrain: {seed: 3}\n")
    leaf = write(tmp_path, "leaf.yaml", "_base_: mid.yaml\nmethod: {options: {_replace_: true, z: 3}}\n")
    cfg = load_config(str(leaf))
    assert (cfg.train.lr, cfg.train.seed) == (0.2, 3)  # later base wins; the child wins over both
    assert cfg.method.options == {"z": 3}  # replaced, not merged
    assert load_config(str(tmp_path / "mid.yaml")).method.options == {"x": 1, "y": 2}


def test_base_errors(tmp_path):
    msg = error_of(load_config, str(write(tmp_path, "x.yaml", MINIMAL + "_base_: nope.yaml\n")))
    assert "'nope.yaml' not found" in msg and "x.yaml:4" in msg
    write(tmp_path, "c1.yaml", "_base_: c2.yaml\n")
    write(tmp_path, "c2.yaml", "_base_: c1.yaml\n")
    assert "cycle" in error_of(load_config, str(tmp_path / "c1.yaml"))
    assert "_base_ must be" in error_of(load_config, str(write(tmp_path, "y.yaml", "_base_: {a: 1}\n")))


def test_errors_point_at_the_base_file_that_set_the_value(tmp_path):
    write(tmp_path, "base.yaml", MINIMAL + "train:\n  lr: slow\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\ntrain:\n  seed: 1\n")
    msg = error_of(load_config, str(child))
    assert "train.lr: expected float" in msg and f"{tmp_path / 'base.yaml'}:5" in msg


def test_an_override_of_a_section_owns_the_keys_below_it(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL + "train:\n  lr: 0.1\n")
    msg = error_of(load_config, str(path), ["train={lr: slow}"])
    assert "train.lr: expected float" in msg and "from override 'train={lr: slow}'" in msg and "x.yaml" not in msg


# ----------------------------------------------------------------------------- file problems
def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "student:\n  arch: retinanet\n   backbone: resnet18\ntrain: {\n")
    msg = error_of(load_config, str(path))
    assert f"{path}:3:" in msg and "malformed YAML" in msg
    path = write(tmp_path, "dup.yaml", MINIMAL + "train:\n  lr: 0.1\n  lr: 0.2\n")
    assert f"{path}:6: duplicate key 'train.lr'" in error_of(load_config, str(path))
    path = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    assert f"{path}: the top level must be a mapping" in error_of(load_config, str(path))
    assert "cannot read config file" in error_of(load_config, str(tmp_path / "absent.yaml"))


def test_empty_file_and_yaml_merge_keys(tmp_path):
    assert "missing required key 'student'" in error_of(load_config, str(write(tmp_path, "e.yaml", "")))
    path = write(tmp_path, "m.yaml", """\
        student: &s {arch: retinanet, backbone: resnet50}
        teacher:
          <<: *s
          backbone: resnet101
        """)
    cfg = load_config(str(path))
    assert (cfg.teacher.arch, cfg.teacher.backbone, cfg.student.backbone) == ("retinanet", "resnet101", "resnet50")


# -------------------------------------------------------------------------------- round trip
def test_round_trip_to_dict_and_yaml(tmp_path):
    cfg = load_config(str(CONFIGS / "demo/shapes_det_acam.yaml"),
                      ["train.epochs=null", "train.iterations=40", "train.steps=[30]", "eval.window=[64,64]"])
    d = to_dict(cfg)
    assert d["teacher"]["backbone"] == "resnet50" and d["train"]["iterations"] == 40
    assert config_from_dict(d) == cfg
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg
    assert set(yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]) == {
        f.name for f in dataclasses.fields(type(cfg.train))}  # every key written


@settings(max_examples=40, deadline=None)
@given(epochs=st.integers(2, 500), lr=st.floats(1e-8, 10, allow_nan=False), clip=st.none() | st.floats(0.01, 1e3),
       amp=st.sampled_from(["none", "bf16", "fp16"]), flip=st.booleans(),
       root=st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=12),
       options=st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5),
                               st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
                               | st.lists(st.integers(), max_size=3), max_size=4))
def test_round_trip_property(tmp_path_factory, epochs, lr, clip, amp, flip, root, options):
    cfg = config_from_dict({
        "student": {"arch": "fcos", "backbone": "resnet18"},
        "data": {"root": root, "flip_prob": float(flip)},
        "method": {"options": options},
        "train": {"epochs": epochs, "steps": [1], "lr": lr, "grad_clip": clip, "amp": amp},
    })
    path = tmp_path_factory.mktemp("rt") / "c.yaml"
    dump_yaml(cfg, path)
    assert load_config(str(path)) == cfg
    # the same values given as command-line overrides give the same config
    def flow(value) -> str:  # one-line YAML, as a user would type it
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

    again = apply_overrides(minimal(), [
        "student.arch=fcos", f"data.root={flow(root)}", f"data.flip_prob={float(flip)}", f"train.epochs={epochs}",
        "train.steps=[1]", f"train.lr={lr!r}", f"train.grad_clip={flow(clip)}", f"train.amp={amp}",
        f"method.options={flow(options)}"])
    assert again == cfg


# ------------------------------------------------------------------------ cross-field rules
@pytest.mark.parametrize("overrides,key,words", [
    (["train.iterations=100"], "train.epochs", "exactly one"),
    (["train.epochs=null"], "train.epochs", "neither"),
    (["method.name=acam"], "teacher", "no teacher"),
    (["teacher.task=segmentation", "teacher.arch=deeplabv3", "teacher.backbone=resnet101"], "teacher.task",
     "differs from student.task"),
    (["student.arch=pspnet"], "student.arch", "not a detection architecture"),
    (["train.accumulate=0"], "train.accumulate", ">= 1"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.steps=[11, 8]"], "train.steps", "increasing"),
    (["train.steps=[8, 12]"], "train.steps", "1..12-1"),
    (["train.inherit_teacher=true"], "train.inherit_teacher", "no teacher"),
    (["data.dataset=cityscapes"], "data.dataset", "no detection labels"),
    (["data.ann_file=/x/instances.json"], "data.ann_file", "{split}"),
    (["data.crop=[512]"], "data.crop", "[height, width]"),
    (["data.shapes.size=[32, 320]"], "data.shapes.size", ">= 64"),
    (["data.min_size=800", "data.max_size=600"], "data.max_size", "below data.min_size"),
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["eval.sliding_window=true"], "eval.window", "eval.stride"),
    (["eval.sliding_window=true", "eval.window=[64,64]", "eval.stride=[65,64]"], "eval.stride", "exceeds"),
    (["train.grad_clip=0"], "train.grad_clip", "> 0 or null"),
    (["train.momentum=1.5"], "train.momentum", "[0, 1)"),
    (["student.trainable_layers=6"], "student.trainable_layers", "0..5"),
    (["student.num_classes=0"], "student.num_classes", ">= 1"),
    (["student.taps=[]"], "student.taps", "empty"),
])
def test_cross_field_rules(overrides, key, words):
    msg = error_of(minimal, overrides)
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"{key}:")), None)
    assert line is not None, msg
    assert words in line, msg


def test_all_problems_reported_together_with_their_origin(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL + "train:\n  lr: -1.0\n  accumulate: 0\n")
    msg = error_of(load_config, str(path), ["method.name=acam"])
    assert msg.startswith(f"invalid config (in {path}):")
    assert f"train.lr: must be > 0, got -1.0 (at {path}:5)" in msg
    assert f"train.accumulate: must be >= 1, got 0 (at {path}:6)" in msg
    assert "teacher: method.name is 'acam'" in msg


def test_validate_on_a_hand_built_config():
    cfg = minimal()
    assert validate(cfg) is cfg
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=5))
    assert "train.epochs" in error_of(validate, bad)


def test_segmentation_and_distillation_configs_validate():
    cfg = minimal(["student.task=segmentation", "student.arch=deeplabv3", "student.backbone=mobilenet_v2",
                   "teacher={task: segmentation, arch: deeplabv3, backbone: resnet101}", "method.name=acam",
                   "data.crop=[128, 256]", "eval.sliding_window=true", "eval.window=[128,256]",
                   "eval.stride=[64,128]", "train.epochs=null", "train.iterations=100", "train.schedule=poly"])
    assert cfg.teacher.backbone == "resnet101" and cfg.train.schedule == "poly"


def test_every_shipped_config_names_models_the_builders_accept():
    """A config is only useful if its models build: check arch/backbone against the builders
    (the X101 configs once named a ResNeXt the detection builder did not list)."""
    from acamkd.models import list_backbones
    from acamkd.models.segmentation import SEGMENTER_ARCHS

    files = [p for p in sorted(CONFIGS.rglob("*.yaml")) if not p.name.startswith("_")]
    assert len(files) >= 20
    for path in files:
        cfg = load_config(str(path))
        for m in (cfg.student, cfg.teacher):
            if m is None:
                continue
            if m.task == "detection":
                assert m.backbone in list_backbones(m.arch), (path.name, m.arch, m.backbone)
            else:
                assert m.backbone in SEGMENTER_ARCHS[m.arch], (path.name, m.arch, m.backbone)


# ------------------------------------------------------------- segmentation batch of one (6d)
SEG = ["student.task=segmentation", "student.arch=deeplabv3", "student.backbone=mobilenet_v2",
       "data.dataset=cityscapes"]


@pytest.mark.parametrize("arch,backbone", [("deeplabv3", "mobilenet_v2"), ("pspnet", "resnet18")])
def test_segmentation_batch_of_one_named_with_what_to_do(arch, backbone):
    msg = error_of(minimal, [*SEG, f"student.arch={arch}", f"student.backbone={backbone}", "data.batch_size=1"])
    line = next(ln for ln in msg.splitlines() if ln.strip().startswith("data.batch_size:"))
    assert f"segmentation student ({arch}) trains BatchNorm on 1x1 pooled maps" in line
    assert "set data.batch_size=2 or more" in line and "per micro-batch" in line and "eval.batch_size=1" in line
    assert line.endswith("(from override 'data.batch_size=1')"), line


def test_segmentation_batch_of_one_points_at_the_file_line(tmp_path):
    path = write(tmp_path, "seg.yaml", """\
        student:
          task: segmentation
          arch: deeplabv3
          backbone: mobilenet_v2
        data:
          dataset: cityscapes
          batch_size: 1
        """)
    msg = error_of(load_config, str(path))
    assert "data.batch_size: is 1, but the segmentation student" in msg
    assert f"(at {path}:7)" in msg.splitlines()[1], msg


def test_segmentation_batch_of_one_rule_leaves_the_rest_alone():
    assert minimal([*SEG, "data.batch_size=2"]).data.batch_size == 2
    assert minimal([*SEG, "data.batch_size=2", "train.accumulate=4", "eval.batch_size=1"]).eval.batch_size == 1
    assert minimal(["data.batch_size=1"]).data.batch_size == 1  # detectors: no pooled BatchNorm
    msg = error_of(minimal, [*SEG, "data.batch_size=1", "train.accumulate=8"])  # accumulation does not help
    assert "data.batch_size: is 1" in msg
