"""The model registry: every registered model builds, and its spec (levels, strides, channels,
padding, teacher pass, eval limits) matches what the model does; names are checked with close
matches; config validation, the benchmark's level grids and the legacy name lists read it."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from acamkd.bench.levels import DETECTOR_LEVELS, fpn_level_shapes, layout_names
from acamkd.config import ConfigError, load_config
from acamkd.models import FeatureTaps
from acamkd.models.registry import (
    ModelSpec,
    UnknownModelError,
    get_model_spec,
    list_backbones,
    list_models,
    list_tasks,
    register_model,
    temporarily_registered,
    unregister_model,
)

SMALLEST = ("resnet18", "mobilenet_v2")  # preferred backbones for a tiny build, in order
K = 2  # foreground classes (detectors build K + 1 with background)


def smallest_backbone(name: str) -> str:
    backbones = list_backbones(name)
    return next((b for b in SMALLEST if b in backbones), backbones[0])


def tiny_inputs(spec: ModelSpec):
    """Detectors: a list of two [0, 1] images of different sizes (padded to one batch); segmenters:
    one normalised (2, 3, 50, 70) batch. Returns (inputs, the padded input height, width)."""
    if spec.task == "detection":
        images = [torch.rand(3, 64, 64), torch.rand(3, 45, 70)]
        h, w = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    else:
        images = torch.randn(2, 3, 50, 70)
        h, w = images.shape[-2:]
    d = spec.size_divisor
    return images, math.ceil(h / d) * d, math.ceil(w / d) * d


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_matches_its_spec(name):
    spec = get_model_spec(name)
    num_classes = K + 1 if spec.background_class else K  # detectors: K foreground + background; segmenters: K logits
    model = spec.build(smallest_backbone(name), num_classes).eval()
    assert isinstance(model, nn.Module)
    inputs, padded_h, padded_w = tiny_inputs(spec)
    channels = spec.tap_channels(model)
    assert list(channels) == list(spec.levels)
    with FeatureTaps(model, *spec.default_taps(model)) as taps, torch.no_grad():
        outputs = model(inputs)  # the whole model: head, NMS / upsampling and all
        hooked = taps.features()
    assert list(hooked) == list(spec.levels), (list(hooked), dict(spec.levels))
    for level, stride in spec.levels.items():
        grid = (math.ceil(padded_h / stride), math.ceil(padded_w / stride))
        assert hooked[level].shape == (2, channels[level], *grid), (level, hooked[level].shape, grid)
    direct = spec.teacher_features(model, inputs)
    assert list(direct) == list(hooked)
    for level in direct:
        assert torch.equal(direct[level], hooked[level]), level
        assert not direct[level].requires_grad
    model.train()
    spec.teacher_features(model, inputs)
    assert model.training  # the cheap pass restores the mode
    model.eval()
    spec.set_eval_limits(model, 0.0, 3)  # keep every score, at most 3 per image
    if spec.task == "detection":
        with torch.no_grad():
            outputs = model(inputs)
        assert len(outputs) == 2 and all(len(o["boxes"]) <= 3 for o in outputs)
    else:
        assert outputs.shape == (2, num_classes, *inputs.shape[-2:])  # no-op limits, full-resolution logits


def test_list_models_tasks_and_backbones():
    detectors, segmenters = list_models("detection"), list_models("segmentation")
    assert {"retinanet", "fasterrcnn", "fcos"} <= set(detectors)
    assert {"deeplabv3", "pspnet"} <= set(segmenters)
    assert list_models() == detectors + segmenters  # task by task
    assert list_tasks() == ("detection", "segmentation")
    assert {"resnet18", "resnet50", "resnet101", "resnext101_64x4d"} <= set(list_backbones("retinanet"))
    assert "mobilenet_v2" in list_backbones("deeplabv3") and list_backbones("pspnet") == ("resnet18",)
    for name in detectors:
        spec = get_model_spec(name, task="detection")
        assert spec.task == "detection" and spec.size_divisor == 32 and spec.background_class
    for name in segmenters:
        spec = get_model_spec(name, task="segmentation")
        assert dict(spec.levels) == {"logits": 8} and spec.size_divisor == 1 and not spec.background_class
    assert dict(get_model_spec("fasterrcnn").levels) == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    with pytest.raises(TypeError):
        get_model_spec("retinanet").levels["p8"] = 256  # read-only


def test_unknown_names_give_close_matches():
    with pytest.raises(UnknownModelError, match=r"'retinanett'.*did you mean 'retinanet'\?") as info:
        get_model_spec("retinanett")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "known: retinanet" in str(info.value)
    with pytest.raises(KeyError, match="segmentation model, not a detection one"):
        get_model_spec("deeplabv3", task="detection")
    with pytest.raises(ValueError, match="'pspnett'"):
        list_backbones("pspnett")
    with pytest.raises(ValueError, match="unknown task"):
        list_models("classification")
    with pytest.raises(ValueError, match=r"did you mean 'resnet50'"):
        get_model_spec("fcos").check_backbone("resnet5O")


def _tiny_detector(backbone: str, num_classes: int, *, pretrained=None, checkpoint=None, **options) -> nn.Module:
    return nn.Conv2d(3, 4, 3, stride=4, padding=1)


def _tiny_spec(name: str = "tinydet", **changes) -> ModelSpec:
    fields = dict(name=name, task="detection", backbones=("tiny", "tinier"), build=_tiny_detector,
                  levels={"p2": 4}, size_divisor=16, background_class=True,
                  default_taps=lambda model: ({"p2": ""}, {}),
                  tap_channels=lambda model: {"p2": model.out_channels},
                  teacher_features=lambda model, images: {"p2": model(images)})
    return ModelSpec(**{**fields, **changes})


def test_registration_checks_and_unregister():
    with pytest.raises(ValueError, match="task must be one of"):
        _tiny_spec(task="classification")
    with pytest.raises(ValueError, match="backbones"):
        _tiny_spec(backbones=())
    with pytest.raises(ValueError, match="stride >= 1"):
        _tiny_spec(levels={"p2": 0})
    with pytest.raises(ValueError, match="size_divisor"):
        _tiny_spec(size_divisor=0)
    with pytest.raises(ValueError, match="build must be callable"):
        _tiny_spec(build="not callable")
    with pytest.raises(ValueError, match="already registered"):
        register_model(_tiny_spec("retinanet"))
    spec = register_model(_tiny_spec())
    try:
        assert get_model_spec("tinydet") is spec and list_models("detection")[-1] == "tinydet"
        assert spec.backbones == ("tiny", "tinier") and dict(spec.levels) == {"p2": 4}
    finally:
        assert unregister_model("tinydet") is spec
    assert "tinydet" not in list_models()
    with pytest.raises(UnknownModelError):
        unregister_model("tinydet")


def test_config_validation_reads_the_registry():
    overrides = ["student.arch=tinydet", "student.backbone=tinier"]
    with temporarily_registered(_tiny_spec()):
        cfg = load_config(None, overrides)
        assert (cfg.student.arch, cfg.student.backbone) == ("tinydet", "tinier")
        with pytest.raises(ConfigError, match=r"student.backbone: 'tiny1' is not a backbone of tinydet; "
                                              r"did you mean 'tiny'\? known: tiny, tinier"):
            load_config(None, ["student.arch=tinydet", "student.backbone=tiny1"])
    with pytest.raises(ConfigError, match=r"student.arch: 'tinydet' is not a detection architecture; .*known: "
                                          r"retinanet"):
        load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"'retinanett' is not a detection architecture; did you mean 'retinanet'\?"):
        load_config(None, ["student.arch=retinanett", "student.backbone=resnet18"])
    with pytest.raises(ConfigError, match=r"teacher.arch: 'deeplabv3' is not a detection architecture \(it is a "
                                          r"segmentation one: set teacher.task=segmentation\)"):
        load_config(None, ["student.arch=fcos", "student.backbone=resnet18",
                           "teacher={arch: deeplabv3, backbone: resnet18}"])


def test_bench_levels_and_legacy_lists_read_the_registry():
    from acamkd.config import ARCHS_BY_TASK
    from acamkd.models import DETECTOR_ARCHS
    from acamkd.models.segmentation import SEGMENTER_ARCHS

    assert DETECTOR_ARCHS == tuple(list_models("detection"))
    assert SEGMENTER_ARCHS == {name: list_backbones(name) for name in list_models("segmentation")}
    assert ARCHS_BY_TASK == {task: tuple(list_models(task)) for task in list_tasks()}
    assert set(DETECTOR_LEVELS) == {*list_models("detection"), "segmenter"}
    assert fpn_level_shapes("fcos", 800, 1333) == fpn_level_shapes("retinanet", 800, 1333)
    assert fpn_level_shapes("pspnet", 65, 97) == fpn_level_shapes("segmenter", 65, 97) == {"logits": (9, 13)}
    with temporarily_registered(_tiny_spec()):
        import acamkd.models

        assert "tinydet" in acamkd.models.DETECTOR_ARCHS and "tinydet" in layout_names()
        assert fpn_level_shapes("tinydet", 33, 40) == {"p2": (12, 12)}  # padded to 48 x 48, stride 4
        from acamkd.bench.acam import build_parser

        assert build_parser().parse_args(["--detector", "tinydet"]).detector == "tinydet"
        model = get_model_spec("tinydet").build("tiny", 3)
        x = torch.rand(1, 3, 48, 48)
        with FeatureTaps(model, *get_model_spec("tinydet").default_taps(model)) as taps:
            model(x)
            assert taps.features()["p2"].shape == (1, 4, 12, 12)
    assert "tinydet" not in layout_names()
    with pytest.raises(ValueError, match=r"--detector.*did you mean 'retinanet'"):
        fpn_level_shapes("retinanett", 800, 1333)


def test_imports_stay_lazy():
    """Building the CLI parser loads no model code; the registry lists segmenters without importing
    segmentation-models-pytorch (only building one does)."""
    code = (
        "import json, sys\n"
        "from acamkd.cli import build_parser\n"
        "build_parser()\n"
        "parser_tv = 'torchvision' in sys.modules\n"
        "import acamkd.models\n"
        "from acamkd.models.registry import list_models\n"
        "names = list_models('segmentation')\n"
        "print(json.dumps([parser_tv, 'segmentation_models_pytorch' in sys.modules, names]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parser_tv, smp_loaded, names = json.loads(out.stdout.strip().splitlines()[-1])
    assert not parser_tv and not smp_loaded and "deeplabv3" in names


def test_builders_dispatch_through_the_registry():
    from acamkd.models import build_detector
    from acamkd.models.segmentation import build_segmenter

    calls = []

    def build(backbone, num_classes, **kwargs):
        calls.append((backbone, num_classes, sorted(kwargs)))
        return nn.Identity()

    with temporarily_registered(_tiny_spec(build=build)):
        build_detector("tinydet", "tiny", 3)
        with pytest.raises(ValueError, match="did you mean 'tiny'"):
            build_detector("tinydet", "tiny1", 3)
        with pytest.raises(ValueError, match="unknown segmentation arch 'tinydet'"):
            build_segmenter("tinydet", "tiny")
    assert calls == [("tiny", 3, ["checkpoint", "max_size", "min_size", "pretrained"])]
    with pytest.raises(ValueError, match="supports backbones.*did you mean 'resnet18'"):
        build_segmenter("deeplabv3", "resnet1")


@pytest.mark.parametrize("first", ["acamkd.models.reppoints", "acamkd.models.segmentation", "acamkd.models.registry"])
def test_builtin_families_register_in_family_order_whichever_is_imported_first(first):
    """A family registering itself must not load the others first (it once put RepPoints before
    RetinaNet, whichever module was imported first changing list_models' order)."""
    import subprocess
    import sys

    code = (f"import importlib; importlib.import_module({first!r}); "
            "from acamkd.models.registry import list_models; print(','.join(list_models()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",")[:4] == ["retinanet", "fasterrcnn", "fcos", "reppoints"]
