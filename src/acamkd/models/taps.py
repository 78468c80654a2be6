"""Record the outputs of named submodules of any ``nn.Module`` by forward hooks.

``taps = FeatureTaps(model, ["layer3", "layer4"])``; run ``model(x)`` as usual (one forward,
gradients kept); ``taps.features()`` is ``{"layer3": (B, C, H, W), "layer4": ...}``. A module
returning a dict (torchvision's FPN ``OrderedDict``) gives ``<alias>.<key>`` entries, a list or
tuple ``<alias>.<i>``; ``rename`` maps those flat names to level names (``{"backbone.0": "p3"}``).
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureTaps", "tap_channels"]


def _flatten(name: str, value: Any, out: dict[str, Tensor]) -> None:
    """Tensors under ``name``; dicts and sequences recurse with ``.key``/``.i``; others are dropped."""
    if isinstance(value, Tensor):
        out[name] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{name}.{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(f"{name}.{i}", item, out)


class FeatureTaps:
    """Forward hooks on named submodules of ``model``; the last forward's outputs by name.

    ``taps``: module paths as in ``model.named_modules()`` (recorded under the path), or a
    mapping ``alias -> module path``. Records are cleared when ``model``'s forward starts (call
    :meth:`clear` when running a submodule directly), so stale features never leak. If a
    tapped module runs several times in one forward, the last call wins. Outputs are kept
    as they are (no copy, gradients intact): tap a module whose output the model does not
    later modify in place (e.g. not a BatchNorm followed by ``ReLU(inplace=True)``). Use as a
    context manager, or call :meth:`remove`, to take the hooks off.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str] | Mapping[str, str],
                 rename: Mapping[str, str] | None = None) -> None:
        if isinstance(taps, str):
            raise TypeError(f"taps must be a sequence of module paths or a dict alias -> path, got the "
                            f"string {taps!r}; wrap it in a list: [{taps!r}]")
        self.taps: dict[str, str] = dict(taps) if isinstance(taps, Mapping) else {t: t for t in taps}
        if not self.taps:
            raise ValueError("FeatureTaps needs at least one tap")
        self.rename = dict(rename or {})
        if len(set(self.rename.values())) != len(self.rename):
            raise ValueError(f"rename maps several names to one: {self.rename}")
        modules = dict(model.named_modules())
        for alias, path in self.taps.items():
            if path not in modules:
                close = difflib.get_close_matches(path, [n for n in modules if n], n=6, cutoff=0.4)
                raise KeyError(f"tap {alias!r}: no submodule named {path!r} in {type(model).__name__}; "
                               f"closest module names: {close or sorted(modules)[:10]} "
                               f"(names are those of model.named_modules())")
        self._records: dict[str, Tensor] = {}
        self._handles = [model.register_forward_pre_hook(lambda _m, _a: self.clear())]
        self._handles += [modules[path].register_forward_hook(self._hook(alias))
                          for alias, path in self.taps.items()]

    def _hook(self, alias: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            flat: dict[str, Tensor] = {}
            _flatten(alias, output, flat)
            self._records.update((self.rename.get(k, k), v) for k, v in flat.items())
        return hook

    def features(self) -> dict[str, Tensor]:
        """The outputs recorded since the last forward started, as a flat ``name -> tensor`` dict."""
        return dict(self._records)

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        """Take all hooks off and drop the records (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps(taps={self.taps}, rename={self.rename}, active={bool(self._handles)})"


def tap_channels(model: nn.Module, taps: Sequence[str] | Mapping[str, str], inputs: Any) -> dict[str, int]:
    """Channels of each tap, from one eval-mode, no-grad ``model(inputs)`` (training mode restored)."""
    with FeatureTaps(model, taps) as recorder, torch.no_grad():
        was_training = model.training
        model.eval()
        model(inputs)
        model.train(was_training)
        return {name: feat.shape[1] for name, feat in recorder.features().items()}
