"""One registry of the detectors and segmenters acamkd can build, distil and evaluate.

Each architecture is one :class:`ModelSpec`: its builder, the backbones it accepts, its default
taps (names, strides, channels), the cheap teacher pass and its evaluation limits. Config
validation, the engine, the benchmarks and the tests read this registry; nothing else lists
model names. In the spirit of torchvision's ``models/_api.py`` and timm's ``_registry.py``::

    spec = get_model_spec("retinanet")                 # unknown name: UnknownModelError, with close matches
    model = spec.build("resnet18", 9)                  # K = 8 foreground classes + background
    taps = FeatureTaps(model, *spec.default_taps(model))
    list_models("detection"), list_backbones("retinanet"), list_tasks()

Adding an architecture family is one file in ``acamkd/models/`` that calls :func:`register_model`
at import, plus its module name in :data:`FAMILY_MODULES` (imported on the first lookup).
The module itself holds no model code; importing it through the ``acamkd.models`` package (the
usual way) loads the built-in families' modules (torchvision for the detectors), and
segmentation-models-pytorch is imported only when a segmenter is built.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "FAMILY_MODULES",
    "TASKS",
    "ModelSpec",
    "UnknownModelError",
    "did_you_mean",
    "get_model_spec",
    "list_backbones",
    "list_models",
    "list_tasks",
    "register_model",
    "temporarily_registered",
    "unregister_model",
]

TASKS: tuple[str, ...] = ("detection", "segmentation")  # the tasks the engine has adapters for
# Modules that register the built-in families when imported (one line per family file).
FAMILY_MODULES: tuple[str, ...] = ("acamkd.models.detection", "acamkd.models.segmentation", "acamkd.models.reppoints")


def _no_eval_limits(model: Any, score_thresh: float, max_detections: int) -> None:
    """Segmenters have no score threshold or detection cap: nothing to set."""


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Everything the library needs to know about one architecture (e.g. ``"retinanet"``).

    Class-count convention: ``background_class=True`` (detectors) means ``build``'s ``num_classes``
    is K foreground classes + 1 background (label 0, torchvision's convention: pass K + 1);
    ``False`` (segmenters) means ``num_classes`` is the number of output logits as given.
    ``levels`` and the callables describe the *default* taps at the builder's default options.
    Inputs (``model(...)``, ``teacher_features``): detectors take a list of (3, H, W) images in [0, 1]
    (normalised and padded inside the model); segmenters a normalised (B, 3, H, W) batch.
    Raises ``ValueError`` on construction if a field is malformed (unknown task, no backbones,
    empty ``levels``, a stride or ``size_divisor`` < 1, a member that is not callable).
    """

    name: str  # registry key, e.g. "retinanet"; also the config's ``arch``
    task: str  # one of TASKS: "detection" | "segmentation"
    backbones: tuple[str, ...]  # backbone names ``build`` accepts
    # build(backbone, num_classes, *, pretrained=None, checkpoint=None, **options) -> nn.Module
    build: Callable[..., Any]
    levels: Mapping[str, int]  # default tap name -> stride w.r.t. the padded input, in tap order
    size_divisor: int  # the model pads its input to a multiple of this (32: detectors; 1: no padding)
    background_class: bool  # True: num_classes = K + 1 (background 0); False: num_classes = output logits
    default_taps: Callable[[Any], tuple[dict[str, str], dict[str, str]]]  # model -> (taps, rename) for FeatureTaps
    tap_channels: Callable[[Any], dict[str, int]]  # model -> {level: channels} of the default taps, no forward
    teacher_features: Callable[[Any, Any], dict[str, Any]]  # (model, inputs) -> {level: (B, C, h, w)}, cheap, no grad
    set_eval_limits: Callable[[Any, float, int], None] = _no_eval_limits  # (model, score_thresh, max_detections)
    description: str = ""  # one line for listings

    def __post_init__(self) -> None:
        where = f"ModelSpec {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec name must be a non-empty string, got {self.name!r}")
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        backbones = (self.backbones,) if isinstance(self.backbones, str) else tuple(self.backbones)
        if not backbones or not all(isinstance(b, str) and b for b in backbones):
            raise ValueError(f"{where}: backbones must be a non-empty sequence of names, got {self.backbones!r}")
        levels = dict(self.levels)
        if not levels or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in levels.values()):
            raise ValueError(f"{where}: levels must map each default tap to an integer stride >= 1, got {levels!r}")
        if isinstance(self.size_divisor, bool) or not isinstance(self.size_divisor, int) or self.size_divisor < 1:
            raise ValueError(f"{where}: size_divisor must be an integer >= 1, got {self.size_divisor!r}")
        for member in ("build", "default_taps", "tap_channels", "teacher_features", "set_eval_limits"):
            if not callable(getattr(self, member)):
                raise ValueError(f"{where}: {member} must be callable, got {getattr(self, member)!r}")
        object.__setattr__(self, "backbones", backbones)
        object.__setattr__(self, "levels", MappingProxyType(levels))  # read-only: specs are shared
        object.__setattr__(self, "background_class", bool(self.background_class))

    def check_backbone(self, backbone: str) -> str:
        """``backbone`` if this architecture accepts it; else ``ValueError`` naming close matches."""
        if backbone not in self.backbones:
            raise ValueError(f"{self.name} does not take backbone {backbone!r}{did_you_mean(backbone, self.backbones)}")
        return backbone


class UnknownModelError(KeyError, ValueError):
    """No registered model of that name (or not of the requested task). Both a ``KeyError`` (a
    failed lookup) and a ``ValueError`` (a bad argument), so either ``except`` catches it."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, ModelSpec] = {}
_LOCK = threading.RLock()
_families_loaded = False


def _load_families() -> None:
    """Import the built-in family modules, so their specs are registered before a lookup. Idempotent;
    no lock of ours is held while importing (Python's per-module import locks make a second thread
    wait for a family being imported; in the importing thread a family sees the others' partial state)."""
    global _families_loaded
    if _families_loaded:
        return
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    _families_loaded = True


def did_you_mean(value: str, known: Iterable[str], *, list_known: bool = True) -> str:
    """Tail of an error message about ``value``: ``"; did you mean 'x'? known: a, b"`` (close
    matches first when there are any; ``list_known=False`` leaves out the known names)."""
    known = list(known)
    close = difflib.get_close_matches(str(value), known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if not list_known:
        return hint
    return f"{hint} known: {', '.join(known)}" if close else f"; known: {', '.join(known)}"


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` under ``spec.name`` and return it. ``ValueError`` if the name is taken (by a
    built-in too: the families are loaded first) or ``spec`` is not a :class:`ModelSpec`; a family
    calls this at import (see :data:`FAMILY_MODULES`)."""
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"register_model expects a ModelSpec, got {type(spec).__name__}")
    if sys._getframe(1).f_globals.get("__name__") not in FAMILY_MODULES:
        # A user's model: the built-ins first, so a clash is caught here. A family registering
        # itself does not load the others, so the built-ins register in FAMILY_MODULES order
        # (list_models' order) whichever family is imported first.
        _load_families()
    with _LOCK:
        if spec.name in _REGISTRY:
            raise ValueError(f"a model named {spec.name!r} is already registered "
                             f"({_REGISTRY[spec.name].task}); unregister_model it first or pick another name")
        _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> ModelSpec:
    """Remove and return the spec registered as ``name``; :class:`UnknownModelError` if there is none."""
    with _LOCK:
        spec = get_model_spec(name)
        del _REGISTRY[name]
    return spec


@contextlib.contextmanager
def temporarily_registered(spec: ModelSpec) -> Iterator[ModelSpec]:
    """``with temporarily_registered(spec): ...``: registered inside the block, removed after (tests)."""
    register_model(spec)
    try:
        yield spec
    finally:
        with _LOCK:
            if _REGISTRY.get(spec.name) is spec:
                del _REGISTRY[spec.name]


def get_model_spec(name: str, task: str | None = None) -> ModelSpec:
    """The spec registered as ``name`` (of ``task``, if given).

    Raises :class:`UnknownModelError` (a ``KeyError`` and a ``ValueError``) naming ``name``, close
    matches and the known names, also when ``name`` is registered for another task.
    """
    _load_families()
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    known = list_models(task)
    if spec is None:
        kind = f"{task} model" if task else "model"
        raise UnknownModelError(f"unknown {kind} {name!r}{did_you_mean(name, known)}")
    if task is not None and spec.task != task:
        raise UnknownModelError(f"{name!r} is a {spec.task} model, not a {task} one; known {task} models: "
                                f"{', '.join(known)}")
    return spec


def list_models(task: str | None = None) -> list[str]:
    """Registered model names of ``task`` (None: all, task by task in :data:`TASKS` order), each task's
    in registration order. ``ValueError`` for an unknown task."""
    _load_families()
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    with _LOCK:
        return [name for t in ((task,) if task else TASKS) for name, spec in _REGISTRY.items() if spec.task == t]


def list_backbones(name: str) -> tuple[str, ...]:
    """Backbones the model ``name`` accepts; :class:`UnknownModelError` for an unknown name."""
    return get_model_spec(name).backbones


def list_tasks() -> tuple[str, ...]:
    """The tasks a spec may declare (the engine has one adapter for each): ``("detection", "segmentation")``."""
    return TASKS
