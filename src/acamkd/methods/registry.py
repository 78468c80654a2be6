"""Distillation methods by name, each with its typed options (in the style of timm's and
torchvision's model registries)::

    @register("acam", options=ACAMOptions)
    class ACAM(LevelwiseMethod): ...

    build("acam", teacher_channels={"p3": 256}, num_masks=6)             # options as keywords
    build("acam", teacher_channels={"p3": 256}, options=ACAMOptions())    # or as the dataclass
    parse_options("acam", {"num_masks": 6})                              # -> ACAMOptions(num_masks=6)
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from acamkd.methods.base import DistillMethod, MethodOptions, resolve_options

__all__ = [
    "ALL_TASKS", "available", "build", "get_method_class", "list_methods", "method_tasks", "options_class",
    "parse_options", "register",
]

#: The tasks a method applies to unless it says otherwise (``register(..., tasks=...)``).
ALL_TASKS: tuple[str, ...] = ("detection", "segmentation")

_REGISTRY: dict[str, type[DistillMethod]] = {}
_OPTIONS: dict[str, type[MethodOptions]] = {}
_TASKS: dict[str, tuple[str, ...]] = {}


def register(name: str, options: type[MethodOptions] | None = None,
             tasks: tuple[str, ...] = ALL_TASKS) -> Callable[[type], type]:
    """Class decorator: make a method constructible by ``build(name, ...)`` with the options
    dataclass ``options`` (a :class:`~acamkd.methods.base.MethodOptions` subclass; default: the
    class's ``options_class``, else :class:`MethodOptions`, which holds only ``check_finite``).
    ``tasks`` are the tasks it applies to (FGD: detection only, its masks come from boxes); a
    config that names it for another task is refused when it is loaded. Sets ``cls.options_class``
    and ``cls.tasks``.

    Raises:
        ValueError: ``name`` is taken, or ``tasks`` is empty or names an unknown task.
        TypeError: ``options`` is not a MethodOptions subclass, or has a field whose type a config
            cannot check (see :func:`acamkd.config.check_schema`).
    """
    if options is not None and not (isinstance(options, type) and issubclass(options, MethodOptions)):
        raise TypeError(f"register({name!r}): options must be a MethodOptions dataclass subclass, got {options!r}")
    tasks = tuple(tasks)
    if not tasks or any(t not in ALL_TASKS for t in tasks):
        raise ValueError(f"register({name!r}): tasks must be a non-empty subset of {ALL_TASKS}, got {tasks!r}")
    if options is not None:
        from acamkd.config import check_schema

        check_schema(options)

    def decorator(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name]!r}")
        opts = options or getattr(cls, "options_class", None) or MethodOptions
        cls.options_class = opts
        cls.tasks = tasks
        _REGISTRY[name] = cls
        _OPTIONS[name] = opts
        _TASKS[name] = tasks
        return cls

    return decorator


def available() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


list_methods = available


def get_method_class(name: str) -> type[DistillMethod]:
    """The class registered as ``name``.

    Raises:
        KeyError: an unknown name; the message lists the known ones and close matches.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown distillation method {name!r}: known methods are {available()}{hint}")
    return _REGISTRY[name]


def options_class(name: str) -> type[MethodOptions]:
    """The options dataclass of method ``name`` (KeyError as :func:`get_method_class`)."""
    get_method_class(name)
    return _OPTIONS[name]


def method_tasks(name: str) -> tuple[str, ...]:
    """The tasks method ``name`` applies to, e.g. ``("detection",)`` for FGD (KeyError as
    :func:`get_method_class`)."""
    get_method_class(name)
    return _TASKS[name]


def parse_options(name: str, mapping: Mapping[str, Any] | None = None) -> MethodOptions:
    """Method ``name``'s typed options from a plain mapping (e.g. ``cfg.method.options``);
    missing keys take the defaults.

    Raises:
        KeyError: an unknown method. TypeError: an unknown option (with close matches).
        OptionError (a ValueError): a value out of range or of the wrong kind, naming the option.
    """
    return resolve_options(options_class(name), None, mapping or {}, owner=f"method {name!r}")


def build(name: str, /, *, options: MethodOptions | None = None, **kwargs: Any) -> DistillMethod:
    """Construct method ``name``: ``build(name, teacher_channels=..., student_channels=..., **options)``
    or with ``options=<its options dataclass>`` instead of option keywords.

    Raises:
        KeyError: an unknown method (close matches in the message); TypeError / ValueError from
        the method's constructor (unknown option, bad channels or values).
    """
    cls = get_method_class(name)
    if options is None:
        return cls(**kwargs)
    if not isinstance(options, _OPTIONS[name]):
        raise TypeError(f"build({name!r}): options must be a {_OPTIONS[name].__name__}, got {type(options).__name__}")
    return cls(options=options, **kwargs)
