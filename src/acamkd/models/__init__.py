"""Model builders, the model registry and feature taps.

Registry (:mod:`acamkd.models.registry`): one :class:`ModelSpec` per architecture (builder,
backbones, default taps with their strides and channels, the cheap teacher pass, eval limits),
read with :func:`get_model_spec`, :func:`list_models`, :func:`list_backbones`, :func:`list_tasks`.
Detection: :func:`build_detector` (any registered detector; built in: torchvision RetinaNet /
Faster R-CNN / FCOS, FPN over ResNet), the FPN family's default taps (:func:`detector_taps`,
:func:`student_taps`) and cheap teacher pass (:func:`teacher_features`). Generic:
:class:`FeatureTaps` records named submodule outputs of any ``nn.Module``. Weights: local files
only, strict loading, teacher -> student inheritance. Segmentation: ``acamkd.models.segmentation``
(DeepLabV3 / PSPNet at output stride 8; segmentation-models-pytorch is imported only when a
segmenter is built, so detection users do not load it). ``DETECTOR_ARCHS`` is read from the
registry on access.
"""
from typing import Any

from acamkd.models.detection import (
    DETECTOR_BACKBONES,
    DetectionTransform,
    build_detector,
    detector_channels,
    detector_taps,
    student_taps,
    teacher_features,
)
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
from acamkd.models.taps import FeatureTaps
from acamkd.models.weights import (
    InheritReport,
    WeightsMismatchError,
    inherit_weights,
    load_state_dict_file,
    load_weights_strict,
)

__all__ = [
    "DETECTOR_ARCHS",
    "DETECTOR_BACKBONES",
    "DetectionTransform",
    "FeatureTaps",
    "InheritReport",
    "ModelSpec",
    "UnknownModelError",
    "WeightsMismatchError",
    "build_detector",
    "detector_channels",
    "detector_taps",
    "get_model_spec",
    "inherit_weights",
    "list_backbones",
    "list_models",
    "list_tasks",
    "load_state_dict_file",
    "load_weights_strict",
    "register_model",
    "student_taps",
    "teacher_features",
    "temporarily_registered",
    "unregister_model",
]


def __getattr__(name: str) -> Any:
    """``DETECTOR_ARCHS``: every registered detection model (registration order), read on access."""
    if name == "DETECTOR_ARCHS":
        return tuple(list_models("detection"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
