"""The one interface every distillation method implements (see DESIGN.md)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["DistillMethod", "check_level_names"]


class DistillMethod(nn.Module):
    """A distillation method: ``losses = method(teacher_feats, student_feats, batch=None)``.

    ``teacher_feats`` / ``student_feats`` map a level name to a ``(B, C, H, W)`` tensor;
    the result maps a loss name to an already weighted scalar (the engine sums and logs
    them). A method never touches models, data or optimizers; its own parameters (e.g.
    alignment convs) are trained with the student and dropped after training.
    """

    def forward(  # pragma: no cover - interface
        self,
        teacher_feats: Mapping[str, Tensor],
        student_feats: Mapping[str, Tensor],
        batch: Any = None,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def statistics(self) -> dict[str, float]:
        """Scalars worth logging from the last forward (no extra pass); empty by default."""
        return {}


def check_level_names(expected: list[str], teacher_feats: Mapping, student_feats: Mapping, method: str) -> None:
    """Raise a ValueError naming missing or extra levels in either feature dict."""
    for side, feats in (("teacher_feats", teacher_feats), ("student_feats", student_feats)):
        if not isinstance(feats, Mapping):
            raise TypeError(f"{method}: {side} must be a dict of level name -> tensor, got {type(feats).__name__}")
        missing = [name for name in expected if name not in feats]
        extra = [name for name in feats if name not in expected]
        if missing or extra:
            raise ValueError(
                f"{method}: {side} levels do not match the method's levels {expected}: "
                f"missing {missing}, extra {extra}"
            )
