"""Which of a method's ``inspect`` tensors are masks, and of which kind, without knowing the method.

A method's :meth:`~acamkd.methods.base.DistillMethod.inspect` returns, per level, a dataclass
(ACAM-KD's ``ACAMLevelOutput``) or a dict of named tensors. Every tensor whose name contains
``mask`` is drawn, by its shape (``h, w`` the level's teacher grid):

* ``(B, M, h', w')``: ``M`` spatial masks (drawn as overlays on the input image);
* ``(B, h, w)`` (3-D, last two dims = the teacher grid): one spatial mask (e.g. FGD's foreground mask);
* ``(B, M, C)`` (any other 3-D): ``M`` channel masks over ``C`` channels (drawn as an M x C heat map);
* ``(B, C)``: one channel mask.

So a new method (FGD, MasKD) draws by naming its mask tensors ``*mask*``; ``viz`` needs no change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MaskSet", "named_tensors", "masks_of", "methods_with_masks", "probe_masks"]


@dataclass
class MaskSet:
    """One named mask tensor of one image: ``kind`` "spatial" with ``values`` ``(M, h, w)`` or
    "channel" with ``values`` ``(M, C)``; float32 on the CPU."""

    name: str
    kind: str
    values: Tensor


def named_tensors(level_output: Any) -> dict[str, Tensor]:
    """The tensors of one level's ``inspect`` output: a dataclass's tensor fields, a mapping's
    tensor values, or nothing."""
    if dataclasses.is_dataclass(level_output) and not isinstance(level_output, type):
        items = {f.name: getattr(level_output, f.name) for f in dataclasses.fields(level_output)}
    elif isinstance(level_output, Mapping):
        items = dict(level_output)
    else:
        return {}
    return {str(k): v for k, v in items.items() if isinstance(v, Tensor)}


def masks_of(level_output: Any, grid: tuple[int, int], image: int = 0) -> list[MaskSet]:
    """The masks (see the module docstring) of image ``image`` in one level's ``inspect`` output,
    in the order the method returns them; ``grid`` is the level's teacher ``(h, w)``."""
    out = []
    for name, t in named_tensors(level_output).items():
        if "mask" not in name.lower() or t.dim() not in (2, 3, 4) or t.shape[0] <= image:
            continue
        x = t[image].detach().float().cpu()
        if t.dim() == 4:
            out.append(MaskSet(name, "spatial", x))
        elif t.dim() == 3 and tuple(t.shape[-2:]) == tuple(grid):
            out.append(MaskSet(name, "spatial", x.unsqueeze(0)))
        elif t.dim() == 3:
            out.append(MaskSet(name, "channel", x))
        else:
            out.append(MaskSet(name, "channel", x.unsqueeze(0)))
    return out


def probe_masks(name: str, options: Mapping[str, Any] | None = None) -> list[MaskSet] | None:
    """The masks method ``name`` (with config ``options``) returns on tiny random features (one
    level, 16 teacher / 8 student channels, an 8x8 grid, one box, a label map), or None when the
    probe itself fails (then only the real run can tell). Raises what the registry raises for an
    unknown method or bad options (KeyError / TypeError / ValueError)."""
    from acamkd.methods import DistillBatch, build, parse_options

    opts = parse_options(name, dict(options or {}))
    try:
        method = build(name, teacher_channels={"probe": 16}, student_channels={"probe": 8}, options=opts)
    except (OSError, ValueError):  # options that fit only the real levels (MasKD's token file): undecided
        return None
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 16, 8, 8, generator=generator)
    student = torch.randn(1, 8, 8, 8, generator=generator)
    batch = DistillBatch(input_size=(64, 64), image_sizes=[(64, 64)], boxes=[torch.tensor([[8.0, 8.0, 40.0, 40.0]])],
                         labels=[torch.tensor([1])], label_map=torch.zeros(1, 64, 64, dtype=torch.long))
    try:
        out = method.eval().inspect({"probe": teacher}, {"probe": student}, batch)
    except Exception:  # noqa: BLE001 - a method that needs more than the probe gives: undecided
        return None
    return masks_of(out.get("probe") if isinstance(out, Mapping) else None, (8, 8))


def methods_with_masks() -> list[str]:
    """The registered methods whose default options give masks on the probe (for error messages)."""
    from acamkd.methods import available

    names = []
    for name in available():
        try:
            if probe_masks(name):
                names.append(name)
        except Exception:  # noqa: BLE001 - a method that cannot even be built at probe size
            continue
    return names
