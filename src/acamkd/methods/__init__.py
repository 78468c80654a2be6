"""Distillation methods, one file each, built by name through the registry."""
from acamkd.methods.base import DistillMethod
from acamkd.methods.registry import available, build, register
from acamkd.methods.acam import ACAM, ACAMLevel, ACAMLevelOutput  # noqa: E402  (registers "acam")

__all__ = ["DistillMethod", "build", "register", "available", "ACAM", "ACAMLevel", "ACAMLevelOutput"]
