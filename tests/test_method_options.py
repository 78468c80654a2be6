"""Typed method options: the registry's options dataclasses, ``parse_options``, ``build(options=...)``,
and ``method.options`` checked at config load time with named keys and origins."""
from __future__ import annotations

import dataclasses

import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from acamkd import cli
from acamkd.config import ConfigError, config_from_dict, dump_yaml, load_config, to_dict
from acamkd.methods import (
    ACAM,
    ACAMLevel,
    ACAMOptions,
    MethodOptions,
    OptionError,
    build,
    get_method_class,
    list_methods,
    options_class,
    parse_options,
)
from acamkd.methods.acam import DEFAULT_MODE, PAPER_MODE

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes_det_acam.yaml")
TEACHER, STUDENT = {"p3": 8, "p4": 6}, {"p3": 4, "p4": 6}


def error_of(*overrides: str, path: str = DEMO) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def child_config(tmp_path: Path, method_yaml: str) -> Path:
    """A config on top of the demo ACAM config whose ``method:`` section starts at line 2."""
    path = tmp_path / "child.yaml"
    path.write_text(f"_base_: {DEMO}\n" + textwrap.dedent(method_yaml))
    return path


# ------------------------------------------------------------------------------ the dataclass
def test_acam_options_defaults_are_the_level_defaults():
    level_defaults = {name: p.default for name, p in inspect.signature(ACAMLevel).parameters.items()
                      if p.default is not inspect.Parameter.empty}
    options = ACAMOptions(**PAPER_MODE)  # ACAMLevel's defaults are the paper; the options' add DEFAULT_MODE
    assert options.level_kwargs() == level_defaults
    assert ACAMOptions().level_kwargs() == {**level_defaults, **DEFAULT_MODE}
    assert options.check_finite is True and isinstance(options, MethodOptions)
    assert options_class("acam") is ACAMOptions and get_method_class("acam") is ACAM
    assert ACAM.options_class is ACAMOptions and "acam" in list_methods()


@pytest.mark.parametrize("field,value,message", [
    ("num_masks", 0, "num_masks must be an integer >= 1, got 0"),
    ("num_masks", 2.0, "num_masks must be an integer >= 1"),
    ("alpha", -1.0, "alpha must be a finite number >= 0"),
    ("lam", float("nan"), "lam must be a finite number >= 0"),
    ("init_std", float("inf"), "init_std must be a finite number >= 0"),
    ("query", "teachr", "query must be one of ('teacher', 'student')"),
    ("masks", None, "masks must be one of"),
    ("check_finite", 1, "check_finite must be true or false"),
])
def test_acam_options_check_ranges_and_choices(field, value, message):
    with pytest.raises(OptionError) as info:
        ACAMOptions(**{field: value})
    assert info.value.option == field and message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_options():
    assert parse_options("acam", {"num_masks": 3, "masks": "spatial"}) == ACAMOptions(num_masks=3, masks="spatial")
    assert parse_options("acam") == ACAMOptions()
    with pytest.raises(TypeError, match=r"unknown option 'num_mask'; did you mean 'num_masks'"):
        parse_options("acam", {"num_mask": 3})
    with pytest.raises(OptionError, match="lam must be"):
        parse_options("acam", {"lam": -1})
    with pytest.raises(KeyError, match=r"did you mean \['acam'\]"):
        parse_options("acm", {})


# ------------------------------------------------------------------------------------- build
def test_build_with_typed_options_equals_build_with_keywords():
    options = {"num_masks": 3, "mask_norm": "energy", "query": "student", "init_std": 0.5}
    torch.manual_seed(0)
    from_kwargs = build("acam", teacher_channels=TEACHER, student_channels=STUDENT, **options)
    torch.manual_seed(0)
    from_typed = build("acam", teacher_channels=TEACHER, student_channels=STUDENT, options=ACAMOptions(**options))
    assert from_typed.options == from_kwargs.options == parse_options("acam", options)
    a, b = from_kwargs.state_dict(), from_typed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher = {"p3": torch.randn(2, 8, 4, 4), "p4": torch.randn(2, 6, 2, 2)}
    student = {"p3": torch.randn(2, 4, 4, 4), "p4": torch.randn(2, 6, 2, 2)}
    for key, value in from_kwargs(teacher, student).items():
        assert torch.equal(value, from_typed(teacher, student)[key]), key


def test_build_rejects_mixed_or_foreign_options():
    with pytest.raises(TypeError, match="either options= or option keywords"):
        build("acam", teacher_channels=TEACHER, options=ACAMOptions(), num_masks=3)
    with pytest.raises(TypeError, match="options must be a ACAMOptions"):
        build("acam", teacher_channels=TEACHER, options=MethodOptions())
    with pytest.raises(TypeError, match=r"ACAM: unknown option 'num_mask'; did you mean 'num_masks'"):
        build("acam", teacher_channels=TEACHER, num_mask=3)


def test_option_range_errors_name_the_levels():
    with pytest.raises(ValueError, match=r"ACAM levels \['p3', 'p4'\]: alpha must be a finite number >= 0"):
        ACAM(TEACHER, alpha=-1.0)


# ------------------------------------------------------------------------------------ config
def test_typo_in_an_override_names_key_origin_and_close_match():
    msg = error_of("method.options.num_mask=6")
    assert msg.startswith("unknown key 'method.options.num_mask' (from override 'method.options.num_mask=6'); "
                          "did you mean 'method.options.num_masks'"), msg


def test_typo_in_a_file_names_the_line(tmp_path):
    path = child_config(tmp_path, """\
        method:
          options:
            num_mask: 6
        """)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert "unknown key 'method.options.num_mask'" in msg and f"{path}:4" in msg
    assert "'method.options.num_masks'" in msg


def test_bad_choice_names_key_choices_origin_and_suggestion():
    msg = error_of("method.options.query=teachr")
    assert msg.startswith("method.options.query: expected one of 'teacher', 'student', got str 'teachr'"), msg
    assert "from override 'method.options.query=teachr'" in msg and "did you mean 'teacher'" in msg


def test_wrong_type_names_key_and_origin():
    msg = error_of("method.options.num_masks=2.5")
    assert msg.startswith("method.options.num_masks: expected int, got float 2.5"), msg
    assert "from override 'method.options.num_masks=2.5'" in msg


def test_bad_range_names_key_and_origin(tmp_path):
    msg = error_of("method.options.num_masks=0")
    assert msg == ("method.options.num_masks: must be an integer >= 1, got 0 "
                   "(from override 'method.options.num_masks=0')"), msg
    path = child_config(tmp_path, """\
        method:
          options:
            lam: -0.5
        """)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"method.options.lam: must be a finite number >= 0, got -0.5 (at {path}:4)"


def test_unknown_method_name():
    msg = error_of("method.name=acm")
    assert "method.name: unknown method 'acm'; did you mean 'acam'?" in msg
    assert "from override 'method.name=acm'" in msg


def test_options_become_the_complete_plain_dict_converted():
    """The resolved config records every option the method uses, defaults included (config.yaml,
    experiment cache keys and resume checks compare it)."""
    cfg = load_config(DEMO, ["method.options={num_masks: 3, alpha: 2, init_std: 1e-3}"])
    assert cfg.method.options == {**dataclasses.asdict(ACAMOptions()), "num_masks": 3, "alpha": 2.0,
                                  "init_std": 0.001}
    assert type(cfg.method.options) is dict and type(cfg.method.options["alpha"]) is float
    assert parse_options("acam", cfg.method.options) == ACAMOptions(num_masks=3, alpha=2.0, init_std=0.001)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(DEMO, ["method.options.masks=spatial"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


def test_no_method_keeps_options_free_form_with_a_warning(caplog):
    cfg = load_config(DEMO, ["method.name=null", "teacher=null", "train.inherit_teacher=false",
                             "method.options.anything=1"])
    assert cfg.method.options["anything"] == 1
    assert "are ignored: method.name is null" in caplog.text


def test_options_of_another_method_say_how_to_replace_the_section():
    msg = error_of("method.name=toy_l1")  # the demo config's ACAM options stay
    assert "are not options of method 'toy_l1'" in msg and "method.options={}" in msg
    assert "from override 'method.name=toy_l1'" in msg


def test_a_typo_gets_no_replace_the_section_advice():
    assert "not options of method" not in error_of("method.options.num_mask=6")


# ---------------------------------------------------------------------------------------- CLI
def test_cli_prints_one_named_error_without_traceback(capsys, monkeypatch):
    monkeypatch.delenv("ACAMKD_TRACEBACK", raising=False)
    assert cli.main(["distill", DEMO, "method.options.num_mask=6"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("acamkd distill: ConfigError: unknown key 'method.options.num_mask' "
                            "(from override 'method.options.num_mask=6'); did you mean 'method.options.num_masks'"), err
