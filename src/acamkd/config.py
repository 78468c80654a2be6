"""Typed configuration: nested dataclasses, YAML files with ``_base_`` inheritance, dotted
command-line overrides (``train.epochs=2 data.root=/data/coco``).

The first half is a small mechanism that knows nothing about the schema: it reads YAML
(remembering the file and line of every key), merges bases, applies overrides and turns plain
dicts into dataclasses, checking every value against its field's annotation. The second half
is the schema (:class:`Config` and its sections) and :func:`validate`, the cross-field rules.

Rules of the files (``configs/README.md``): ``_base_: other.yaml`` (or a list, paths relative
to the file) is loaded first and the file is merged on top: mappings merge key by key, lists
and scalars replace; a mapping holding ``_replace_: true`` replaces the base's mapping whole.
Override values are YAML (``train.steps=[16,22]``, ``teacher=null``); an override replaces the
value at its key. Relative paths inside a config (``data.root``, ``train.output_dir``) are
relative to the working directory.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ARCHS_BY_TASK", "TASKS_BY_DATASET", "Config", "ConfigError", "check_schema", "DataConfig", "EvalConfig",
    "MethodConfig", "ModelConfig", "ShapesConfig", "TrainConfig", "apply_overrides", "config_from_dict",
    "dump_yaml", "load_config", "parse_override", "to_dict", "validate",
]


class ConfigError(ValueError):
    """A configuration problem. The message names the dotted key and where the value came from
    (``file:line`` or the command-line override)."""


# ==================================================================================== mechanism
BASE_KEY = "_base_"
REPLACE_KEY = "_replace_"
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1e-4: PyYAML reads it as a string
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")
_NONE = type(None)


@dataclass
class _Ctx:
    root: type
    origins: dict[str, str]  # dotted key -> "at FILE:LINE" / "from override 'K=V'"; "" -> "in FILE"

    def where(self, key: str) -> str:
        """`` (at configs/x.yaml:12)`` for ``key`` or its closest ancestor with a known origin."""
        while True:
            if key in self.origins:
                return f" ({self.origins[key]})"
            if not key:
                return ""
            key = key.rpartition(".")[0]


class _Loader(yaml.SafeLoader):
    pass


def _construct(loader: _Loader, node: yaml.Node, path: str, prefix: str, origins: dict[str, str]) -> Any:
    """Build Python data from a YAML node, recording ``file:line`` for every mapping key."""
    if not isinstance(node, yaml.MappingNode):
        return loader.construct_object(node, deep=True)
    explicit = {id(k) for k, _ in node.value}
    loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor) come first, explicit keys override them
    out: dict[Any, Any] = {}
    seen = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        dotted = f"{prefix}.{key}" if prefix else str(key)
        at = f"{path}:{key_node.start_mark.line + 1}"
        if id(key_node) in explicit:
            if key in seen:
                raise ConfigError(f"{at}: duplicate key {dotted!r} (YAML would silently keep only the last one)")
            seen.add(key)
        out[key] = _construct(loader, value_node, path, dotted, origins)
        origins[dotted] = f"at {at}"
    return out


def _read_yaml(path: str) -> tuple[dict, dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    origins = {"": f"in {path}"}
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        data = {} if node is None else _construct(loader, node, path, "", origins)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = " ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise ConfigError(f"{at}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (student:, train:, ...), "
                          f"got {type(data).__name__} {data!r}")
    return data, origins


def _merge(dst: dict, src: Mapping) -> dict:
    """Deep-merge ``src`` into ``dst`` (in place, returned): mappings merge, anything else
    replaces; a mapping holding ``_replace_: true`` replaces whole. ``src`` is never aliased."""
    for k, v in src.items():
        if isinstance(v, Mapping):
            keep = isinstance(dst.get(k), dict) and v.get(REPLACE_KEY) is not True
            dst[k] = _merge(dst[k] if keep else {}, {kk: vv for kk, vv in v.items() if kk != REPLACE_KEY})
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _read_with_bases(path: str, chain: tuple[str, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Load ``path`` with its ``_base_`` files merged underneath (depth first, in list order)."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"_base_ cycle: {' -> '.join(chain + (real,))}")
    data, origins = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    at = origins.pop(BASE_KEY, f"in {path}")
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"_base_ must be a file name or a list of file names ({at}), got {bases!r}")
    merged: dict = {}
    merged_origins: dict[str, str] = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"_base_ file {base!r} not found ({at}; looked for {base_path})")
        base_data, base_origins = _read_with_bases(base_path, chain + (real,))
        _merge(merged, base_data)
        merged_origins.update(base_origins)
    _merge(merged, data)
    merged_origins.update(origins)
    return merged, merged_origins


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=[16,22]"`` -> ``("train.steps", [16, 22])``: the value is read as YAML."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. train.epochs=2 "
                          f"or data.root=/data/coco")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          f"quote a string with special characters: {key}='\"...\"'") from None


def _set_override(raw: dict, text: str, origins: dict[str, str]) -> None:
    key, value = parse_override(text)
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
            origins[".".join(parts[:i + 1])] = f"from override {text!r}"
        elif not isinstance(node[part], dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is {node[part]!r}, not a section "
                              f"or mapping, so it has no key {parts[i + 1]!r}; set it whole instead")
        node = node[part]
    node[parts[-1]] = value
    for k in [k for k in origins if k.startswith(key + ".")]:  # the override now explains all below it
        del origins[k]
    origins[key] = f"from override {text!r}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The type hints of ``cls``'s dataclass fields (class variables, e.g. a method's
    ``task_defaults``, are not config keys)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    return {k: v for k, v in typing.get_type_hints(cls).items() if names is None or k in names}


def _unwrap(tp: Any) -> Any:
    """The dataclass inside ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not _NONE]
        return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None
    return None


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out.append(prefix + name)
        if _unwrap(tp) is not None:
            out += _all_keys(_unwrap(tp), f"{prefix}{name}.")
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is _NONE else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


_SCALARS = (bool, int, float, str)


def check_schema(cls: type, prefix: str = "") -> None:
    """Raise ``TypeError`` naming the first field of dataclass ``cls`` whose annotation the config
    cannot check: fields must be bool, int, float, str, ``Any``, ``Literal[...]``, ``list[X]``,
    ``dict[str, X]``, a nested dataclass, or ``X | None`` of those (what YAML can express)."""

    def ok(tp: Any) -> bool:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp in _SCALARS or tp is Any or tp is _NONE or tp is dict or dataclasses.is_dataclass(tp):
            return True
        if origin is Literal:
            return all(isinstance(a, _SCALARS) for a in args)
        if origin is list:
            return not args or ok(args[0])
        if origin is dict:
            return not args or (args[0] is str and ok(args[1]))
        if origin in (Union, types.UnionType):
            return all(ok(a) for a in args)
        return False

    for name, tp in _hints(cls).items():
        if not ok(tp):
            raise TypeError(f"{cls.__name__}.{prefix}{name}: annotation {tp!r} cannot be checked in a config; use "
                            f"bool, int, float, str, Literal[...], list[X], dict[str, X], a dataclass, or X | None")
        inner = _unwrap(tp)
        if inner is not None:
            check_schema(inner, f"{prefix}{name}.")


def _mismatch(tp: Any, value: Any, key: str, ctx: _Ctx, hint: str = "") -> ConfigError:
    if not hint and tp is str and isinstance(value, (bool, int, float)):
        hint = f"; quote it to make it a string: \"{value}\" (on a command line: {key}='\"{value}\"')"
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
                       f"{ctx.where(key)}{hint}")


def _plain(value: Any, key: str, ctx: _Ctx) -> Any:
    """Free-form data (``Any``): YAML-representable values only, tuples become lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{key}.{k}", ctx) for k, v in value.items()}
    raise ConfigError(f"{key}: free-form values must be numbers, strings, booleans, null, lists or mappings, "
                      f"got {type(value).__name__} {value!r}{ctx.where(key)}")


def _convert(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (mappings become
    dataclasses, ints and numeric strings such as ``1e-4`` become floats where floats are expected)."""
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, key, ctx)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        rest = [a for a in args if a is not _NONE]
        inner = rest[0] if len(rest) == 1 else None
        shape = {list: (list, tuple), dict: Mapping}.get(typing.get_origin(inner)) or (
            (Mapping, inner) if _unwrap(inner) else None)
        if shape and isinstance(value, shape):
            return _convert(inner, value, key, ctx)  # errors inside a list or section are more precise
        for a in rest:
            try:
                return _convert(a, value, key, ctx)
            except ConfigError:
                pass
        raise _mismatch(tp, value, key, ctx)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        names = {str(a).lower(): repr(a) for a in args}
        close = [names[c] for c in difflib.get_close_matches(str(value).lower(), names, n=1, cutoff=0.5)]
        raise _mismatch(tp, value, key, ctx, hint=f"; did you mean {close[0]}?" if close else "")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, key, ctx)
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, key, ctx)
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{key}: keys must be strings, got {bad[0]!r}{ctx.where(key)}")
        return {k: _convert(args[1] if args else Any, v, f"{key}.{k}", ctx) for k, v in value.items()}
    if tp is Any:
        return _plain(value, key, ctx)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    checks = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if tp not in checks:
        raise TypeError(f"config field {key}: unsupported annotation {tp!r}")  # a schema bug, not a user error
    if not isinstance(value, checks[tp]) or (isinstance(value, bool) and tp is not bool):
        raise _mismatch(tp, value, key, ctx)
    if tp is float and not math.isfinite(value):
        raise _mismatch(tp, value, key, ctx, hint="; it must be finite")
    return float(value) if tp is float else value


def _from_mapping(cls: type, value: Any, key: str, ctx: _Ctx) -> Any:
    if isinstance(value, cls):
        value = to_dict(value)  # re-check a ready-made section like any other input
    if not isinstance(value, Mapping):
        raise _mismatch(cls, value, key or "the config", ctx)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in value:
        if k not in fields:
            full = f"{key}.{k}" if key else str(k)
            near = [f"{key}.{n}" if key else n for n in difflib.get_close_matches(str(k), fields, n=3)]
            near += [p for p in _all_keys(ctx.root) if p.rpartition(".")[2] == str(k) and p not in near]
            hint = (f"did you mean {' or '.join(map(repr, near))}?" if near
                    else f"{key or 'the top level'} has: {', '.join(fields)}")
            raise ConfigError(f"unknown key {full!r}{ctx.where(full)}; {hint}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {sub!r} ({_type_name(hints[name])}){ctx.where(key)}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts and lists (what :func:`dump_yaml` writes)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the full, resolved config (every field, no ``_base_``), atomically."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def config_from_dict(d: Mapping, _origins: dict[str, str] | None = None) -> Config:
    """Build and :func:`validate` a :class:`Config` from plain nested dicts."""
    ctx = _Ctx(Config, _origins if _origins is not None else {})
    return _validate(_from_mapping(Config, d, "", ctx), ctx)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new, validated config with ``["train.epochs=2", ...]`` applied; ``cfg`` is unchanged."""
    return _overridden(to_dict(cfg), {}, overrides)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``_base_`` files merged underneath; None: the defaults), apply
    dotted overrides, check types and cross-field rules. Every error is a :class:`ConfigError`."""
    raw, origins = _read_with_bases(os.fspath(path)) if path is not None else ({}, {})
    return _overridden(raw, origins, overrides)


def _overridden(raw: dict, origins: dict[str, str], overrides: Sequence[str]) -> Config:
    for text in [overrides] if isinstance(overrides, str) else overrides:  # a lone "k=v" is one override
        _set_override(raw, text, origins)
    return config_from_dict(raw, origins)


# ======================================================================================= schema
Task = Literal["detection", "segmentation"]
# Model names live in one place, the model registry (acamkd.models.registry); _problems checks them.
Arch = str  # a registered model of the task: acamkd.models.list_models(task)
Backbone = str  # a backbone that arch accepts: acamkd.models.list_backbones(arch)


def __getattr__(name: str) -> Any:
    """``ARCHS_BY_TASK`` (task -> registered model names), read from the model registry on access
    (it imports torch, so not at import)."""
    if name == "ARCHS_BY_TASK":
        from acamkd.models.registry import list_models, list_tasks

        return {task: tuple(list_models(task)) for task in list_tasks()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TASKS_BY_DATASET: dict[str, tuple[str, ...]] = {"coco": ("detection",), "cityscapes": ("segmentation",),
                                                "shapes": ("detection", "segmentation")}


@dataclass(kw_only=True)
class ModelConfig:
    """One network: the model a run trains (``student``) or the frozen one it learns from (``teacher``)."""

    task: Task = "detection"
    arch: Arch  # a registered model of `task` (acamkd.models.list_models): e.g. retinanet, fcos; deeplabv3
    backbone: Backbone  # feature extractor (detectors put an FPN on it); one of acamkd.models.list_backbones(arch)
    num_classes: int | None = None  # foreground classes; None: the dataset's count
    pretrained: str | None = None  # local file of ImageNet backbone weights (torchvision's); nothing downloads
    checkpoint: str | None = None  # full model weights, loaded strictly (`distill` needs the teacher's)
    taps: list[str] | None = None  # module names whose outputs are distilled; None: every FPN level / the logits
    norm: Literal["auto", "bn", "frozen_bn", "syncbn"] = "auto"  # backbone norm; auto: frozen_bn if pretrained else bn
    trainable_layers: int | None = None  # backbone stages that train, 0-5; None: 3 if pretrained else 5 (torchvision)
    aux_head: bool | None = None  # segmentation: auxiliary FCN head on layer3, loss x0.4; None: ResNets on, MobileNetV2 off


@dataclass(kw_only=True)
class ShapesConfig:
    """The built-in dataset (``acamkd.data.synthetic.make_shapes``), generated into ``data.root`` once."""

    train: int = 200  # training images
    val: int = 50  # validation images
    size: list[int] = field(default_factory=lambda: [256, 320])  # [height, width] of every image
    difficulty: Literal["easy", "normal", "hard"] = "normal"
    seed: int = 0  # same parameters, same bytes


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are batched and augmented."""

    dataset: Literal["coco", "cityscapes", "shapes"] = "shapes"
    root: str = "data/shapes"  # dataset folder (shapes: generated here, <root>/coco and <root>/cityscapes)
    img_dir: str | None = None  # COCO image folder if not <root>/<split>2017; "{split}" becomes the split name
    ann_file: str | None = None  # COCO annotations if not under <root>/annotations; must contain "{split}"
    train_split: str = "train"
    val_split: str = "val"
    min_size: int = 256  # detection: shorter side resized to this (paper: 800) ...
    max_size: int = 320  # ... unless the longer side would exceed this (paper: 1333)
    crop: list[int] | None = None  # segmentation: random [height, width] crop; None: whole image
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # segmentation: random rescale range
    flip_prob: float = 0.5  # horizontal flip probability in training
    # Your own classes (README "Your own data"). Segmentation: train ids 0..K-1 plus the ignore label.
    num_classes: int | None = None  # segmentation: K; None: from class_names, <root>/classes.txt, else the dataset's
    class_names: list[str] | None = None  # segmentation: one name per train id; None: <root>/classes.txt, else the dataset's
    ignore_index: int = 255  # segmentation: the label of unlabelled pixels (not scored, never a train id)
    categories: list[int | str] | None = None  # detection: COCO category ids or names to use (labels in id order); None: all
    batch_size: int = 4  # images per process (per GPU) and step
    workers: int = 2  # DataLoader worker processes per process
    on_bad_image: Literal["error", "skip"] = "error"  # an unreadable image stops the run, or is skipped and logged
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass(kw_only=True)
class MethodConfig:
    """The distillation method; ``name: null`` trains without one. ``options`` stays a plain dict
    (of the keys given, the defaults are the method's), checked when the config is loaded
    against the method's options dataclass (``acamkd.methods.options_class(name)``); the engine
    gets the typed options with ``acamkd.methods.parse_options(name, options)``."""

    name: str | None = None  # registered method (acamkd.methods.available()), e.g. "acam"
    options: dict[str, Any] = field(default_factory=dict)  # that method's options; free-form when name is null


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, schedule and bookkeeping. Counts marked "unit" are epochs when ``epochs`` is
    set, iterations (optimizer steps) when ``iterations`` is."""

    epochs: int | None = 12  # training length in epochs; exactly one of epochs / iterations
    iterations: int | None = None  # training length in optimizer steps
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # used as given, whatever the process count (scale it yourself for another total batch)
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 1e-4
    schedule: Literal["step", "cosine", "poly"] = "step"
    steps: list[int] = field(default_factory=lambda: [8, 11])  # step schedule: decay lr by gamma at these (unit)
    gamma: float = 0.1  # step schedule: lr factor at each step
    poly_power: float = 0.9  # poly schedule: lr * (1 - t/T) ** poly_power
    min_lr: float = 0.0  # cosine / poly: final learning rate
    warmup_iters: int = 100  # linear warm-up over this many iterations (0: none)
    warmup_ratio: float = 0.001  # warm-up starts at lr * warmup_ratio
    grad_clip: float | None = None  # max gradient norm (paper: 35); None: no clipping
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast on GPU (fp16 adds a gradient scaler)
    seed: int = 0
    log_every: int = 20  # iterations between JSON-lines log records
    val_every: int = 1  # validate every N (unit); 0: only at the end
    checkpoint_every: int = 1  # checkpoint every N (unit); 0: only at the end
    output_dir: str = "runs/default"  # checkpoints, logs, metrics and the resolved config go here
    inherit_teacher: bool = False  # copy the teacher's neck + head weights where shapes match (paper)
    eval_teacher_first: bool = True  # distill: evaluate the teacher at step 0 (catches a teacher that did not load)


@dataclass(kw_only=True)
class EvalConfig:
    """Validation and ``acamkd eval``."""

    batch_size: int | None = None  # None: data.batch_size
    score_thresh: float = 0.05  # detection: drop boxes scoring below this
    max_detections: int = 100  # detection: boxes kept per image (COCO AP counts 100)
    sliding_window: bool = False  # segmentation: predict window by window instead of the whole image
    window: list[int] | None = None  # sliding window [height, width]
    stride: list[int] | None = None  # sliding window step [height, width]


@dataclass(kw_only=True)
class Config:
    """One experiment. ``acamkd train`` trains ``student`` (which may be a future teacher);
    ``acamkd distill`` trains ``student`` from ``teacher`` with ``method``."""

    student: ModelConfig
    teacher: ModelConfig | None = None  # required when method.name is set
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _pair(value: list | None, key: str, minimum: int = 1) -> list[tuple[str, str]]:
    if value is None or (len(value) == 2 and all(v >= minimum for v in value)):
        return []
    return [(key, f"must be [height, width] with both >= {minimum}, got {value!r}")]


def _arch_problems(key: str, m: ModelConfig) -> list[tuple[str, str]]:
    """``arch`` must be a registered model of ``task``, ``backbone`` one of its backbones (the registry
    imports torch: read here, not at import)."""
    from acamkd.models.registry import did_you_mean, get_model_spec, list_models, list_tasks

    known = list_models(m.task)
    if m.arch not in known:
        other = [t for t in list_tasks() if t != m.task and m.arch in list_models(t)]
        why = f" (it is a {other[0]} one: set {key}.task={other[0]})" if other else ""
        return [(f"{key}.arch", f"{m.arch!r} is not a {m.task} architecture{why}{did_you_mean(m.arch, known)}")]
    backbones = get_model_spec(m.arch).backbones
    if m.backbone not in backbones:
        return [(f"{key}.backbone",
                 f"{m.backbone!r} is not a backbone of {m.arch}{did_you_mean(m.backbone, backbones)}")]
    return []


def _class_problems(cfg: Config) -> list[tuple[str, str]]:
    """``data.num_classes``/``class_names``/``ignore_index`` (segmentation) and ``data.categories``
    (detection): each for its task, counts that agree with each other and with the models'."""
    d, task = cfg.data, cfg.student.task
    p: list[tuple[str, str]] = []
    if task == "detection":
        for key, value, default in (("num_classes", d.num_classes, None), ("class_names", d.class_names, None),
                                    ("ignore_index", d.ignore_index, 255)):
            if value != default:
                p.append((f"data.{key}", ("is for segmentation; a detector's classes are its COCO file's "
                                          "categories: choose some with data.categories=[id or name, ...]")))
    elif d.categories is not None:
        p.append(("data.categories", ("is for detection (COCO categories); a segmenter's classes are "
                                      "data.num_classes and data.class_names: set data.categories=null")))
    if d.categories is not None:
        repeated = sorted({str(c) for c in d.categories if d.categories.count(c) > 1})
        if not d.categories:
            p.append(("data.categories", "is empty: name at least one category (id or name), or null for all"))
        elif repeated:
            p.append(("data.categories", f"lists {', '.join(repeated)} more than once"))
    if d.num_classes is not None and d.num_classes < 1:
        p.append(("data.num_classes", f"must be >= 1 or null (from the dataset), got {d.num_classes}"))
    names = d.class_names
    if names is not None:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if not names or any(not n.strip() for n in names):
            p.append(("data.class_names", f"needs one non-empty name per class (train id), got {names!r}"))
        elif repeated:
            p.append(("data.class_names", f"repeats {', '.join(map(repr, repeated))}: every class needs its own "
                                          f"name (the per-class IoU keys)"))
        elif d.num_classes is not None and d.num_classes != len(names):
            p.append(("data.class_names", f"has {len(names)} names but data.num_classes is {d.num_classes}: give "
                                          f"one name per train id 0..{d.num_classes - 1}, or drop data.num_classes"))
    classes = d.num_classes if d.num_classes is not None else (len(names) if names else None)
    if d.ignore_index < 0 or (classes is not None and d.ignore_index < classes):
        p.append(("data.ignore_index", (f"{d.ignore_index} is not a label outside the train ids 0.."
                                        f"{(classes or 1) - 1}: pick the value your label maps use for "
                                        f"unlabelled pixels (e.g. 255)")))
    if task == "segmentation" and classes is not None:
        for role in ("student", "teacher"):
            m = getattr(cfg, role)
            if m is not None and m.num_classes is not None and m.num_classes != classes:
                p.append((f"{role}.num_classes", (f"{m.num_classes} but the data has {classes} classes (data."
                                                  f"{'num_classes' if d.num_classes is not None else 'class_names'}):"
                                                  f" set {role}.num_classes={classes}, or null to follow the data")))
    return p


def _problems(cfg: Config) -> list[tuple[str, str]]:
    """Cross-field rules: (dotted key, what is wrong and what to do)."""
    p: list[tuple[str, str]] = _class_problems(cfg)
    t, d, e = cfg.train, cfg.data, cfg.eval
    models = [("student", cfg.student)] + ([("teacher", cfg.teacher)] if cfg.teacher else [])
    for name, m in models:
        p += _arch_problems(name, m)
        if m.num_classes is not None and m.num_classes < 1:
            p.append((f"{name}.num_classes", f"must be >= 1 or null (from the dataset), got {m.num_classes}"))
        if m.trainable_layers is not None and not 0 <= m.trainable_layers <= 5:
            p.append((f"{name}.trainable_layers", f"must be in 0..5 or null, got {m.trainable_layers}"))
        if m.taps is not None and not m.taps:
            p.append((f"{name}.taps", "is empty: name at least one module, or null for the defaults"))
        if m.task == "detection" and m.aux_head is not None:
            p.append((f"{name}.aux_head", "is for segmenters; detectors have none: set it to null"))
        if m.task == "segmentation" and m.trainable_layers is not None:
            p.append((f"{name}.trainable_layers", "is for detectors (segmenters train every stage): set it to null"))
        if m.task == "segmentation" and m.norm == "frozen_bn":
            p.append((f"{name}.norm", "frozen_bn is for detectors; segmenters train their BatchNorm (auto, bn, syncbn)"))
    if cfg.teacher is not None and cfg.teacher.task != cfg.student.task:
        p.append(("teacher.task", f"{cfg.teacher.task!r} differs from student.task {cfg.student.task!r}"))
    if cfg.method.name is not None and cfg.teacher is None:
        p.append(("teacher", (f"method.name is {cfg.method.name!r} but there is no teacher: add a teacher "
                             f"section, or set method.name=null to train without distillation")))
    if t.inherit_teacher and cfg.teacher is None:
        p.append(("train.inherit_teacher", "is true but there is no teacher to inherit from"))
    if cfg.student.task not in TASKS_BY_DATASET[d.dataset]:
        p.append(("data.dataset", (f"{d.dataset!r} has no {cfg.student.task} labels "
                                  f"(it serves {', '.join(TASKS_BY_DATASET[d.dataset])})")))
    if d.ann_file is not None and "{split}" not in d.ann_file:
        p.append(("data.ann_file", (f"must contain '{{split}}' so train and val read their own annotations, "
                                   f"got {d.ann_file!r}")))
    for key, value, low in (("data.batch_size", d.batch_size, 1), ("data.workers", d.workers, 0),
                            ("data.min_size", d.min_size, 1), ("data.shapes.train", d.shapes.train, 0),
                            ("data.shapes.val", d.shapes.val, 0), ("data.shapes.seed", d.shapes.seed, 0),
                            ("train.accumulate", t.accumulate, 1), ("train.warmup_iters", t.warmup_iters, 0),
                            ("train.log_every", t.log_every, 1), ("train.val_every", t.val_every, 0),
                            ("train.checkpoint_every", t.checkpoint_every, 0),
                            ("eval.max_detections", e.max_detections, 1)):
        if value < low:
            p.append((key, f"must be >= {low}, got {value}"))
    if cfg.student.task == "segmentation" and d.batch_size == 1:  # BatchNorm over one value per channel fails
        p.append(("data.batch_size", (f"is 1, but the segmentation student ({cfg.student.arch}) trains BatchNorm on "
                                      f"1x1 pooled maps (ASPP image pooling, PSP bin 1), which needs >= 2 images per "
                                      f"process: set data.batch_size=2 or more (train.accumulate does not help, "
                                      f"the rule holds per micro-batch; lower data.crop to save memory). To "
                                      f"evaluate one image at a time, set eval.batch_size=1 instead")))
    if e.batch_size is not None and e.batch_size < 1:
        p.append(("eval.batch_size", f"must be >= 1 or null (data.batch_size), got {e.batch_size}"))
    if d.max_size < d.min_size:
        p.append(("data.max_size", f"{d.max_size} is below data.min_size {d.min_size}"))
    p += _pair(d.crop, "data.crop") + _pair(d.shapes.size, "data.shapes.size", 64)
    p += _pair(e.window, "eval.window") + _pair(e.stride, "eval.stride")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        p.append(("data.scale_range", f"must be [low, high] with 0 < low <= high, got {d.scale_range}"))
    if not 0 <= d.flip_prob <= 1:
        p.append(("data.flip_prob", f"must be in [0, 1], got {d.flip_prob}"))
    if e.sliding_window and (e.window is None or e.stride is None):
        p.append(("eval.window", "eval.sliding_window needs both eval.window and eval.stride ([height, width])"))
    elif e.sliding_window and any(s > w for s, w in zip(e.stride, e.window)):
        p.append(("eval.stride", f"{e.stride} exceeds eval.window {e.window}: pixels would be skipped"))
    if (t.epochs is None) == (t.iterations is None):
        have = "neither is set" if t.epochs is None else f"both are ({t.epochs} and {t.iterations})"
        p.append(("train.epochs", (f"set exactly one of train.epochs and train.iterations, {have}; "
                                  f"e.g. train.iterations=1000 train.epochs=null")))
    total = t.epochs if t.epochs is not None else t.iterations
    if total is not None and total < 1:
        p.append(("train.epochs" if t.epochs is not None else "train.iterations", f"must be >= 1, got {total}"))
    if t.lr <= 0:
        p.append(("train.lr", f"must be > 0, got {t.lr}"))
    for key, value in (("train.weight_decay", t.weight_decay), ("train.min_lr", t.min_lr),
                       ("train.poly_power", t.poly_power)):
        if value < 0:
            p.append((key, f"must be >= 0, got {value}"))
    if not 0 <= t.momentum < 1:
        p.append(("train.momentum", f"must be in [0, 1), got {t.momentum}"))
    if not 0 < t.gamma <= 1:
        p.append(("train.gamma", f"must be in (0, 1], got {t.gamma}"))
    if not 0 < t.warmup_ratio <= 1:
        p.append(("train.warmup_ratio", f"must be in (0, 1], got {t.warmup_ratio}"))
    if t.grad_clip is not None and t.grad_clip <= 0:
        p.append(("train.grad_clip", f"must be > 0 or null (no clipping), got {t.grad_clip}"))
    if t.schedule == "step" and (any(b <= a for a, b in zip(t.steps, t.steps[1:]))
                                 or any(s < 1 or (total is not None and s >= total) for s in t.steps)):
        unit = "epochs" if t.epochs is not None else "iterations"
        p.append(("train.steps", f"must be increasing, each in 1..{total}-1 ({unit}), got {t.steps}"))
    return p


def _logit_classes(cfg: Config) -> int | None:
    """The class count when a segmentation run distils its default taps (the logits: one channel
    per class), else None. Unreadable or inconsistent class settings give None here: the dataset
    raises the named error when the run builds it."""
    if cfg.student.task != "segmentation" or cfg.student.taps or (cfg.teacher is not None and cfg.teacher.taps):
        return None
    from acamkd.engine.segmentation import configured_class_names  # imports torch: only for a named method

    try:
        return len(configured_class_names(cfg.data))
    except ValueError:
        return None


def _method_problems(cfg: Config, ctx: _Ctx) -> list[tuple[str, str]]:
    """``method.name`` must be registered (a problem, with close matches); ``method.options`` are
    checked against that method's options dataclass with the same machinery as every section
    (unknown key, type, range: one ConfigError naming ``method.options.<key>`` and its origin)
    and replaced by the complete options, defaults included, so the resolved config (``config.yaml``,
    experiment cache keys, resume checks) records every value the method uses. An options class with
    ``num_masks`` (ACAM-KD's M) left unset gets the class count when a segmentation run distils the
    logits (:func:`_logit_classes`), as the paper sets M = 19 on Cityscapes. A method registered for
    other tasks only (FGD: detection) is a problem naming the methods that fit; an option left unset
    takes the options class's ``task_defaults`` for the student's task (CWD: weight 5 on segmentation)."""
    name = cfg.method.name
    if name is None:
        if cfg.method.options:
            logging.getLogger("acamkd").warning(
                "method.options %s%s are ignored: method.name is null (no distillation)",
                sorted(cfg.method.options), ctx.where("method.options"))
        return []
    from acamkd import methods  # imports torch: only here, when a config names a method

    if name not in methods.available():
        close = difflib.get_close_matches(name, methods.available(), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return [("method.name", f"unknown method {name!r}; {hint}registered: {', '.join(methods.available())}")]
    task, tasks = cfg.student.task, methods.method_tasks(name)
    if task not in tasks:
        fit = [m for m in methods.available() if task in methods.method_tasks(m)]
        return [("method.name", f"method {name!r} applies to {' and '.join(tasks)} only, and student.task is "
                                f"{task!r}{ctx.where('student.task')}; methods for {task}: {', '.join(fit)}")]
    options_cls = methods.options_class(name)
    fields = [f.name for f in dataclasses.fields(options_cls) if f.init]
    foreign = [k for k in cfg.method.options if k not in fields]
    if foreign and not any(difflib.get_close_matches(str(k), fields, n=1) for k in foreign):
        # Not typos: most often the options of another method (a base config's), after method.name
        # was changed. Say so, and how to replace the section.
        key = f"method.options.{foreign[0]}"
        raise ConfigError(f"method.options {foreign} are not options of method {name!r} (method.name"
                          f"{ctx.where('method.name')}; options{ctx.where(key)}); {name!r} has: {', '.join(fields)}. "
                          f"To replace the whole section, override method.options={{}} or method.options={{key: "
                          f"value, ...}} (in a YAML file: _replace_: true under options)")
    for key, value in options_cls.task_defaults.get(task, {}).items():
        if key not in cfg.method.options:  # e.g. CWD's weight 5 on segmentation logits (MMRazor)
            cfg.method.options = {**cfg.method.options, key: value}
            ctx.origins.setdefault(f"method.options.{key}", f"default of {name!r} for {task}")
    if "num_masks" in fields and "num_masks" not in cfg.method.options:
        classes = _logit_classes(cfg)
        if classes is not None:  # the paper's M for logits: one mask per class (19 on Cityscapes)
            cfg.method.options = {**cfg.method.options, "num_masks": classes}
            ctx.origins.setdefault("method.options.num_masks", f"default: M = the {classes} segmentation classes")
    try:
        typed = _from_mapping(options_cls, cfg.method.options, "method.options", ctx)
    except methods.OptionError as err:  # a range check of the options dataclass
        key = f"method.options.{err.option}"
        raise ConfigError(f"{key}: {err.reason}{ctx.where(key)}") from None
    cfg.method.options = {k: getattr(typed, k) for k in fields}
    return []


def _validate(cfg: Config, ctx: _Ctx) -> Config:
    problems = _method_problems(cfg, ctx) + _problems(cfg)
    if problems:
        lines = [f"  {key}: {msg}{ctx.where(key)}" for key, msg in problems]
        raise ConfigError(f"invalid config{ctx.where('')}:\n" + "\n".join(lines))
    return cfg


def validate(cfg: Config) -> Config:
    """Check the cross-field rules; raise one :class:`ConfigError` listing every problem."""
    return _validate(cfg, _Ctx(Config, {}))
