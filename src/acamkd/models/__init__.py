"""Model builders and feature taps.

Detection: :func:`build_detector` (torchvision RetinaNet / Faster R-CNN / FCOS, FPN over
ResNet), its default taps (:func:`detector_taps`, :func:`student_taps`) and the cheap teacher
pass (:func:`teacher_features`). Generic: :class:`FeatureTaps` records named submodule outputs
of any ``nn.Module``. Weights: local files only, strict loading, teacher -> student inheritance.
Segmentation: ``acamkd.models.segmentation`` (DeepLabV3 / PSPNet at output stride 8; imported on
demand, so detection users do not load segmentation-models-pytorch).
"""
from acamkd.models.detection import (
    DETECTOR_ARCHS,
    DETECTOR_BACKBONES,
    DetectionTransform,
    build_detector,
    detector_channels,
    detector_taps,
    student_taps,
    teacher_features,
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
    "WeightsMismatchError",
    "build_detector",
    "detector_channels",
    "detector_taps",
    "inherit_weights",
    "load_state_dict_file",
    "load_weights_strict",
    "student_taps",
    "teacher_features",
]
