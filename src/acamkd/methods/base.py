"""The method contract (see DESIGN.md) and the per-level base every method builds on.

* :class:`DistillMethod`: the interface, ``losses = method(teacher_feats, student_feats, batch=None)``.
* :class:`MethodOptions`: the base of every method's typed options (a dataclass checked with
  the config: ``acamkd.config`` runs its own type checks on it, then :meth:`MethodOptions.validate`).
* :class:`LevelwiseMethod`: one independent module per tapped level. It owns the level-name,
  shape, device and NaN checks, the loss keys ``"<level>.<kind>"``, :meth:`~DistillMethod.statistics`
  and :meth:`~DistillMethod.inspect`; a method supplies :meth:`~LevelwiseMethod.build_level` and
  :meth:`~LevelwiseMethod.forward_level` (``tests/_toy_method.py`` is a complete example).

The layout follows the per-level "connectors" of MMRazor / MasKD / FGD (one small module per
distilled feature pair), without their framework: a method is a plain ``nn.Module``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "DistillMethod", "LevelResult", "LevelwiseMethod", "MethodOptions", "OptionError",
    "NonFiniteValues", "check_choice", "check_feature_pair", "check_finite", "check_int", "check_level_names", "check_weight",
    "level_key", "resolve_options", "upcast",
]


class DistillMethod(nn.Module):
    """A distillation method: ``losses = method(teacher_feats, student_feats, batch=None)``.

    ``teacher_feats`` / ``student_feats`` map a level name to a ``(B, C, H, W)`` tensor;
    ``batch`` is an optional :class:`~acamkd.methods.batch.DistillBatch` (boxes, input size) for
    methods that need it. The result maps a loss name to an already weighted 0-dim tensor (the
    engine sums and logs them). A method never touches models, data or optimizers; its own
    parameters (e.g. alignment convs) are trained with the student and dropped after training.
    A method registered with options is constructed as ``cls(teacher_channels=..., student_channels=...,
    options=<its options dataclass>)`` or with the options as keywords.
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

    def health_warnings(self) -> list[str]:
        """Messages about a method that has stopped working (e.g. masks collapsed), each returned
        once; the engine logs them with ``logger.warning`` at logging time. None by default."""
        return []

    def inspect(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, Any]:
        """Per-level intermediate tensors (no grad) for pictures and analysis; empty by default.
        Never part of the loss dict."""
        return {}


# ------------------------------------------------------------------------------------ options
class OptionError(ValueError):
    """A method option with a bad value. ``option`` names it, ``reason`` says what is wrong
    (``str(err)`` is ``"<option> <reason>"``); the config turns it into ``method.options.<option>``."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason

    def __reduce__(self):  # picklable despite the two-argument constructor
        return type(self), (self.option, self.reason)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else :class:`OptionError`."""
    if not isinstance(value, str) or value not in allowed:
        raise OptionError(name, f"must be one of {allowed}, got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else :class:`OptionError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_weight(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number ``>= 0`` (not a bool), else :class:`OptionError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OptionError(name, f"must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(kw_only=True)
class MethodOptions:
    """Options every method has; a method's options dataclass subclasses it (``kw_only``), gives
    each field a type and a default, and extends :meth:`validate`. Field types are what a config
    can check: bool, int, float, str, ``Literal[...]``, ``list[X]``, ``dict[str, X]``, ``X | None``
    (``register`` refuses others, :func:`acamkd.config.check_schema`). A method with no options of
    its own registers this class. Construction validates (:class:`OptionError`)."""

    check_finite: bool = True  # check every input for NaN/inf (one host sync per call)

    #: Per-task defaults that replace the field defaults when a config for that task leaves the
    #: option unset, e.g. CWD ``{"segmentation": {"weight": 5.0}}`` (MMRazor's logits config).
    #: Applied by :mod:`acamkd.config` (the resolved ``config.yaml`` records the value and says
    #: where it came from); building a method directly in Python uses the field defaults.
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`OptionError` naming the first option out of its range or type."""
        if not isinstance(self.check_finite, bool):
            raise OptionError("check_finite", f"must be true or false, got {self.check_finite!r}")


def resolve_options(options_cls: type[MethodOptions], options: Any = None, kwargs: Mapping[str, Any] | None = None,
                    owner: str = "") -> MethodOptions:
    """An ``options_cls`` instance from either a ready instance or keyword values (not both).

    Raises:
        TypeError: both given, an instance of another class, or an unknown keyword (with close matches).
        OptionError: a value out of range (from the dataclass's :meth:`~MethodOptions.validate`).
    """
    prefix = f"{owner}: " if owner else ""
    kwargs = dict(kwargs or {})
    if options is not None:
        if kwargs:
            raise TypeError(f"{prefix}pass either options= or option keywords, not both (got {sorted(kwargs)})")
        if not isinstance(options, options_cls):
            raise TypeError(f"{prefix}options must be a {options_cls.__name__}, got {type(options).__name__}")
        return options
    names = [f.name for f in dataclasses.fields(options_cls) if f.init]
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise TypeError(f"{prefix}unknown option {key!r}; {hint}({options_cls.__name__} has: {', '.join(names)})")
    return options_cls(**kwargs)


# ----------------------------------------------------------------------------------- checks
def check_level_names(expected: list[str], teacher_feats: Mapping, student_feats: Mapping, method: str) -> None:
    """Raise a ValueError naming missing or extra levels in either feature dict (TypeError if
    one is not a dict)."""
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


def check_feature_pair(teacher_feat: Any, student_feat: Any, teacher_channels: int, student_channels: int,
                       where: str = "") -> None:
    """One level's inputs: 4-D ``(B, C, H, W)`` floating tensors with the level's channel counts,
    non-empty, the same batch and device. Errors (TypeError / ValueError) start with ``where``
    (e.g. ``level 'p3'``) and name the argument."""
    prefix = f"{where}: " if where else ""
    for name, feat, channels in (("teacher_feat", teacher_feat, teacher_channels),
                                 ("student_feat", student_feat, student_channels)):
        if not isinstance(feat, Tensor):
            raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(feat).__name__}")
        if feat.dim() != 4:
            raise ValueError(f"{prefix}{name} must be 4-D (B, C, H, W), got shape {tuple(feat.shape)}")
        if not feat.is_floating_point():
            raise TypeError(f"{prefix}{name} must be a floating-point tensor, got {feat.dtype}")
        if feat.shape[1] != channels:
            raise ValueError(f"{prefix}{name} has {feat.shape[1]} channels, the level was built for {channels}")
        if feat.shape[2] < 1 or feat.shape[3] < 1:
            raise ValueError(f"{prefix}{name} has an empty grid {tuple(feat.shape[2:])}")
    if teacher_feat.shape[0] != student_feat.shape[0]:
        raise ValueError(f"{prefix}batch mismatch: teacher_feat has batch {teacher_feat.shape[0]}, "
                         f"student_feat has batch {student_feat.shape[0]}")
    if teacher_feat.shape[0] < 1:
        raise ValueError(f"{prefix}teacher_feat has an empty batch")
    if teacher_feat.device != student_feat.device:
        raise ValueError(f"{prefix}teacher_feat is on {teacher_feat.device}, student_feat on {student_feat.device}")


class NonFiniteValues(ValueError):
    """A method's input holds NaN or inf (``names``: which). Raised in a training step, the engine
    reports it as the run diverging (:class:`acamkd.engine.trainer.TrainingDiverged`)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(f"non-finite values (NaN or inf) in {names}")


def check_finite(named: Mapping[str, Tensor]) -> None:
    """One host sync for all tensors; on failure a :class:`NonFiniteValues` (a ValueError) naming
    each tensor holding NaN/inf."""
    if not named:
        return
    # max and min propagate NaN and carry +-inf: both finite <=> every element finite. Two
    # plain reductions, cheaper than isfinite's elementwise temporaries.
    # Outside autocast: its dtype rules reject mixed fp16/bf16 stacks (fp16 inputs in a CPU bf16 region).
    with torch.autocast(next(iter(named.values())).device.type, enabled=False):
        flags = torch.stack([torch.isfinite(torch.stack([t.amax(), t.amin()]).float()).all()
                             for t in named.values()])
    if bool(flags.all()):
        return
    raise NonFiniteValues([name for name, ok in zip(named, flags.tolist()) if not ok])


def level_key(name: str) -> str:
    """The ``nn.ModuleDict`` key of a level: module names may not contain '.', so '.' -> '__'."""
    return name.replace(".", "__")


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are (tests run the math in fp64): every
    method computes its losses in at least fp32 under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------------------ per-level base
@dataclass
class LevelResult:
    """What :meth:`LevelwiseMethod.forward_level` returns for one level: ``losses`` (kind ->
    weighted 0-dim tensor, becomes ``"<level>.<kind>"``), ``stats`` (name -> detached 0-dim
    tensor, becomes ``"<level>.<name>"`` in :meth:`~DistillMethod.statistics`) and ``tensors``
    (anything: what :meth:`~DistillMethod.inspect` returns for the level)."""

    losses: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)
    tensors: Any = None


class LevelwiseMethod(DistillMethod):
    """A method made of one independent module per tapped level.

    ``Method(teacher_channels={"p3": 256, ...}, student_channels=None | {...}, options=None, **option_kwargs)``:
    ``student_channels`` defaults to the teacher's; the options are an instance of the class's
    ``options_class`` (set by ``@register(name, options=...)``) or its fields as keywords.
    ``self.levels`` is an ``nn.ModuleDict`` keyed by :func:`level_key` of each level name, in the
    order of ``teacher_channels`` (so parameters are created, and the RNG drawn, level by level).

    A subclass implements :meth:`build_level` and :meth:`forward_level`; the base checks the
    inputs (level names, :func:`check_feature_pair` per level, :func:`check_finite` on all of
    them with one host sync unless ``options.check_finite`` is false), detaches the teacher
    features (no gradient ever reaches the teacher), and assembles the loss dict.

    Raises (construction): ValueError / TypeError for bad channel dicts; TypeError for an
    unknown option; ValueError prefixed ``"<Class> level '<name>': "`` for what fails while
    building a level (the options apply to every level, so their range errors name all levels).
    """

    options_class: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(
        self,
        teacher_channels: Mapping[str, int],
        student_channels: Mapping[str, int] | None = None,
        options: MethodOptions | None = None,
        **option_kwargs: Any,
    ) -> None:
        super().__init__()
        label = type(self).__name__
        if not isinstance(teacher_channels, Mapping) or not teacher_channels:
            raise ValueError(f"teacher_channels must be a non-empty dict of level name -> channels, "
                             f"got {teacher_channels!r}")
        student_channels = dict(teacher_channels) if student_channels is None else dict(student_channels)
        if sorted(student_channels) != sorted(teacher_channels):
            raise ValueError(f"student_channels levels {sorted(student_channels)} differ from "
                             f"teacher_channels levels {sorted(teacher_channels)}")
        non_strings = [name for name in teacher_channels if not isinstance(name, str)]
        if non_strings:
            raise TypeError(f"teacher_channels: level names must be strings (the loss keys are "
                            f"'<level>.<kind>'), got {non_strings!r}")
        self.level_names = list(teacher_channels)
        keys = [level_key(n) for n in self.level_names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"level names {self.level_names} collide once '.' is replaced by '__'")
        try:
            self.options = resolve_options(self.options_class, options, option_kwargs, owner=label)
        except OptionError as err:
            where = f"level {self.level_names[0]!r}" if len(self.level_names) == 1 else f"levels {self.level_names}"
            raise ValueError(f"{label} {where}: {err}") from None
        self.check_finite = self.options.check_finite
        self.teacher_channels = {n: teacher_channels[n] for n in self.level_names}
        self.student_channels = {n: student_channels[n] for n in self.level_names}
        levels = {}
        for name, key in zip(self.level_names, keys):
            try:
                check_int("teacher_channels", self.teacher_channels[name], 1)
                check_int("student_channels", self.student_channels[name], 1)
                levels[key] = self.build_level(self.teacher_channels[name], self.student_channels[name], self.options)
            except (TypeError, ValueError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(
                    f"{label} level {name!r}: {err}") from None
        self.levels = nn.ModuleDict(levels)
        self._last_stats: dict[str, Tensor] = {}

    # -- what a method supplies
    def build_level(self, teacher_channels: int, student_channels: int, options: MethodOptions) -> nn.Module:
        """The module of one level (``C_s -> C_t`` alignment and whatever else the method trains)."""
        raise NotImplementedError

    def forward_level(self, level: nn.Module, teacher_feat: Tensor, student_feat: Tensor, batch: Any,
                      name: str) -> LevelResult:
        """One level: ``teacher_feat`` ``(B, C_t, H, W)`` (detached), ``student_feat``
        ``(B, C_s, H_s, W_s)``, both already checked; ``name`` is the level name (e.g. to pick
        the level's stride in ``batch``)."""
        raise NotImplementedError

    # -- what the base provides
    def level(self, name: str) -> nn.Module:
        """The module of level ``name`` (KeyError if there is none)."""
        return self.levels[level_key(name)]

    def _run(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
             batch: Any) -> dict[str, LevelResult]:
        label = type(self).__name__
        check_level_names(self.level_names, teacher_feats, student_feats, label)
        for name in self.level_names:
            check_feature_pair(teacher_feats[name], student_feats[name], self.teacher_channels[name],
                               self.student_channels[name], where=f"level {name!r}")
        if self.check_finite:
            named = {f"teacher_feats[{n!r}]": teacher_feats[n] for n in self.level_names}
            named.update({f"student_feats[{n!r}]": student_feats[n] for n in self.level_names})
            check_finite(named)
        return {name: self.forward_level(self.level(name), teacher_feats[name].detach(), student_feats[name],
                                         batch, name)
                for name in self.level_names}

    def forward(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, Tensor]:
        """Weighted scalar losses keyed ``"<level>.<kind>"``; remembers the statistics."""
        results = self._run(teacher_feats, student_feats, batch)
        losses = {f"{name}.{kind}": value for name, res in results.items() for kind, value in res.losses.items()}
        self._last_stats = {f"{name}.{key}": value for name, res in results.items() for key, value in res.stats.items()}
        return losses

    def statistics(self) -> dict[str, float]:
        """``"<level>.<stat>"`` -> float from the last forward, with one host sync."""
        if not self._last_stats:
            return {}
        values = torch.stack([v.detach() for v in self._last_stats.values()]).tolist()  # one host sync
        return dict(zip(self._last_stats, values))

    @torch.no_grad()
    def inspect(self, teacher_feats: Mapping[str, Tensor], student_feats: Mapping[str, Tensor],
                batch: Any = None) -> dict[str, Any]:
        """``{level: LevelResult.tensors}`` (no grad), for pictures and analysis; the logged
        statistics are not touched."""
        return {name: res.tensors for name, res in self._run(teacher_feats, student_feats, batch).items()}
