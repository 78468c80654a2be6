"""``shapes``: the built-in, procedurally rendered detection + segmentation dataset.

It needs no network and no download: ``acamkd make-data shapes --out DIR`` (or
:func:`make_shapes`) renders the scenes with numpy and PIL and writes the *same* scenes in
two standard layouts, so the real COCO and Cityscapes loaders are what the demo and the
tests exercise::

    DIR/coco/{train2017,val2017}/<image id:012d>.jpg
    DIR/coco/annotations/instances_{train,val}2017.json
    DIR/cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq:06d>_000019_leftImg8bit.png
    DIR/cityscapes/gtFine/{train,val}/<city>/<city>_<seq:06d>_000019_gtFine_labelTrainIds.png
    DIR/shapes_meta.json   (classes, ids, train-id mapping, generator version, parameters)

A scene is a cluttered, textured background with objects of 8 classes that differ in shape,
and, less reliably, in colour and texture: each class has a characteristic hue and texture,
but hues are drawn around the class hue with a spread that overlaps the neighbouring classes,
and the texture is the class's own only some of the time, so the shape has to be learnt.

=========  ===========  ==========  ==================
class      category id  train id    hue / texture
=========  ===========  ==========  ==================
circle     1            1           0 deg / dots
square     2            2           45 deg / checker
triangle   4            3           90 deg / stripes
star       5            4           135 deg / solid
ring       7            5           180 deg / noise
cross      9            6           225 deg / stripes
hexagon    11           7           270 deg / checker
ellipse    13           8           315 deg / gradient
=========  ===========  ==========  ==================

Category ids are deliberately not contiguous, so a loader's id -> label mapping is always
exercised. Train ids: 0 background (distractors and clutter included), 1..8 the classes,
255 ignore (crowd regions).

Objects are rotated (any angle), stretched (aspect jitter; the ellipse is about 2:1), and
stacked in z-order with distractors: later layers occlude earlier ones, and every COCO box,
area and mask, and every label pixel, is of the *visible* part after occlusion (a placement
that would hide too much of an earlier object is retried elsewhere, so no object is less than
``min_visible`` visible). Boxes are tight pixel boxes ``[x, y, w, h]``: the visible pixels
are columns ``x .. x+w-1`` and rows ``y .. y+h-1``. Segmentations are compressed RLE. A few
percent of images hold a crowd: a cluster of small same-class shapes annotated once with
``iscrowd=1`` (and ignore, 255, in the label png), as COCO does. Distractors are shapes that
are *not* classes (irregular polygons, zigzag lines, open arcs) drawn in class-like colours
and textures; they are background. Some images hold no objects at all.

Difficulty (what each setting changes; ranges are inclusive, sizes are the shape's extent in
pixels before the aspect stretch, ``min(H, W)`` the shorter image side; an object that finds
no place after 8 tries is dropped, so crowded hard scenes hold a little fewer than drawn):

================================================  =====  =======  =======
setting                                           easy   normal   hard
================================================  =====  =======  =======
objects per image                                 1-3    2-7      4-12
probability an image has no objects               0.05   0.06     0.06
smallest object extent (px)                       16     10       7
largest object extent (x min(H, W))               0.5    0.6      0.7
aspect ratio jitter (+/-, ellipse on top of 2:1)  0.1    0.2      0.3
hue spread around the class hue (std, deg)        10     30       45
probability of a random hue instead               0      0.1      0.25
probability of the class's own texture            0.9    0.6      0.35
object saturation range                           0.6-1  0.4-1    0.25-1
distractor shapes per image                       0-1    1-4      3-8
background saturation range                       0-0.2  0.1-0.5  0.2-0.8
background low-frequency noise amplitude (0-255)  8      20       35
background clutter lines and arcs                 0-2    3-8      8-16
background textured patches                       0-0    1-3      3-6
probability of one iscrowd cluster                0      0.04     0.06
least visible fraction of an occluded object      0.5    0.35     0.25
probability of a Gaussian blur                    0      0.2      0.5
largest blur radius (px)                          0      0.7      1
per-pixel Gaussian noise (std, 0-255)             2      5        9
================================================  =====  =======  =======

Deterministic: each image's generator is seeded from ``(seed, split, index)``, JPEG quality
and PNG settings are fixed, and files do not depend on the number of worker processes, so
the same arguments give the same bytes. :func:`make_shapes` is also a cache: an output
directory whose ``shapes_meta.json`` records the same parameters is returned as it is, and
one with different parameters is never overwritten unless asked (``overwrite=True``,
``--overwrite``).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CLASSES",
    "DIFFICULTIES",
    "GENERATOR_VERSION",
    "ShapeClass",
    "Difficulty",
    "Scene",
    "Instance",
    "Layer",
    "make_shapes",
    "render_scene",
    "rle_encode",
    "difficulty_table",
    "build_parser",
    "main",
]

# Bump when a change alters any output byte: the cache compares it, so old directories are
# recognised as different data instead of being silently reused.
GENERATOR_VERSION = "1.0"
DEFAULT_SIZE = (256, 320)
MIN_SIDE = 64  # below this the smallest objects and the clutter no longer fit sensibly
MAX_SIDE = 4096
MAX_IMAGES = 999_999  # val image ids start at 1_000_001: the two splits never share an id
JPEG_QUALITY = 92
IGNORE = 255
SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
_COCO_SPLIT = {"train": "train2017", "val": "val2017"}
CITIES = {"train": ("shapeton", "polygonburg"), "val": ("circleville",)}
CITYSCAPES_FRAME = 19  # Cityscapes' annotated frames are the 20th of each snippet
TEXTURES = ("solid", "stripes", "dots", "checker", "noise", "gradient")
META_NAME = "shapes_meta.json"
_INCOMPLETE = ".shapes_incomplete"  # marks a directory this module is (or was) writing
_MIN_PIXELS = 6  # an object must cover at least this many in-image pixels when placed


@dataclass(frozen=True)
class ShapeClass:
    """One class: its name, COCO category id, characteristic hue (degrees) and texture."""

    name: str
    category_id: int
    hue: float
    texture: str


CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("circle", 1, 0.0, "dots"),
    ShapeClass("square", 2, 45.0, "checker"),
    ShapeClass("triangle", 4, 90.0, "stripes"),
    ShapeClass("star", 5, 135.0, "solid"),
    ShapeClass("ring", 7, 180.0, "noise"),
    ShapeClass("cross", 9, 225.0, "stripes"),
    ShapeClass("hexagon", 11, 270.0, "checker"),
    ShapeClass("ellipse", 13, 315.0, "gradient"),
)


@dataclass(frozen=True)
class Difficulty:
    """What one difficulty level draws. Each field's ``metadata['doc']`` is its table row."""

    objects: tuple[int, int] = field(metadata={"doc": "objects per image"})
    empty_prob: float = field(metadata={"doc": "probability an image has no objects"})
    min_size: int = field(metadata={"doc": "smallest object extent (px)"})
    max_size_frac: float = field(metadata={"doc": "largest object extent (x min(H, W))"})
    aspect_jitter: float = field(metadata={"doc": "aspect ratio jitter (+/-, ellipse on top of 2:1)"})
    hue_std: float = field(metadata={"doc": "hue spread around the class hue (std, deg)"})
    off_colour_prob: float = field(metadata={"doc": "probability of a random hue instead"})
    class_texture_prob: float = field(metadata={"doc": "probability of the class's own texture"})
    saturation: tuple[float, float] = field(metadata={"doc": "object saturation range"})
    distractors: tuple[int, int] = field(metadata={"doc": "distractor shapes per image"})
    bg_saturation: tuple[float, float] = field(metadata={"doc": "background saturation range"})
    bg_noise: float = field(metadata={"doc": "background low-frequency noise amplitude (0-255)"})
    bg_lines: tuple[int, int] = field(metadata={"doc": "background clutter lines and arcs"})
    bg_patches: tuple[int, int] = field(metadata={"doc": "background textured patches"})
    crowd_prob: float = field(metadata={"doc": "probability of one iscrowd cluster"})
    min_visible: float = field(metadata={"doc": "least visible fraction of an occluded object"})
    blur_prob: float = field(metadata={"doc": "probability of a Gaussian blur"})
    blur_radius: float = field(metadata={"doc": "largest blur radius (px)"})
    pixel_noise: float = field(metadata={"doc": "per-pixel Gaussian noise (std, 0-255)"})


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(
        objects=(1, 3), empty_prob=0.05, min_size=16, max_size_frac=0.5, aspect_jitter=0.1,
        hue_std=10.0, off_colour_prob=0.0, class_texture_prob=0.9, saturation=(0.6, 1.0),
        distractors=(0, 1), bg_saturation=(0.0, 0.2), bg_noise=8.0, bg_lines=(0, 2),
        bg_patches=(0, 0), crowd_prob=0.0, min_visible=0.5, blur_prob=0.0, blur_radius=0.0,
        pixel_noise=2.0),
    "normal": Difficulty(
        objects=(2, 7), empty_prob=0.06, min_size=10, max_size_frac=0.6, aspect_jitter=0.2,
        hue_std=30.0, off_colour_prob=0.1, class_texture_prob=0.6, saturation=(0.4, 1.0),
        distractors=(1, 4), bg_saturation=(0.1, 0.5), bg_noise=20.0, bg_lines=(3, 8),
        bg_patches=(1, 3), crowd_prob=0.04, min_visible=0.35, blur_prob=0.2, blur_radius=0.7,
        pixel_noise=5.0),
    "hard": Difficulty(
        objects=(4, 12), empty_prob=0.06, min_size=7, max_size_frac=0.7, aspect_jitter=0.3,
        hue_std=45.0, off_colour_prob=0.25, class_texture_prob=0.35, saturation=(0.25, 1.0),
        distractors=(3, 8), bg_saturation=(0.2, 0.8), bg_noise=35.0, bg_lines=(8, 16),
        bg_patches=(3, 6), crowd_prob=0.06, min_visible=0.25, blur_prob=0.5, blur_radius=1.0,
        pixel_noise=9.0),
}


def difficulty_table() -> str:
    """The difficulty settings as an RST table: the module docstring quotes it (a test keeps them equal)."""

    def cell(value: Any) -> str:
        if isinstance(value, tuple):
            return f"{cell(value[0])}-{cell(value[1])}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    names = list(DIFFICULTIES)
    rows = [[f.metadata["doc"]] + [cell(getattr(DIFFICULTIES[n], f.name)) for n in names]
            for f in fields(Difficulty)]
    header = ["setting"] + names
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(header), rule, *map(line, rows), rule])




# ----------------------------------------------------------------------------- scene model
@dataclass
class Layer:
    """One drawn item, before occlusion: its full mask over the crop at ``(y0, x0)``.

    ``kind`` is ``"object"``, ``"crowd"`` or ``"distractor"``; ``class_index`` indexes
    :data:`CLASSES` (``None`` for distractors). Layers are listed bottom to top.
    """

    kind: str
    class_index: int | None
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool


@dataclass
class Instance:
    """One annotation: the visible part of an object (or crowd) layer after occlusion."""

    class_index: int
    layer: int  # index into Scene.layers
    bbox: tuple[float, float, float, float]  # x, y, w, h (tight pixel box)
    area: int  # visible pixels
    iscrowd: bool
    mask: np.ndarray  # (H, W) bool, visible pixels


@dataclass
class Scene:
    """A rendered image, its train-id label map, its instances and the layers drawn."""

    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8 train ids
    instances: list[Instance]
    layers: list[Layer]
    distractors: int


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One independent stream per image: results cannot depend on worker count or order.
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32) * 255.0


def _range(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


# ------------------------------------------------------------------------------- geometry
def _circle(n: int, r: float = 1.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2.0 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _class_polygons(name: str, size: float) -> list[tuple[np.ndarray, int]]:
    """Unit-scale polygons (extent about [-1, 1]) with their fill: 255 draws, 0 cuts a hole."""
    n_round = int(np.clip(size, 16, 64))  # enough vertices to look round at this size
    if name in ("circle", "ellipse"):
        return [(_circle(n_round), 255)]
    if name == "ring":
        return [(_circle(n_round), 255), (_circle(n_round, 0.55), 0)]
    if name == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.85, 255)]
    if name == "triangle":
        return [(_regular(3) + [0.0, 0.25], 255)]  # centre the box, not the centroid
    if name == "hexagon":
        return [(_regular(6, 0.0), 255)]
    if name == "star":
        pts = _regular(10)
        pts[1::2] *= 0.42
        return [(pts, 255)]
    if name == "cross":
        w = 0.32
        return [(np.array([[w, 1], [w, w], [1, w], [1, -w], [w, -w], [w, -1], [-w, -1], [-w, -w],
                           [-1, -w], [-1, w], [-w, w], [-w, 1]], np.float64), 255)]
    raise AssertionError(name)


def _transform(pts: np.ndarray, cx: float, cy: float, size: float, aspect: float,
               theta: float) -> np.ndarray:
    """Stretch by ``aspect`` (area kept), scale to extent ``size``, rotate, move to centre."""
    sx, sy = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    p = pts * [sx * size / 2.0, sy * size / 2.0]
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([c * p[:, 0] - s * p[:, 1] + cx, s * p[:, 0] + c * p[:, 1] + cy], 1)


def _shoelace(p: np.ndarray) -> float:
    return 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))))


def _rasterise(ops: list[tuple], H: int, W: int, pad: float = 1.0) -> tuple[int, int, np.ndarray] | None:
    """Draw ``ops`` into an ``L`` crop covering their points (clipped to the image).

    ops: ``("polygon", pts, fill)``, ``("line", pts, width)`` or ``("arc", box, start, end,
    width)``. Returns ``(y0, x0, mask)`` or ``None`` when nothing lands in the image.
    """
    allpts = np.concatenate([op[1].reshape(-1, 2) for op in ops])
    pad = pad + max((op[-1] for op in ops if op[0] in ("line", "arc")), default=0)
    x0 = max(0, int(math.floor(allpts[:, 0].min() - pad)))
    y0 = max(0, int(math.floor(allpts[:, 1].min() - pad)))
    x1 = min(W, int(math.ceil(allpts[:, 0].max() + pad)) + 1)
    y1 = min(H, int(math.ceil(allpts[:, 1].max() + pad)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    im = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(im)
    off = np.array([x0, y0], np.float64)
    for op in ops:
        pts = [tuple(p) for p in (op[1].reshape(-1, 2) - off).tolist()]
        if op[0] == "polygon":
            draw.polygon(pts, fill=op[2])
        elif op[0] == "line":
            draw.line(pts, fill=255, width=int(op[2]), joint="curve")
        else:  # arc
            draw.arc([pts[0], pts[1]], op[2], op[3], fill=255, width=int(op[4]))
    mask = np.asarray(im) > 127
    if not mask.any():
        return None
    return y0, x0, mask


# -------------------------------------------------------------------------------- textures
def _texture(rng: np.random.Generator, kind: str, y0: int, x0: int, h: int, w: int, cx: float,
             cy: float, theta: float, size: float) -> np.ndarray:
    """Blend weight ``t`` (h, w) in [0, 1] between two colours, in the object's own frame."""
    if kind == "solid":
        return np.zeros((h, w), np.float32)
    if kind == "noise":
        g = rng.random((int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
        return np.asarray(Image.fromarray(g).resize((w, h), Image.BILINEAR), np.float32)
    ys = (np.arange(y0, y0 + h, dtype=np.float32) - cy)[:, None]
    xs = (np.arange(x0, x0 + w, dtype=np.float32) - cx)[None, :]
    c, s = math.cos(theta), math.sin(theta)
    u = c * xs + s * ys
    if kind == "gradient":
        return np.clip(u / max(size, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    v = -s * xs + c * ys
    period = max(3.0, size * float(rng.uniform(0.14, 0.3)))
    if kind == "stripes":
        return (np.floor(u / period) % 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        fu, fv = u / period % 1.0 - 0.5, v / period % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    raise AssertionError(kind)


def _colours(rng: np.random.Generator, hue: float, sat: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A main colour and a second one for the texture: darker, lighter or another hue."""
    s, v = float(rng.uniform(*sat)), float(rng.uniform(0.45, 1.0))
    c1 = _hsv(hue, s, v)
    pick = int(rng.integers(3))
    if pick == 0:
        c2 = _hsv(hue, s, v * 0.45)
    elif pick == 1:
        c2 = _hsv(hue, s * 0.35, min(1.0, v + 0.35))
    else:
        c2 = _hsv(hue + float(rng.uniform(60, 180)), s, v)
    return c1, c2


def _paint(rng, crop, texture: str, hue: float, sat, cx, cy, theta, size) -> np.ndarray:
    y0, x0, mask = crop
    h, w = mask.shape
    t = _texture(rng, texture, y0, x0, h, w, cx, cy, theta, size)[..., None]
    c1, c2 = _colours(rng, hue, sat)
    return c1 * (1.0 - t) + c2 * t  # (h, w, 3) float32


def _class_look(rng: np.random.Generator, cls: ShapeClass, d: Difficulty) -> tuple[float, str]:
    if rng.random() < d.off_colour_prob:
        hue = float(rng.uniform(0, 360))
    else:
        hue = cls.hue + float(rng.normal(0.0, d.hue_std))
    tex = cls.texture if rng.random() < d.class_texture_prob else TEXTURES[int(rng.integers(len(TEXTURES)))]
    return hue, tex


# ------------------------------------------------------------------------------ background
def _background(rng: np.random.Generator, H: int, W: int, d: Difficulty) -> np.ndarray:
    """Gradient + smooth colour noise + textured patches + lines/arcs: all label 0."""
    v_lo, v_hi = 0.2, 0.9
    a = _hsv(float(rng.uniform(0, 360)), float(rng.uniform(*d.bg_saturation)), float(rng.uniform(v_lo, v_hi)))
    b = _hsv(float(rng.uniform(0, 360)), float(rng.uniform(*d.bg_saturation)), float(rng.uniform(v_lo, v_hi)))
    ang = float(rng.uniform(0, 2 * math.pi))
    ys = np.linspace(-0.5, 0.5, H, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, W, dtype=np.float32)[None, :]
    t = np.clip(math.cos(ang) * xs + math.sin(ang) * ys + 0.5, 0.0, 1.0)[..., None]
    img = a * (1.0 - t) + b * t
    g = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(g).resize((W, H), Image.BILINEAR), np.float32)
    img += (smooth / 127.5 - 1.0) * d.bg_noise

    for _ in range(_range(rng, d.bg_patches)):
        size = float(rng.uniform(0.2, 0.6)) * min(H, W)
        cx, cy = float(rng.uniform(0, W)), float(rng.uniform(0, H))
        theta = float(rng.uniform(0, 2 * math.pi))
        pts = _transform(_circle(24) if rng.random() < 0.5 else _regular(4, math.pi / 4),
                         cx, cy, size, float(np.exp(rng.uniform(-0.7, 0.7))), theta)
        crop = _rasterise([("polygon", pts, 255)], H, W)
        if crop is None:
            continue
        rgb = _paint(rng, crop, TEXTURES[int(rng.integers(len(TEXTURES)))], float(rng.uniform(0, 360)),
                     d.bg_saturation, cx, cy, theta, size)
        y0, x0, m = crop
        alpha = float(rng.uniform(0.25, 0.55))  # see-through: not mistaken for an object
        region = img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        region[m] = (1 - alpha) * region[m] + alpha * rgb[m]

    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(_range(rng, d.bg_lines)):
        colour = tuple(int(c) for c in _hsv(float(rng.uniform(0, 360)), float(rng.uniform(0, 1)),
                                            float(rng.uniform(0.1, 1))))
        width = int(rng.integers(1, 4))
        if rng.random() < 0.7:
            pts = rng.uniform(-0.1, 1.1, (int(rng.integers(2, 5)), 2)) * [W, H]
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=width)
        else:
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.1, 0.5) * min(H, W)
            start = float(rng.uniform(0, 360))
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + float(rng.uniform(40, 200)),
                     fill=colour, width=width)
    return np.asarray(canvas, np.float32).copy()


# ---------------------------------------------------------------------------------- layers
def _object_layer(rng, cls_index: int, size: float, aspect: float, H: int, W: int, d: Difficulty):
    """Place one class object at a random centre and angle: ``(crop, rgb, full_area)`` or None."""
    cx, cy = float(rng.uniform(0, W)), float(rng.uniform(0, H))
    return _object_layer_at(rng, cls_index, cx, cy, size, aspect, H, W, d)


def _crowd_layer(rng, cls_index: int, H: int, W: int, d: Difficulty):
    """A cluster of 5-12 small same-class shapes, one layer (COCO annotates it iscrowd=1)."""
    n = int(rng.integers(5, 13))
    cx, cy = float(rng.uniform(0.15, 0.85) * W), float(rng.uniform(0.15, 0.85) * H)
    radius = float(rng.uniform(1.5, 2.5)) * math.sqrt(n) * 5.0
    parts = []
    for _ in range(n):
        r, a = radius * math.sqrt(float(rng.random())), float(rng.uniform(0, 2 * math.pi))
        size = float(rng.uniform(5, 11))
        aspect = 2.0 if CLASSES[cls_index].name == "ellipse" else 1.0
        part = _object_layer_at(rng, cls_index, cx + r * math.cos(a), cy + r * math.sin(a), size, aspect, H, W, d)
        if part is not None:
            parts.append(part[:2])
    if not parts:
        return None
    y0 = min(p[0][0] for p in parts)
    x0 = min(p[0][1] for p in parts)
    y1 = max(p[0][0] + p[0][2].shape[0] for p in parts)
    x1 = max(p[0][1] + p[0][2].shape[1] for p in parts)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    rgb = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    for (py, px, pm), prgb in parts:
        sl = (slice(py - y0, py - y0 + pm.shape[0]), slice(px - x0, px - x0 + pm.shape[1]))
        mask[sl] |= pm
        rgb[sl][pm] = prgb[pm]
    return (y0, x0, mask), rgb, float(mask.sum())


def _object_layer_at(rng, cls_index: int, cx: float, cy: float, size: float, aspect: float, H: int, W: int,
                     d: Difficulty):
    """One class object centred at ``(cx, cy)``: ``(crop, rgb, area of the unclipped shape)`` or None."""
    cls = CLASSES[cls_index]
    theta = float(rng.uniform(0, 2 * math.pi))
    polys = [(_transform(p, cx, cy, size, aspect, theta), fill) for p, fill in _class_polygons(cls.name, size)]
    area = sum(_shoelace(p) * (1 if fill else -1) for p, fill in polys)
    crop = _rasterise([("polygon", p, fill) for p, fill in polys], H, W)
    if crop is None:
        return None
    hue, tex = _class_look(rng, cls, d)
    return crop, _paint(rng, crop, tex, hue, d.saturation, cx, cy, theta, size), area


def _distractor_layer(rng, H: int, W: int, d: Difficulty):
    """A non-class shape in a class-like colour: irregular polygon, zigzag line or open arc."""
    size = float(np.exp(rng.uniform(math.log(d.min_size), math.log(d.max_size_frac * min(H, W)))))
    cx, cy = float(rng.uniform(0, W)), float(rng.uniform(0, H))
    theta = float(rng.uniform(0, 2 * math.pi))
    kind = int(rng.integers(3))
    if kind == 0:  # irregular polygon: uneven radii at uneven angles (not a regular class shape)
        k = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = rng.uniform(0.25, 1.0, k)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        ops = [("polygon", _transform(pts, cx, cy, size, 1.0, theta), 255)]
    elif kind == 1:  # zigzag polyline
        k = int(rng.integers(2, 5))
        pts = np.stack([np.linspace(-1, 1, k + 1), rng.uniform(-0.6, 0.6, k + 1)], 1)
        ops = [("line", _transform(pts, cx, cy, size, 1.0, theta), max(2, int(size * rng.uniform(0.06, 0.15))))]
    else:  # open arc: like a broken ring, never closed
        r = size / 2.0
        start = float(rng.uniform(0, 360))
        box = np.array([[cx - r, cy - r], [cx + r, cy + r]])
        ops = [("arc", box, start, start + float(rng.uniform(60, 250)), max(2, int(size * rng.uniform(0.08, 0.2))))]
    crop = _rasterise(ops, H, W)
    if crop is None:
        return None
    like = CLASSES[int(rng.integers(len(CLASSES)))]
    hue, tex = _class_look(rng, like, d)
    return crop, _paint(rng, crop, tex, hue, d.saturation, cx, cy, theta, size)


# ----------------------------------------------------------------------------------- scene
def _check_size(size: Any, name: str = "size") -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)):
        raise ValueError(f"{name} must be (height, width) as two ints, got {size!r}")
    H, W = int(size[0]), int(size[1])
    if min(H, W) < MIN_SIDE or max(H, W) > MAX_SIDE:
        raise ValueError(f"{name}={H}x{W} is out of range: each side must be in [{MIN_SIDE}, {MAX_SIDE}] "
                         f"pixels (smaller images cannot hold the objects and clutter)")
    return H, W


def _check_difficulty(difficulty: Any) -> Difficulty:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def render_scene(seed: int, split: str, index: int, size: tuple[int, int] = DEFAULT_SIZE,
                 difficulty: str = "normal") -> Scene:
    """Render image ``index`` of ``split``: a pure function of its arguments (no files).

    :func:`make_shapes` writes exactly these scenes; tests and notebooks can call it directly.
    """
    H, W = _check_size(size)
    d = _check_difficulty(difficulty)
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _rng(seed, split, index)
    img = _background(rng, H, W, d)

    # What to draw, bottom to top: objects, distractors and maybe one crowd, shuffled.
    n_obj = 0 if rng.random() < d.empty_prob else _range(rng, d.objects)
    specs: list[tuple] = []
    lo, hi = math.log(d.min_size), math.log(d.max_size_frac * min(H, W))
    for _ in range(n_obj):
        c = int(rng.integers(len(CLASSES)))
        jitter = float(np.exp(rng.uniform(-math.log1p(d.aspect_jitter), math.log1p(d.aspect_jitter))))
        aspect = jitter * (2.0 if CLASSES[c].name == "ellipse" else 1.0)
        specs.append(("object", c, float(np.exp(rng.uniform(lo, hi))), aspect))
    specs += [("distractor", None)] * _range(rng, d.distractors)
    if n_obj and rng.random() < d.crowd_prob:
        specs.append(("crowd", int(rng.integers(len(CLASSES)))))
    order = rng.permutation(len(specs))

    inst = np.full((H, W), -1, np.int32)  # index of the top layer at each pixel
    layers: list[Layer] = []
    visible: list[float] = []  # current visible pixels of each layer
    placed_area: list[float] = []  # in-image pixels when placed (visible fraction's base)
    for i in order:
        spec = specs[i]
        for _attempt in range(8):
            if spec[0] == "object":
                made = _object_layer(rng, spec[1], spec[2], spec[3], H, W, d)
            elif spec[0] == "crowd":
                made = _crowd_layer(rng, spec[1], H, W, d)
            else:
                made = _distractor_layer(rng, H, W, d)
            if made is None:
                continue
            (y0, x0, m), rgb = made[0], made[1]
            n_px = int(m.sum())
            if spec[0] != "distractor" and (n_px < _MIN_PIXELS or n_px < 0.4 * made[2]):
                continue  # mostly outside the image
            region = inst[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
            under = region[m]
            under = under[under >= 0]
            lost = np.bincount(under, minlength=len(layers)) if under.size else np.zeros(len(layers), np.int64)
            if any(lost[k] and layers[k].kind != "distractor"
                   and visible[k] - lost[k] < d.min_visible * placed_area[k] for k in range(len(layers))):
                continue  # would hide too much of an earlier object: try elsewhere
            for k in np.flatnonzero(lost):
                visible[k] -= float(lost[k])
            region[m] = len(layers)
            img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = rgb[m]
            layers.append(Layer(spec[0], spec[1], y0, x0, m))
            visible.append(float(n_px))
            placed_area.append(float(n_px))
            break

    # Label map and instances from the final top-layer map: only visible pixels count.
    lut = np.zeros(len(layers) + 1, np.uint8)  # lut[0] is "no layer"
    instances: list[Instance] = []
    for k, layer in enumerate(layers):
        if layer.kind == "distractor":
            continue
        lut[k + 1] = IGNORE if layer.kind == "crowd" else layer.class_index + 1
        mask = inst == k
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        bbox = (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))
        instances.append(Instance(layer.class_index, k, bbox, int(mask.sum()), layer.kind == "crowd", mask))
    label = lut[inst + 1]

    # Camera: optional blur, then sensor noise.
    if d.blur_prob and rng.random() < d.blur_prob:
        radius = float(rng.uniform(0.3, d.blur_radius))
        img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                         .filter(ImageFilter.GaussianBlur(radius)), np.float32)
    img = img + rng.standard_normal((H, W, 3), dtype=np.float32) * d.pixel_noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    n_distract = sum(layer.kind == "distractor" for layer in layers)
    return Scene(image, label, instances, layers, n_distract)


# ------------------------------------------------------------------------------------- RLE
def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [h, w], "counts": str}`` of a bool mask (column-major).

    Same string as ``pycocotools.mask.encode``; written here so making data needs only numpy.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)  # runs start with a (possibly empty) run of zeros
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [h, w], "counts": "".join(out)}


# --------------------------------------------------------------------------------- writing
def _city_stem(split: str, index: int) -> tuple[str, str]:
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{CITYSCAPES_FRAME:06d}"


def _image_id(split: str, index: int) -> int:
    return index + 1 + (1_000_000 if split == "val" else 0)


def _render_and_write(task: tuple) -> dict[str, Any]:
    """Worker: render one scene, write its three files, return its COCO records (no ids)."""
    out, split, index, size, seed, difficulty = task
    scene = render_scene(seed, split, index, size, difficulty)
    out = Path(out)
    image_id = _image_id(split, index)
    file_name = f"{image_id:012d}.jpg"
    city, stem = _city_stem(split, index)
    pil = Image.fromarray(scene.image)
    pil.save(out / "coco" / _COCO_SPLIT[split] / file_name, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    pil.save(out / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", "PNG")
    Image.fromarray(scene.label).save(
        out / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", "PNG")
    H, W = scene.image.shape[:2]
    anns = [{"category_id": CLASSES[i.class_index].category_id, "bbox": list(i.bbox), "area": float(i.area),
             "iscrowd": int(i.iscrowd), "segmentation": rle_encode(i.mask)} for i in scene.instances]
    return {
        "image": {"id": image_id, "file_name": file_name, "width": W, "height": H, "license": 1,
                  "cityscapes_stem": f"{city}/{stem}"},
        "annotations": anns,
        "distractors": scene.distractors,
    }


def _coco_header(split: str) -> dict[str, Any]:
    return {
        "info": {"description": f"acamkd shapes ({split}): procedurally rendered, see acamkd.data.synthetic",
                 "version": GENERATOR_VERSION, "year": 2025, "contributor": "acamkd",
                 "url": "", "date_created": "2025-01-01"},  # fixed: same bytes for the same args
        "licenses": [{"id": 1, "name": "CC0 1.0 (procedurally generated)",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
    }


def _categories() -> list[dict[str, Any]]:
    return [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in CLASSES]


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, separators=None if indent else (",", ":"))
    os.replace(tmp, path)  # readers never see half a file


def _paths(out: Path) -> dict[str, Any]:
    coco, cs = out / "coco", out / "cityscapes"
    return {
        "meta": str(out / META_NAME),
        "coco_root": str(coco),
        "cityscapes_root": str(cs),
        **{f"coco_{s}_images": str(coco / _COCO_SPLIT[s]) for s in SPLITS},
        **{f"coco_{s}_annotations": str(coco / "annotations" / f"instances_{_COCO_SPLIT[s]}.json") for s in SPLITS},
        **{f"cityscapes_{s}_images": str(cs / "leftImg8bit" / s) for s in SPLITS},
        **{f"cityscapes_{s}_labels": str(cs / "gtFine" / s) for s in SPLITS},
    }


def _owned_outputs(out: Path) -> list[Path]:
    """Exactly what this module writes (removed on overwrite; nothing else is touched)."""
    p = _paths(out)
    return [Path(p[k]) for k in p if k not in ("coco_root", "cityscapes_root")]


def _count_files(directory: Path, suffix: str) -> int:
    if not directory.is_dir():
        return -1
    return sum(1 for _root, _dirs, files in os.walk(directory) for f in files if f.endswith(suffix))


def _complete(out: Path, params: dict[str, Any]) -> bool:
    p = _paths(out)
    for s in SPLITS:
        n = params[s]
        if not Path(p[f"coco_{s}_annotations"]).is_file():
            return False
        if (_count_files(Path(p[f"coco_{s}_images"]), ".jpg") != n
                or _count_files(Path(p[f"cityscapes_{s}_images"]), "_leftImg8bit.png") != n
                or _count_files(Path(p[f"cityscapes_{s}_labels"]), "_labelTrainIds.png") != n):
            return False
    return True


def _summary(out: Path, meta: dict[str, Any], cached: bool, seconds: float) -> dict[str, Any]:
    return {
        "out_dir": str(out),
        "cached": cached,
        "seconds": seconds,
        "params": meta["params"],
        "version": meta["version"],
        "class_names": meta["class_names"],
        "category_ids": meta["category_ids"],
        "num_classes": meta["num_classes"],
        "counts": meta["counts"],
        "paths": _paths(out),
    }


def _default_workers(n_images: int) -> int:
    # Two processes halve the time on the 2-core machines this targets; for a handful of
    # images starting them costs more than it saves.
    return 1 if n_images < 48 else max(1, min(2, os.cpu_count() or 1))


def make_shapes(out_dir: str | os.PathLike, train: int = 200, val: int = 50,
                size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0, difficulty: str = "normal",
                workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Render the ``shapes`` dataset into ``out_dir`` in COCO and Cityscapes layouts.

    Returns a summary: ``out_dir``, ``cached``, ``seconds``, ``params``, ``class_names``,
    ``category_ids``, ``counts`` (images, objects, crowds, empty images, distractors per split)
    and ``paths``. A directory already holding this exact dataset is returned untouched
    (``cached=True``); one holding different parameters raises :class:`FileExistsError`
    unless ``overwrite=True``. ``workers`` (default: 1 for small runs, else 2) only changes
    speed, never the files.
    """
    start = time.perf_counter()
    for name, n in (("train", train), ("val", val)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= MAX_IMAGES:
            raise ValueError(f"{name} must be an image count in [0, {MAX_IMAGES}], got {n!r}")
    if train + val == 0:
        raise ValueError("train and val are both 0: nothing to generate (ask for at least one image)")
    H, W = _check_size(size)
    _check_difficulty(difficulty)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be None or an int >= 1, got {workers!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")

    params = {"train": int(train), "val": int(val), "size": [H, W], "seed": int(seed), "difficulty": difficulty}
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
            old_key = {"version": old.get("version"), **old.get("params", {})}
        except (json.JSONDecodeError, AttributeError) as e:
            old, old_key = None, {"unreadable": str(e)}
        new_key = {"version": GENERATOR_VERSION, **params}
        if old_key == new_key and _complete(out, params):
            return _summary(out, old, cached=True, seconds=time.perf_counter() - start)
        if old_key != new_key and not overwrite:
            diff = ", ".join(f"{k}: {old_key.get(k)!r} there, {v!r} asked" for k, v in new_key.items()
                             if old_key.get(k) != v) or "unreadable metadata"
            raise FileExistsError(f"{meta_path} describes a different shapes dataset ({diff}); "
                                  f"choose another --out, or pass overwrite=True (--overwrite) to replace it")
    elif not (out / _INCOMPLETE).exists() and not overwrite:
        foreign = [p for p in ("coco", "cityscapes") if (out / p).exists()]
        if foreign:
            raise FileExistsError(f"{out} already holds {' and '.join(foreign)}/ but no {META_NAME}: it is not "
                                  f"a shapes dataset made here; choose another --out, or pass overwrite=True "
                                  f"(--overwrite) to replace those folders")

    # (Re)generate: clear only what this module writes, so no stale image survives.
    out.mkdir(parents=True, exist_ok=True)
    (out / _INCOMPLETE).write_text(json.dumps(params))
    for p in _owned_outputs(out):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for s in SPLITS:
        (out / "coco" / _COCO_SPLIT[s]).mkdir(parents=True, exist_ok=True)
        for city in CITIES[s]:
            (out / "cityscapes" / "leftImg8bit" / s / city).mkdir(parents=True, exist_ok=True)
            (out / "cityscapes" / "gtFine" / s / city).mkdir(parents=True, exist_ok=True)
    (out / "coco" / "annotations").mkdir(parents=True, exist_ok=True)

    tasks = [(str(out), s, i, (H, W), int(seed), difficulty) for s in SPLITS for i in range(params[s])]
    n_workers = min(workers or _default_workers(len(tasks)), len(tasks))
    if n_workers > 1:
        # fork: workers inherit the imported modules (spawn would re-import torch per worker).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(n_workers) as pool:
            results = pool.map(_render_and_write, tasks, chunksize=max(1, len(tasks) // (8 * n_workers)))
    else:
        results = [_render_and_write(t) for t in tasks]

    counts: dict[str, Any] = {}
    pos = 0
    for s in SPLITS:
        part, pos = results[pos:pos + params[s]], pos + params[s]
        coco = _coco_header(s)
        coco["images"] = [r["image"] for r in part]
        coco["annotations"] = []
        for r in part:  # ids in image order: independent of how the work was split
            for a in r["annotations"]:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": r["image"]["id"], **a})
        coco["categories"] = _categories()
        _write_json(out / "coco" / "annotations" / f"instances_{_COCO_SPLIT[s]}.json", coco)
        anns = coco["annotations"]
        counts[s] = {
            "images": len(part),
            "objects": sum(not a["iscrowd"] for a in anns),
            "crowd": sum(a["iscrowd"] for a in anns),
            "small_objects": sum(not a["iscrowd"] and a["area"] < 32 * 32 for a in anns),
            "empty_images": sum(not r["annotations"] for r in part),
            "distractors": sum(r["distractors"] for r in part),
        }

    meta = {
        "dataset": "shapes",
        "generator": "acamkd.data.synthetic",
        "version": GENERATOR_VERSION,
        "params": params,
        "difficulty_settings": asdict(DIFFICULTIES[difficulty]),
        "classes": [{"name": c.name, "category_id": c.category_id, "train_id": i + 1, "hue": c.hue,
                     "texture": c.texture} for i, c in enumerate(CLASSES)],
        "class_names": [c.name for c in CLASSES],
        "category_ids": [c.category_id for c in CLASSES],
        "num_classes": len(CLASSES),
        "train_id_to_category_id": {str(i + 1): c.category_id for i, c in enumerate(CLASSES)},
        "category_id_to_train_id": {str(c.category_id): i + 1 for i, c in enumerate(CLASSES)},
        "background_train_id": 0,
        "ignore_index": IGNORE,
        "cities": {s: list(CITIES[s]) for s in SPLITS},
        "coco_image_id": "train: index + 1; val: 1000000 + index + 1",
        "bbox_convention": "xywh, tight pixel box of the visible pixels: columns x..x+w-1, rows y..y+h-1",
        "counts": counts,
    }
    _write_json(meta_path, meta, indent=2)  # written last: its presence means complete
    (out / _INCOMPLETE).unlink()
    return _summary(out, meta, cached=False, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------- CLI
def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"--size must be HEIGHTxWIDTH (e.g. 256x320) or one side, got {text!r}")
    try:
        return _check_size(tuple(vals), "--size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="acamkd make-data shapes",
        description="Render the built-in shapes dataset in COCO and Cityscapes layouts (no network).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--size", type=_parse_size, default=DEFAULT_SIZE,
                        help=f"HEIGHTxWIDTH (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="normal")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 1 for small runs, else 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a shapes dataset made with other parameters")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """``acamkd make-data shapes``: 0 on success, 2 for bad arguments, 1 when refusing."""
    parser = build_parser()
    if args is None:
        args = parser.parse_args(argv)
    try:
        summary = make_shapes(args.out, train=args.train, val=args.val, size=tuple(args.size), seed=args.seed,
                              difficulty=args.difficulty, workers=args.workers, overwrite=args.overwrite)
    except ValueError as e:
        parser.error(str(e))  # exits 2
    except FileExistsError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        c = summary["counts"]
        what = "cache hit, reused" if summary["cached"] else "wrote"
        print(f"shapes ({summary['params']['difficulty']}): {what} {c['train']['images']} train + "
              f"{c['val']['images']} val images, {c['train']['objects'] + c['val']['objects']} objects, "
              f"in {summary['out_dir']} ({summary['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
