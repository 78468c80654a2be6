"""Cityscapes semantic segmentation (gtFine), the official folder layout, and any dataset in it.

``dataset[i] -> (image (3, H, W) float32 RGB in [0, 1], label (H, W) int64)``, the label in
train ids ``0..num_classes-1`` with ``ignore_index`` (255 by default) = ignore. Labels are read from
``*_gtFine_labelTrainIds.png`` (what cityscapesScripts' ``createTrainIdLabelImgs`` writes);
when only ``*_gtFine_labelIds.png`` exists the 34 raw ids are mapped here, with the official
table, so a fresh download works without running the preparation script.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from acamkd.data.classes import CLASSES_FILE
from acamkd.data.images import ON_BAD_IMAGE, BadImageError, load_skipping_bad, read_rgb_image, tile_rawmode

__all__ = ["CityscapesSegmentation", "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "IGNORE_INDEX",
           "labelids_to_trainids"]

logger = logging.getLogger("acamkd.data")

IGNORE_INDEX = 255
CITYSCAPES_LAYOUT = ("<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                     "<root>/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)")
_IMG_SUFFIX = "_leftImg8bit.png"
_TRAINIDS_SUFFIX = "_gtFine_labelTrainIds.png"
_LABELIDS_SUFFIX = "_gtFine_labelIds.png"

# The 19 evaluated classes, in train-id order (cityscapesScripts, helpers/labels.py).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# label id -> train id, transcribed from the `labels` table of cityscapesScripts,
# cityscapesscripts/helpers/labels.py (github.com/mcordts/cityscapesScripts). Ids whose
# trainId is 255 ("ignoreInEval") and the license plate (id -1, trainId -1 there) become 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    0: 255,   # unlabeled
    1: 255,   # ego vehicle
    2: 255,   # rectification border
    3: 255,   # out of roi
    4: 255,   # static
    5: 255,   # dynamic
    6: 255,   # ground
    7: 0,     # road
    8: 1,     # sidewalk
    9: 255,   # parking
    10: 255,  # rail track
    11: 2,    # building
    12: 3,    # wall
    13: 4,    # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,    # pole
    18: 255,  # polegroup
    19: 6,    # traffic light
    20: 7,    # traffic sign
    21: 8,    # vegetation
    22: 9,    # terrain
    23: 10,   # sky
    24: 11,   # person
    25: 12,   # rider
    26: 13,   # car
    27: 14,   # truck
    28: 15,   # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,   # train
    32: 17,   # motorcycle
    33: 18,   # bicycle
    -1: 255,  # license plate (trainId -1 in labels.py)
}

# uint8 lookup table; -1 cannot be stored in an 8-bit png except as its wrap-around 255.
_LUT_UNKNOWN = 0xFFFF
_ID_LUT = np.full(256, _LUT_UNKNOWN, dtype=np.uint16)
for _id, _train in CITYSCAPES_ID_TO_TRAINID.items():
    _ID_LUT[_id & 0xFF] = _train
del _id, _train

# Pillow rawmodes that change a stored integer, so a label id would change. 2- and 4-bit grey is
# scaled to 0..255 (x 85, x 17): undone exactly. Min-is-white grey (TIFF) is inverted: refused.
_SCALED_GREY = {"L;2": 85, "L;2R": 85, "L;4": 17, "L;4R": 17}
_INVERTED_GREY = frozenset({"1;I", "1;IR", "L;I", "L;IR", "L;2I", "L;2IR", "L;4I", "L;4IR"})
_LABEL_FIX = "Write the label map as a PNG of mode L (8-bit) or P (palette indices = ids), one id per pixel."


def _present_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label array (bincount for uint8: much faster than unique)."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    return np.unique(arr)


def labelids_to_trainids(label_ids: np.ndarray, path: str = "<array>") -> np.ndarray:
    """Map a Cityscapes labelIds array ``(H, W)`` to train ids (uint8, 255 = ignore).

    Accepts ids ``0..33``, ``-1`` (license plate) and ``255`` (``-1`` stored in 8 bits); any
    other value raises ``ValueError`` listing them, with ``path`` in the message.
    """
    arr = np.asarray(label_ids)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{path}: label ids must be integers, got dtype {arr.dtype}")
        bad = [int(v) for v in _present_values(arr) if not (-1 <= v <= 255)]
        if bad:
            raise ValueError(f"{path}: values {bad[:20]} are not Cityscapes label ids (0..33, -1 license plate)")
        arr = (arr & 0xFF).astype(np.uint8)  # -1 -> 255
    mapped = _ID_LUT[arr]  # (H, W) uint16
    present = _present_values(arr)
    bad = [int(v) for v in present if _ID_LUT[v] == _LUT_UNKNOWN]
    if bad:
        raise ValueError(f"{path}: values {bad[:20]} are not Cityscapes label ids (0..33, -1/255 license "
                         f"plate/ignore); is this a *_labelIds.png?")
    return mapped.astype(np.uint8)


def _stored_ids(arr: np.ndarray, path: str, mode: str, fmt: str | None, codec: str | None,
                rawmode: object) -> np.ndarray:
    """The integers stored in a decoded label map ``arr`` (mode ``mode``, Pillow ``rawmode``), or
    ``ValueError`` naming ``path`` and the mode where Pillow changed them in a way not undone here:
    label ids are never silently rescaled, inverted or approximated."""
    if arr.ndim != 2:
        raise ValueError(f"{path}: a label png must have one channel of ids, got mode {mode!r} with shape "
                         f"{arr.shape} (a *_color.png instead of *_labelTrainIds.png?)")
    if fmt in ("JPEG", "MPO"):
        raise ValueError(f"{path}: the label map is a JPEG (mode {mode!r}): lossy compression changes the ids "
                         f"along every edge. {_LABEL_FIX}")
    if codec == "ppm" and isinstance(rawmode, tuple) and rawmode[1] not in (255, 65535):
        full = 255 if mode == "L" else 65535
        raise ValueError(f"{path}: a PGM label map with maxval {rawmode[1]} (mode {mode!r}): Pillow rescales its "
                         f"values to 0..{full}, which would change the ids. {_LABEL_FIX}")
    if rawmode in _INVERTED_GREY:
        raise ValueError(f"{path}: the label map is stored min-is-white (mode {mode!r}, raw {rawmode!r}): "
                         f"Pillow inverts its values, which would change the ids. {_LABEL_FIX}")
    if rawmode in _SCALED_GREY:  # 2/4-bit grey: Pillow multiplied each id by 85/17; undo it exactly
        factor = _SCALED_GREY[rawmode]
        if (arr % factor).any():  # cannot happen with Pillow's unpackers; never guess
            raise ValueError(f"{path}: {rawmode[2]}-bit label map (mode {mode!r}) decoded to values that are not "
                             f"multiples of {factor}. {_LABEL_FIX}")
        return arr // factor
    if arr.dtype == np.bool_:  # mode "1": one bit per pixel, ids 0 and 1
        return arr.astype(np.uint8)
    return arr


class CityscapesSegmentation(Dataset):
    """Cityscapes-layout segmentation dataset: ``dataset[i] -> (image, label)``.

    ``image``: float32 ``(3, H, W)`` RGB in ``[0, 1]``; ``label``: int64 ``(H, W)`` in
    ``0..num_classes-1`` or ``ignore_index`` (ignore). ``transforms(image, label)`` runs last.

    Files are found at construction, in sorted (city, file) order, so indices are stable.
    Per image, ``*_gtFine_labelTrainIds.png`` is used when present, else
    ``*_gtFine_labelIds.png`` mapped with :data:`CITYSCAPES_ID_TO_TRAINID` (only meaningful for
    the 19-class table, so it needs ``num_classes=19``).

    ``num_classes``/``class_names``/``ignore_index`` let any dataset in the same layout (your own,
    the built-in synthetic one) use this loader; ``class_names[train_id]`` names a class, and
    ``ignore_index`` (not a train id) marks unlabelled pixels.

    ``on_bad_image``: a file that cannot be decoded raises :class:`BadImageError` naming it
    ("error"), or is skipped ("skip": the next valid index, wrapping around, deterministic;
    recorded in ``skipped`` path -> reason and logged). Wrong *content* (label values outside
    the train ids, image/label size mismatch, a colour png given as a label) always raises
    ``ValueError``: it means a wrong file set or a wrong ``num_classes``, which skipping would hide.

    Label maps are read as the integers stored, never rescaled: 8-bit (``L``), palette indices
    (``P``), 1-, 2- and 4-bit grey (Pillow's scaling of 2/4-bit grey to 0..255 is undone) and
    16/32-bit integer pngs all give their ids; a colour or alpha png, a float map, a JPEG
    (lossy), a min-is-white TIFF and a PGM with a maxval Pillow rescales raise ``ValueError``
    naming the file and its mode. Images: see :func:`acamkd.data.images.read_rgb_image`.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transforms: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                 on_bad_image: str = "error", num_classes: int = 19,
                 class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"CityscapesSegmentation: on_bad_image must be one of {ON_BAD_IMAGE}, "
                             f"got {on_bad_image!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"CityscapesSegmentation: num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise ValueError(f"CityscapesSegmentation: ignore_index={ignore_index!r} is one of the train ids "
                             f"0..{num_classes - 1}; pick the label of unlabelled pixels outside them (e.g. 255)")
        if class_names is None:
            class_names = CITYSCAPES_CLASSES if num_classes == 19 else [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"CityscapesSegmentation: class_names has {len(class_names)} names, "
                             f"num_classes is {num_classes}")
        self.root = os.fspath(root)
        self.split = split
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names: list[str] = [str(c) for c in class_names]
        self.skipped: dict[str, str] = {}  # path -> why it was skipped
        self._bad: set[int] = set()
        self.images, self.label_files, self.label_kinds = self._find_files()
        if (num_classes != 19 or ignore_index != IGNORE_INDEX) and "labelIds" in self.label_kinds:
            first = self.label_files[self.label_kinds.index("labelIds")]
            raise ValueError(f"{first}: only a *_gtFine_labelIds.png exists, and mapping label ids to train "
                             f"ids uses the 19-class Cityscapes table (ignore 255), but num_classes={num_classes}, "
                             f"ignore_index={ignore_index}. Write *_gtFine_labelTrainIds.png files for your "
                             f"classes, or use num_classes=19 and ignore_index=255.")
        n_mapped = self.label_kinds.count("labelIds")
        logger.info("%s %s/%s: %d images (%d labels mapped from labelIds), %d classes",
                    type(self).__name__, self.root, split, len(self.images), n_mapped, num_classes)

    def _find_files(self) -> tuple[list[str], list[str], list[str]]:
        img_root = os.path.join(self.root, "leftImg8bit", self.split)
        gt_root = os.path.join(self.root, "gtFine", self.split)
        if not os.path.isdir(img_root):
            raise FileNotFoundError(f"Cityscapes image folder not found: {img_root}. Expected the layout "
                                    f"{CITYSCAPES_LAYOUT}; pass root=<that folder> and split=<train|val|test>.")
        images, labels, kinds = [], [], []
        for city in sorted(os.listdir(img_root)):
            city_dir = os.path.join(img_root, city)
            if not os.path.isdir(city_dir):
                continue
            gt_dir = os.path.join(gt_root, city)
            gt_names = set(os.listdir(gt_dir)) if os.path.isdir(gt_dir) else set()
            for name in sorted(os.listdir(city_dir)):
                if not name.endswith(_IMG_SUFFIX):
                    continue
                stem = name[: -len(_IMG_SUFFIX)]
                if stem + _TRAINIDS_SUFFIX in gt_names:
                    labels.append(os.path.join(gt_dir, stem + _TRAINIDS_SUFFIX))
                    kinds.append("trainIds")
                elif stem + _LABELIDS_SUFFIX in gt_names:
                    labels.append(os.path.join(gt_dir, stem + _LABELIDS_SUFFIX))
                    kinds.append("labelIds")
                else:
                    raise FileNotFoundError(
                        f"{os.path.join(city_dir, name)} has no label file: looked for "
                        f"{os.path.join(gt_dir, stem + _TRAINIDS_SUFFIX)} and {stem + _LABELIDS_SUFFIX} "
                        f"in the same folder. Expected the layout {CITYSCAPES_LAYOUT}.")
                images.append(os.path.join(city_dir, name))
        if not images:
            raise FileNotFoundError(f"no *{_IMG_SUFFIX} images found under {img_root} (searched its city "
                                    f"sub-folders). Expected the layout {CITYSCAPES_LAYOUT}.")
        return images, labels, kinds

    def __len__(self) -> int:
        return len(self.images)

    def _read_label(self, index: int) -> np.ndarray:
        """Decode, map if labelIds, check values; ``(H, W)`` integer train ids (uint8 or wider)."""
        path = self.label_files[index]
        try:
            with Image.open(path) as im:
                codec, rawmode = tile_rawmode(im)  # before load(): how Pillow unpacks the stored ids
                im.load()
                mode, fmt = im.mode, im.format
                # no convert(): a palette ("P") png's indices are the ids, its colours are not
                arr = np.array(im)
        except Exception as e:
            raise BadImageError(f"{path}: cannot decode label png ({type(e).__name__}: {e}). "
                                f"Re-extract the file, or pass on_bad_image='skip'.") from e
        arr = _stored_ids(arr, path, mode, fmt, codec, rawmode)
        if self.label_kinds[index] == "labelIds":
            return labelids_to_trainids(arr, path)
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{path}: label values must be integers, got dtype {arr.dtype} (mode {mode!r}). "
                                 f"{_LABEL_FIX}")
        present = _present_values(arr)
        bad = [int(v) for v in present if not (0 <= v < self.num_classes or v == self.ignore_index)]
        if bad:
            raise ValueError(f"{path}: label values {bad[:20]}{' ...' if len(bad) > 20 else ''} are outside "
                             f"the train ids 0..{self.num_classes - 1} and {self.ignore_index} (ignore). If your "
                             f"data has more classes, set data.num_classes (and data.class_names, or a "
                             f"{CLASSES_FILE} in {self.root}); if those values mark unlabelled pixels, set "
                             f"data.ignore_index; else the file is a labelIds png saved under the labelTrainIds "
                             f"name, or a wrong file")
        return arr

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        image = read_rgb_image(self.images[index])  # (3, H, W)
        label = self._read_label(index)  # (H, W)
        if tuple(image.shape[1:]) != label.shape:
            raise ValueError(f"size mismatch: image {self.images[index]} is {image.shape[1]}x{image.shape[2]} "
                             f"(HxW), label {self.label_files[index]} is {label.shape[0]}x{label.shape[1]}")
        return image, torch.from_numpy(label.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return load_skipping_bad(self, index, self._load_pair, self.images.__getitem__, self.root)

    def _load_pair(self, j: int) -> tuple[Tensor, Tensor]:
        image, label = self._load(j)
        if self.transforms is not None:
            image, label = self.transforms(image, label)
        return image, label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, images={len(self)}, "
                f"num_classes={self.num_classes}, on_bad_image={self.on_bad_image!r})")
