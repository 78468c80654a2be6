"""Distillation methods, one file each, built by name through the registry.

``build(name, teacher_channels=..., student_channels=..., **options)`` gives a
:class:`DistillMethod`; ``options_class(name)`` / ``parse_options(name, mapping)`` give its typed
options. A new method is one file: an options dataclass (subclass of :class:`MethodOptions`)
and a :class:`LevelwiseMethod` subclass under ``@register(name, options=...)``, imported here.
"""
from acamkd.methods.base import DistillMethod, LevelResult, LevelwiseMethod, MethodOptions, OptionError
from acamkd.methods.batch import DistillBatch
from acamkd.methods.registry import (
    available,
    build,
    get_method_class,
    list_methods,
    method_tasks,
    options_class,
    parse_options,
    register,
)
from acamkd.methods.acam import ACAM, ACAMLevel, ACAMLevelOutput, ACAMOptions  # noqa: E402  (registers "acam")
from acamkd.methods.mimic import Mimic, MimicOptions  # noqa: E402  (registers "mimic")
from acamkd.methods.cwd import CWD, CWDOptions  # noqa: E402  (registers "cwd")
from acamkd.methods.fgd import FGD, FGDOptions  # noqa: E402  (registers "fgd")
from acamkd.methods.maskd import MasKD, MasKDOptions  # noqa: E402  (registers "maskd")

__all__ = [
    "ACAM", "ACAMLevel", "ACAMLevelOutput", "ACAMOptions", "CWD", "CWDOptions", "DistillBatch", "DistillMethod",
    "FGD", "FGDOptions", "LevelResult", "LevelwiseMethod", "MasKD", "MasKDOptions", "MethodOptions", "OptionError",
    "available", "build", "get_method_class", "list_methods", "method_tasks", "options_class", "parse_options", "register",
]
