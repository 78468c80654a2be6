"""Loading weights from local files, strictly, with errors that say which keys disagree.

Nothing here downloads. ``.pt``/``.pth`` files load with ``torch.load(weights_only=True)``;
``.safetensors`` files load with the ``safetensors`` package when it is installed.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "STATE_DICT_KEYS",
    "InheritReport",
    "WeightsMismatchError",
    "inherit_weights",
    "load_state_dict_file",
    "load_weights_strict",
]

# Where a checkpoint dict may nest the model's weights, tried in this order when the file is
# not a flat ``name -> tensor`` dict: our engine's ``model``/``student``, then common layouts.
STATE_DICT_KEYS = ("model", "student", "state_dict", "model_state_dict", "module")
_SHOW = 10  # keys listed per category in error messages
_BN_COUNTER = "num_batches_tracked"  # BatchNorm2d has it, FrozenBatchNorm2d not: never decisive


class WeightsMismatchError(ValueError):
    """A state dict that does not fit the model it is loaded into (lists the disagreeing keys)."""


def _is_flat_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def load_state_dict_file(path: str | os.PathLike, key: str | None = None) -> dict[str, Tensor]:
    """Read a ``name -> tensor`` dict from a local file, safely (``weights_only=True``).

    A flat dict is returned as is; otherwise the weights are taken from ``obj[key]`` or, with
    ``key=None``, from the first of :data:`STATE_DICT_KEYS` present. A ``module.`` prefix on
    every key (a DistributedDataParallel state dict) is stripped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist (weights are read from local paths only)")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path!r} is a .safetensors file: install the 'safetensors' package") from err
        obj: Any = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot load {path!r} with torch.load(weights_only=True): {err}. Only tensor "
                             f"files (state dicts, or dicts of them) are accepted; re-save the weights with "
                             f"torch.save(model.state_dict(), path)") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("sha256"), str):  # an acamkd checkpoint: check it
        from acamkd.engine.checkpoint import state_digest

        obj = dict(obj)
        if state_digest({k: v for k, v in obj.items() if k != "sha256"}) != obj.pop("sha256"):
            raise ValueError(f"{path!r} is damaged: its tensors do not match the checksum written with them "
                             f"(a disk or copy error); use prev.pt beside it or another copy")
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"{path!r} has no entry {key!r}; top-level keys: {found}")
        obj = obj[key]
    elif not _is_flat_state(obj) and isinstance(obj, Mapping):
        nested = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            raise ValueError(f"{path!r} is neither a flat state dict nor has one under {list(STATE_DICT_KEYS)}; "
                             f"top-level keys: {sorted(map(str, obj))[:20]}")
        obj = obj[nested]
    if not _is_flat_state(obj):
        raise ValueError(f"{path!r}: expected a dict of parameter name -> tensor, got {type(obj).__name__}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"\n  {title} ({len(items)}): {items[:_SHOW]}{more}"


def load_weights_strict(model: nn.Module, state: Mapping[str, Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model``: every key and shape must match, or raise
    :class:`WeightsMismatchError` naming ``source`` (the file), ``arch`` and the first keys that
    are missing, unexpected or of another shape. BatchNorm ``num_batches_tracked`` counters are
    ignored either way, so a BatchNorm2d and a FrozenBatchNorm2d model load each other's weights.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_BN_COUNTER)]
    unexpected = [k for k in state if k not in own and not k.endswith(_BN_COUNTER)]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise WeightsMismatchError(
            f"weights in {source!r} do not fit {arch}: is the file for another architecture, backbone or "
            f"number of classes?" + _listing("missing in file", missing) + _listing("unexpected in file", unexpected)
            + _listing("shape mismatch", shapes))
    merged = {k: v for k, v in state.items() if not k.endswith(_BN_COUNTER)}
    merged.update({k: state.get(k, v) for k, v in own.items() if k.endswith(_BN_COUNTER)})
    model.load_state_dict(merged, strict=True)


class InheritReport(NamedTuple):
    """What :func:`inherit_weights` did: ``copied`` names, ``skipped`` name -> reason."""

    copied: list[str]
    skipped: dict[str, str]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module,
                    prefixes: Iterable[str] = ("backbone.fpn", "head", "rpn", "roi_heads"),
                    all_or_nothing: bool = False) -> InheritReport:
    """Copy into ``student`` every teacher tensor under ``prefixes`` whose name and shape match.

    The paper's inheritance strategy (the student starts from the teacher's neck and head),
    tensor by tensor as FGD's ``init_student`` does (a non-strict load). With
    ``all_or_nothing`` a prefix is copied only when every student tensor under it matches:
    for heads with BatchNorm, a partial copy would put the teacher's statistics behind a
    randomly initialised conv. Pass unwrapped modules (not DDP). Returns the copied names and,
    for the rest under the prefixes of either model, why they were skipped.
    """
    prefixes = tuple(prefixes)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    copied, skipped = [], {}
    for name, s_tensor in s_state.items():
        if not _under(name, prefixes):
            continue
        t_tensor = t_state.get(name)
        if t_tensor is None:
            skipped[name] = "not in teacher"
        elif t_tensor.shape != s_tensor.shape:
            skipped[name] = f"shape: teacher {tuple(t_tensor.shape)} vs student {tuple(s_tensor.shape)}"
        else:
            copied.append(name)
    if all_or_nothing:
        incomplete = {p for p in prefixes if any(_under(n, (p,)) for n in skipped)}
        for name in [n for n in copied if _under(n, tuple(incomplete))]:
            copied.remove(name)
            skipped[name] = "matches, but other tensors of its part do not (all_or_nothing)"
    for name in copied:
        s_state[name].copy_(t_state[name])  # state_dict tensors share storage with the parameters
    skipped.update({n: "not in student" for n in t_state if _under(n, prefixes) and n not in s_state})
    return InheritReport(copied, skipped)
