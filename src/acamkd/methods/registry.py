"""Distillation methods by name: ``build("acam", **cfg)``; later methods register beside it."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from acamkd.methods.base import DistillMethod

__all__ = ["register", "build", "available"]

_REGISTRY: dict[str, Callable[..., DistillMethod]] = {}


def register(name: str) -> Callable:
    """Class decorator: make a method constructible by ``build(name, ...)``."""

    def decorator(cls: Callable[..., DistillMethod]) -> Callable[..., DistillMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **kwargs: Any) -> DistillMethod:
    """Construct the method registered as ``name`` with its keyword arguments."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown distillation method {name!r}: known methods are {available()}{hint}")
    return _REGISTRY[name](**kwargs)
