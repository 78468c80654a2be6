"""The contract every registered distillation method keeps (DESIGN.md, acamkd.methods.base).

Parametrised over ``acamkd.methods.available()`` at collection time (``conftest.py`` has
imported ``tests/_toy_method.py`` by then), with no special case per method: a new method is
covered as soon as it is registered.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from acamkd.config import load_config
from acamkd.methods import DistillMethod, MethodOptions, available, build, options_class
from acamkd.methods.batch import DistillBatch

METHODS = available()
TEACHER_CHANNELS = {"p3": 8, "p4": 8}
STUDENT_CHANNELS = {"p3": 4, "p4": 6}
GRIDS = {"p3": (6, 5), "p4": (3, 3)}  # strides 8 and 16 of a 48 x 40 input
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "shapes_det_acam.yaml"


def make_method(name: str, seed: int = 0) -> DistillMethod:
    torch.manual_seed(seed)
    return build(name, teacher_channels=TEACHER_CHANNELS, student_channels=STUDENT_CHANNELS)


def make_inputs(batch: int = 2, seed: int = 1, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    teacher = {n: torch.randn(batch, c, *GRIDS[n], generator=gen) for n, c in TEACHER_CHANNELS.items()}
    student = {n: torch.randn(batch, c, *GRIDS[n], generator=gen) for n, c in STUDENT_CHANNELS.items()}
    for feats in (teacher, student):
        for feat in feats.values():
            feat.requires_grad_(requires_grad)
    return teacher, student


def make_batch() -> DistillBatch:
    return DistillBatch(input_size=(48, 40), image_sizes=[(48, 40), (40, 32)],
                        boxes=[torch.tensor([[2.0, 3.0, 20.0, 30.0]]),
                               torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 25.0]])],
                        labels=[torch.tensor([1]), torch.tensor([2, 3])])


def tensors_in(value):
    """Every tensor inside ``value`` (dataclasses, dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


@pytest.mark.parametrize("name", METHODS)
def test_losses_are_named_finite_scalars(name):
    method = make_method(name)
    assert isinstance(method, DistillMethod)
    losses = method(*make_inputs(), batch=make_batch())
    assert type(losses) is dict and losses
    for key, value in losses.items():
        level, _, kind = key.rpartition(".")
        assert level in TEACHER_CHANNELS and kind, key
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point(), key
        assert torch.isfinite(value), key
    assert {key.rpartition(".")[0] for key in losses} == set(TEACHER_CHANNELS)  # every level contributes


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_student_and_method_never_teacher(name):
    method = make_method(name)
    teacher, student = make_inputs(requires_grad=True)
    sum(method(teacher, student, batch=make_batch()).values()).backward()
    for level in TEACHER_CHANNELS:
        assert teacher[level].grad is None, f"gradient reached the teacher at {level}"
        grad = student[level].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, level
    params = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert params, "a method trains at least its alignment"
    for pname, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", METHODS)
def test_level_name_errors_name_the_level(name):
    method = make_method(name)
    teacher, student = make_inputs()
    student["P4"] = student.pop("p4")
    with pytest.raises(ValueError, match=r"'p4'") as info:
        method(teacher, student)
    assert "'P4'" in str(info.value)


@pytest.mark.parametrize("name", METHODS)
def test_channel_and_batch_errors_name_the_level(name):
    method = make_method(name)
    teacher, student = make_inputs()
    student["p4"] = torch.randn(2, 8, *GRIDS["p4"])  # the teacher's channel count, not the student's
    with pytest.raises(ValueError, match=r"level 'p4'.*channels"):
        method(teacher, student)
    teacher, student = make_inputs()
    student["p3"] = student["p3"][:1]
    with pytest.raises(ValueError, match=r"level 'p3'.*batch"):
        method(teacher, student)
    teacher, student = make_inputs()
    teacher["p4"] = teacher["p4"][0]
    with pytest.raises(ValueError, match=r"level 'p4'.*4-D"):
        method(teacher, student)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("side", ["teacher_feats", "student_feats"])
def test_non_finite_input_is_named(name, side):
    method = make_method(name)
    teacher, student = make_inputs()
    {"teacher_feats": teacher, "student_feats": student}[side]["p4"][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN.*{side}\['p4'\]"):
        method(teacher, student, batch=make_batch())


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    method, other = make_method(name, seed=0), make_method(name, seed=1)
    inputs = make_inputs()
    other.load_state_dict(method.state_dict())
    expected, got = method(*inputs, batch=make_batch()), other(*inputs, batch=make_batch())
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("name", METHODS)
def test_inspect_is_per_level_and_without_grad(name):
    method = make_method(name)
    teacher, student = make_inputs(requires_grad=True)
    method(teacher, student, batch=make_batch())
    stats = method.statistics()
    outputs = method.inspect(teacher, student, batch=make_batch())
    assert isinstance(outputs, dict) and set(outputs) == set(TEACHER_CHANNELS)
    found = [t for value in outputs.values() for t in tensors_in(value)]
    assert found and not any(t.requires_grad for t in found)
    assert method.statistics() == stats  # inspect does not touch the logged statistics


@pytest.mark.parametrize("name", METHODS)
def test_statistics_are_floats_after_a_forward(name):
    method = make_method(name)
    method(*make_inputs(), batch=make_batch())
    stats = method.statistics()
    assert isinstance(stats, dict)
    for key, value in stats.items():
        assert type(value) is float, key
        assert key.rpartition(".")[0] in TEACHER_CHANNELS, key


@pytest.mark.parametrize("name", METHODS)
def test_options_are_a_typed_dataclass_with_defaults(name):
    cls = options_class(name)
    assert dataclasses.is_dataclass(cls) and issubclass(cls, MethodOptions)
    defaults = cls()  # every option has a default
    for f in dataclasses.fields(cls):
        assert f.type is not None, f.name
    torch.manual_seed(0)
    typed = build(name, teacher_channels=TEACHER_CHANNELS, student_channels=STUDENT_CHANNELS, options=defaults)
    inputs = make_inputs()
    assert ({k: v.item() for k, v in typed(*inputs, batch=make_batch()).items()}
            == {k: v.item() for k, v in make_method(name)(*inputs, batch=make_batch()).items()})
    # The config machinery checks these options: a config naming the method loads with its defaults.
    cfg = load_config(str(DEMO_CONFIG), [f"method.name={name}", "method.options={}"])
    assert cfg.method.name == name and cfg.method.options == dataclasses.asdict(defaults)  # complete, resolved
    msg = str(pytest.raises(ValueError, load_config, str(DEMO_CONFIG),
                            [f"method.name={name}", "method.options={no_such_option: 1}"]).value)
    assert re.search(r"method\.options \['no_such_option'\] are not options of method", msg)
