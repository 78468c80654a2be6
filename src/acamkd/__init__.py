"""acamkd: ACAM-KD and the methods it is compared against, for dense-prediction distillation.

The public surface is small: ``acamkd.methods.build(name, **cfg)`` gives a method module
whose call ``method(teacher_feats, student_feats, batch=None)`` returns weighted losses;
``acamkd.methods.parse_options(name, mapping)`` gives its typed options.
"""
from acamkd.methods import (
    ACAM,
    ACAMLevel,
    ACAMOptions,
    DistillBatch,
    DistillMethod,
    LevelwiseMethod,
    available,
    build,
    parse_options,
)

__version__ = "0.1.0"
__all__ = ["ACAM", "ACAMLevel", "ACAMOptions", "DistillBatch", "DistillMethod", "LevelwiseMethod", "available",
           "build", "parse_options", "__version__"]
