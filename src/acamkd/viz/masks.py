"""``acamkd viz masks CONFIG --checkpoint PATH``: what a distilled run's masks look at, one PNG per image.

Builds the run of CONFIG as ``acamkd distill`` does (``engine/run.py:build_models``: task, student,
the frozen teacher from ``teacher.checkpoint``, the method sized to the taps), loads the student
and the method from ``--checkpoint`` (a checkpoint written by ``acamkd distill``), and for each of
the first ``--images`` validation images (one at a time, eval mode, no grad) draws, at ``--level``:

* row 1: the input (detection: its ground-truth boxes; segmentation: its label map), the teacher's
  and the student's feature energy (mean of squares over channels, each at its own grid), and the
  energy of the aligned student feature when the method returns one (``aligned_student``);
* then every spatial mask family the method's ``inspect`` returns, one panel per mask, overlaid
  on the input (upsampled to the padded input the features came from, cropped to the image),
  all masks of a family on one colour scale;
* then every channel mask family as an ``M x C`` heat map.

Which tensors are masks is read off the ``inspect`` output (:mod:`acamkd.viz.mask_tensors`), so
any method that names its masks ``*mask*`` draws. A method without masks (``mimic``) is refused
by name before anything is built. Files: ``<out>/<level>_image<NNN>.png``; the figure size is
fixed by the layout (:func:`figure_size_in`), 100 pixels per inch.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from acamkd.viz.figure import new_figure, save_png

if TYPE_CHECKING:  # torch is imported when a figure is made, not when the CLI parses
    from torch import Tensor

    from acamkd.viz.mask_tensors import MaskSet

__all__ = ["NoMasksError", "ImageView", "check_method_has_masks", "figure_size_in", "draw_masks_figure",
           "mask_figures", "build_parser", "main"]

NCOLS = 4  # panels per row
PANEL_IN = (3.0, 2.6)  # inches per panel (width, height)
TITLE_IN = 0.5  # inches above the panels for the figure title


class NoMasksError(ValueError):
    """The configured method returns no mask tensors from ``inspect``: nothing to draw."""


def check_method_has_masks(name: str | None, options: dict[str, Any] | None = None) -> None:
    """Refuse (before any model is built) a method whose ``inspect`` returns no ``*mask*`` tensor.

    Raises:
        NoMasksError: ``method.name`` unset, or a method without masks (named, with the methods that have some).
        KeyError / TypeError / ValueError: an unknown method or bad options (from the registry).
    """
    from acamkd.viz.mask_tensors import methods_with_masks, probe_masks

    if name is None:
        raise NoMasksError("viz masks needs a distillation config: method.name is not set (a plain run has no masks)")
    if probe_masks(name, options) == []:
        drawable = methods_with_masks()
        raise NoMasksError(f"viz masks: method {name!r} has no masks to draw (its inspect returns no tensor named "
                           f"'*mask*'); methods with masks: {drawable}. For its training curves use "
                           f"`acamkd viz history RUN_DIR`.")


@dataclass
class ImageView:
    """What one figure shows. ``image`` ``(3, H, W)`` (any range: drawn min-max scaled);
    ``input_size`` the padded ``(H_p, W_p)`` the features came from; ``boxes`` ``(N, 4)`` xyxy
    pixels or None; ``label_map`` ``(H, W)`` or None (``ignore_index`` not drawn); energies
    ``(h, w)``; ``masks`` from :func:`~acamkd.viz.mask_tensors.masks_of`."""

    image: Tensor
    input_size: tuple[int, int]
    teacher_energy: Tensor
    student_energy: Tensor
    masks: list[MaskSet]
    aligned_energy: Tensor | None = None
    boxes: Tensor | None = None
    label_map: Tensor | None = None
    ignore_index: int = 255


def _rows(masks: Sequence[MaskSet]) -> int:
    return 1 + sum(-(-m.values.shape[0] // NCOLS) if m.kind == "spatial" else 1 for m in masks)


def figure_size_in(masks: Sequence[MaskSet]) -> tuple[float, float]:
    """``(width, height)`` in inches of the figure of ``masks``: :data:`NCOLS` panels wide; one
    row for the input and energies, ``ceil(M / NCOLS)`` rows per spatial family, one per channel family."""
    return PANEL_IN[0] * NCOLS, PANEL_IN[1] * _rows(masks) + TITLE_IN


def energy(feat: Tensor) -> Tensor:
    """Feature energy of image 0: mean of squares over channels, ``(B, C, h, w) -> (h, w)`` float32."""
    return feat[0].detach().float().pow(2).mean(0).cpu()


def _display(image: Tensor) -> Any:
    x = image.detach().float().cpu()
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-12)
    return x.permute(1, 2, 0).numpy()


def _on_image(mask: Tensor, input_size: tuple[int, int], image_hw: tuple[int, int]) -> Any:
    """``(h, w)`` -> ``(H, W)``: bilinear to the padded input, then the image's top-left region."""
    import torch

    up = torch.nn.functional.interpolate(mask[None, None], size=input_size, mode="bilinear", align_corners=False)
    return up[0, 0, :image_hw[0], :image_hw[1]].numpy()


def _heat(fig: Any, ax: Any, values: Any, title: str, cmap: str = "viridis", **kw: Any) -> None:
    im = ax.imshow(values, cmap=cmap, interpolation="nearest", **kw)
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def draw_masks_figure(view: ImageView, title: str, path: str | os.PathLike) -> str:
    """Draw one image's figure (layout in the module docstring) to ``path`` (PNG of
    :func:`figure_size_in` inches at 100 dpi); returns the path."""
    from matplotlib.patches import Rectangle

    fig = new_figure(*figure_size_in(view.masks))
    grid = fig.add_gridspec(_rows(view.masks), NCOLS)
    rgb = _display(view.image)
    H, W = rgb.shape[:2]

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(rgb)
    if view.boxes is not None:
        for x1, y1, x2, y2 in view.boxes.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
        ax.set_title(f"input {H}x{W}, {len(view.boxes)} boxes", fontsize=9)
    elif view.label_map is not None:
        import numpy as np

        labels = view.label_map.cpu().numpy()
        ax.imshow(np.ma.masked_where(labels == view.ignore_index, labels), cmap="tab20", alpha=0.45,
                  interpolation="nearest")
        ax.set_title(f"input {H}x{W} + label map", fontsize=9)
    else:
        ax.set_title(f"input {H}x{W}", fontsize=9)
    ax.axis("off")
    energies = [("teacher", view.teacher_energy), ("student", view.student_energy)]
    if view.aligned_energy is not None:
        energies.append(("aligned student", view.aligned_energy))
    for col, (who, e) in enumerate(energies, 1):
        _heat(fig, fig.add_subplot(grid[0, col]), e.numpy(), f"{who} energy {e.shape[0]}x{e.shape[1]}")

    row = 1
    grey = rgb.mean(-1)
    for mask in sorted(view.masks, key=lambda m: m.kind != "spatial"):  # spatial families first
        values = mask.values
        if mask.kind == "channel":
            ax = fig.add_subplot(grid[row, :])
            _heat(fig, ax, values.numpy(), f"{mask.name}: {values.shape[0]} x {values.shape[1]} channels "
                  f"(mean {values.mean():.3f})", cmap="magma", aspect="auto")
            ax.set_xlabel("channel", fontsize=8)
            ax.set_ylabel("mask", fontsize=8)
            ax.set_yticks(range(values.shape[0]))
            row += 1
            continue
        vmax = float(values.max()) if float(values.max()) > 0 else 1.0
        for m in range(values.shape[0]):
            ax = fig.add_subplot(grid[row + m // NCOLS, m % NCOLS])
            ax.imshow(grey, cmap="gray")
            im = ax.imshow(_on_image(values[m], view.input_size, (H, W)), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
            fig.colorbar(im, ax=ax, shrink=0.85)
            ax.set_title(f"{mask.name}[{m}] (mean {values[m].mean():.3f})", fontsize=9)
            ax.axis("off")
        row += -(-values.shape[0] // NCOLS)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


# ------------------------------------------------------------------------------- from a checkpoint
def _load_distill_checkpoint(path: str, method_name: str) -> dict[str, Any]:
    from acamkd.engine.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state.get("student"), dict) or not state.get("method"):
        raise ValueError(f"--checkpoint {path} holds no student and method weights: give a checkpoint written by "
                         f"`acamkd distill` (its train.output_dir/last.pt)")
    stored = (state.get("config") or {}).get("method", {}).get("name")
    if stored and stored != method_name:
        raise ValueError(f"--checkpoint {path} was distilled with method {stored!r}, the config says "
                         f"method.name={method_name!r}: give the run's config (or method.name={stored})")
    return state


def _pick_level(available: Sequence[str], level: str | None) -> str:
    if level is None:
        return available[0]
    if level not in available:
        close = difflib.get_close_matches(level, list(available), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"--level {level!r}: the method has levels {list(available)}{hint}")
    return level


def mask_figures(cfg: Any, checkpoint: str, images: int = 4, level: str | None = None, out: str | None = None,
                 device: str | None = None) -> list[str]:
    """Write one PNG per image (module docstring) for the first ``images`` validation images;
    returns the paths. ``out`` defaults to ``masks`` beside ``checkpoint``.

    Raises:
        NoMasksError: the method has no masks (before anything is built).
        ValueError: ``images < 1``; a checkpoint that is not a distillation checkpoint, or of another
            method; an unknown ``level`` (with close matches); a validation set with no image.
        FileNotFoundError: no checkpoint / teacher checkpoint file.
    """
    import torch

    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_models, build_task
    from acamkd.models.weights import load_weights_strict
    from acamkd.viz.mask_tensors import masks_of, named_tensors

    check_method_has_masks(cfg.method.name, cfg.method.options)
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    state = _load_distill_checkpoint(checkpoint, cfg.method.name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = build_task(cfg, DistInfo(device=dev))
    val_set = task.val_dataset()
    if len(val_set) == 0:
        raise ValueError(f"the validation set of {cfg.data.dataset} ({cfg.data.root}) has no image")
    models = build_models(cfg, task, "distill", task.model_classes(val_set), sample=lambda: [val_set[0][0]])
    load_weights_strict(models.student, state["student"], checkpoint, f"{cfg.student.arch}/{cfg.student.backbone}")
    try:
        models.method.load_state_dict(state["method"])
    except RuntimeError as err:
        raise ValueError(f"--checkpoint {checkpoint}: its method weights do not fit method {cfg.method.name!r} "
                         f"with this config's method.options and taps: {err}") from None
    student, teacher, method = models.student.to(dev).eval(), models.teacher.to(dev).eval(), models.method.to(dev).eval()
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "masks")
    step = state.get("step", "?")
    written = []
    for index in range(min(images, len(val_set))):
        batch = task.collate([val_set[index]])
        inputs, targets = task.to_device(batch, dev)
        with torch.no_grad():
            teacher_feats = task.teacher_forward(teacher, models.teacher_taps, inputs)
            student(task.model_input(inputs) if isinstance(inputs, list) else inputs)
            student_feats = models.student_taps.features()
            facts = task.distill_batch(inputs, targets)
            result = method.inspect(teacher_feats, student_feats, facts)
        name = _pick_level(list(result), level)
        grid = tuple(teacher_feats[name].shape[-2:])
        tensors = named_tensors(result[name])
        aligned = tensors.get("aligned_student")
        view = ImageView(image=inputs[0], input_size=facts.input_size, teacher_energy=energy(teacher_feats[name]),
                         student_energy=energy(student_feats[name]), masks=masks_of(result[name], grid),
                         aligned_energy=energy(aligned) if aligned is not None and aligned.dim() == 4 else None,
                         boxes=facts.boxes[0].cpu() if facts.boxes is not None else None,
                         label_map=facts.label_map[0] if facts.label_map is not None else None,
                         ignore_index=facts.ignore_index)
        if not view.masks:
            raise NoMasksError(f"viz masks: method {cfg.method.name!r} returned no masks at level {name!r}")
        title = (f"{cfg.method.name} at {name}, step {step}: {cfg.teacher.arch} {cfg.teacher.backbone} -> "
                 f"{cfg.student.arch} {cfg.student.backbone}, val image {index}")
        written.append(draw_masks_figure(view, title, os.path.join(out, f"{name}_image{index:03d}.png")))
    return written


# ------------------------------------------------------------------------------------- command
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd viz masks", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run's distillation config (with teacher.checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.checkpoint=runs/t/last.pt")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `acamkd distill`")
    parser.add_argument("--images", type=int, default=4, help="how many validation images (default 4)")
    parser.add_argument("--level", default=None, help="which level (default: the method's first, e.g. p3)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: masks/ beside the checkpoint)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    from acamkd.config import load_config

    args = args or build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    written = mask_figures(cfg, args.checkpoint, images=args.images, level=args.level, out=args.out,
                           device=args.device)
    print(json.dumps({"written": written}, indent=1))
    return 0
