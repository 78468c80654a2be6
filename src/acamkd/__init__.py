"""acamkd: ACAM-KD and the methods it is compared against, for dense-prediction distillation.

The public surface is small: ``acamkd.methods.build(name, **cfg)`` gives a method module
whose call ``method(teacher_feats, student_feats, batch=None)`` returns weighted losses.
"""
from acamkd.methods import ACAM, ACAMLevel, DistillMethod, available, build

__version__ = "0.1.0"
__all__ = ["ACAM", "ACAMLevel", "DistillMethod", "build", "available", "__version__"]
