"""COCO 2017 detection: the official folder layout, read with the ``json`` module, served in
the torchvision detector target format.

Why our own parser rather than pycocotools: loading needs only three lists from the JSON, and
parsing them here gives errors that name the file, the key and the offending entry, and lets
all boxes live in a few flat numpy arrays (cheap to fork into DataLoader workers: no
per-image Python objects whose refcounts would copy every page).

Conventions (torchvision detectors):

* labels are contiguous ``1..K`` in the order of COCO category ids; ``0`` is background, so
  a torchvision builder takes ``num_classes = K + 1`` (91 ids -> 80 labels -> 81 classes).
  ``label_to_cat_id`` maps predictions back to COCO ids for evaluation;
* boxes are ``xyxy`` in pixels of the decoded image, clipped to it;
* images are float32 ``(3, H, W)`` RGB in ``[0, 1]``, not normalised (torchvision detectors
  normalise inside their ``GeneralizedRCNNTransform``).
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from acamkd.data.images import ON_BAD_IMAGE, BadImageError, load_skipping_bad, read_rgb_image

__all__ = ["CocoDetection", "MIN_BOX_SIZE"]

logger = logging.getLogger("acamkd.data")

# A box narrower or shorter than this (pixels, after clipping) carries no signal and makes
# torchvision's box coders produce inf/NaN (log of width 0): it is dropped and counted.
MIN_BOX_SIZE = 1e-3
COCO_LAYOUT = ("<root>/train2017/*.jpg, <root>/val2017/*.jpg, "
               "<root>/annotations/instances_{train,val}2017.json")
_REQUIRED_KEYS = ("images", "annotations", "categories")


def _load_json(path: str) -> dict[str, Any]:
    """Read a COCO instances file; every failure names ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"COCO annotation file not found: {path}. Expected the official COCO 2017 layout "
            f"{COCO_LAYOUT}; pass root=<that folder>, or ann_file=<path to an instances json>.")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): "
                         f"{e.msg}. Re-download or re-extract the annotations.") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start} ({e.reason}); is this a COCO json?") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object with keys {list(_REQUIRED_KEYS)}, "
                         f"got a {type(data).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (a COCO instances file has {list(_REQUIRED_KEYS)}; "
                             f"found {sorted(data)[:10]})")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: key {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _field(path: str, where: str, entry: Any, key: str) -> Any:
    """``entry[key]``, or an error naming the file, the list entry and the key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{path}: {where} has no {key!r} key")
    return entry[key]


def _ann_where(k: int, ann: Any) -> str:
    return f"annotations[{k}] (id={ann.get('id') if isinstance(ann, dict) else '?'})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_ID_FIX = {
    "image": "give every image an integer id (1, 2, 3, ...) and use that number as image_id in its "
             "annotations; a name such as 'img_7' belongs in file_name",
    "category": "give every category an integer id (1, 2, 3, ...) and use that number as category_id in the "
                "annotations; the name belongs in 'name'",
}


def _int_id(path: str, where: str, value: Any, kind: str) -> int:
    """A COCO id as an ``int`` (integral floats such as ``7.0`` too), or an error naming the entry.

    Ids must be integers: torchvision targets, the results json and the evaluator all carry
    them as numbers, so a string id would only fail later (after training) with no file named.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{path}: {where} has id={value!r}, but COCO {kind} ids must be integers; "
                     f"{_ID_FIX[kind]}.")


def _image_size(path: str, where: str, entry: Any, key: str) -> int:
    """``entry[key]`` (an image's height or width) as a positive int, or an error naming it."""
    value = _field(path, where, entry, key)
    if not _is_number(value) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{path}: {where} has {key}={value!r}; expected the image's {key} in pixels "
                         f"(a positive integer). Fix the entry (it must match the image file).")
    return int(value)


def _valid_area(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value >= 0


_CROWD_FLAGS = (0, 1, None)  # None: missing (an object); True/False and 0.0/1.0 compare equal too


def _listed(value: Any, ids: Any) -> bool:
    """Whether an annotation's ``image_id``/``category_id`` is one of ``ids`` (a bool or an
    unhashable value never is)."""
    try:
        return value in ids and not isinstance(value, bool)
    except TypeError:  # a list or a dict
        return False


def _id_hint(value: Any, kind: str) -> str:
    """What to do about an annotation's image_id/category_id that no entry lists."""
    key = {"image": "images", "category": "categories"}[kind]
    if isinstance(value, str):
        return f"; COCO {kind} ids are integers: use the integer id of the {kind} from {key!r}, not its name"
    return f"; add the {kind} to {key!r}, or fix the annotation"


def _chosen_ids(path: str, names: dict[int, str], chosen: Sequence[int | str]) -> list[int]:
    """The sorted category ids of ``chosen`` (ids or names of ``names``: id -> name), or an error
    naming the file, the entry and close matches."""
    by_name: dict[str, list[int]] = {}
    for cid, name in names.items():
        by_name.setdefault(name, []).append(cid)
    if isinstance(chosen, (str, bytes)) or not len(chosen):
        raise ValueError(f"categories={chosen!r}: give a non-empty list of category ids or names of {path}")
    ids: list[int] = []
    for k, c in enumerate(chosen):
        where = f"categories[{k}]={c!r} (data.categories in a config)"
        if isinstance(c, int) and not isinstance(c, bool):
            if c not in names:
                raise ValueError(f"{where}: {path} has no category id {c}; its ids are "
                                 f"{', '.join(f'{i}={n}' for i, n in sorted(names.items()))}")
            cid = c
        elif isinstance(c, str):
            if c not in by_name:
                close = difflib.get_close_matches(c, list(by_name), n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                raise ValueError(f"{where}: {path} has no category named {c!r}; {hint}its categories are "
                                 f"{', '.join(sorted(by_name))}")
            if len(by_name[c]) > 1:
                raise ValueError(f"{where}: {path} has several categories named {c!r} (ids {by_name[c]}); "
                                 f"choose them by id")
            cid = by_name[c][0]
        else:
            raise ValueError(f"{where}: a category is an integer id or a name, got {type(c).__name__}")
        if cid in ids:
            raise ValueError(f"{where}: category {cid} ({names[cid]!r}) is chosen twice; list it once")
        ids.append(cid)
    return sorted(ids)


class CocoDetection(Dataset):
    """COCO-style detection dataset: ``dataset[i] -> (image (3, H, W) float32, target dict)``.

    ``target``: ``boxes`` (N, 4) float32 xyxy pixels, ``labels`` (N,) int64 in ``1..K``,
    ``image_id`` int (the COCO id), ``orig_size`` (2,) int64 ``(H, W)`` of the decoded image,
    ``area`` (N,) float32 (the annotation's ``area``, i.e. what COCOeval's size ranges use; box
    area when missing), ``iscrowd`` (N,) int64 (all zeros with ``skip_crowd=True``).
    ``transforms(image, target)`` runs last, when given.

    Paths: ``root`` with ``split`` gives ``<root>/<split>2017`` and
    ``<root>/annotations/instances_<split>2017.json``; ``img_dir``/``ann_file`` override each.

    Kept out of the targets, counted, and logged once (logger ``acamkd.data``): crowd regions
    (``skip_crowd=True``; torchvision's reference drops them too) and degenerate boxes (no
    ``bbox``, a NaN/inf value in it, or width/height ``<= MIN_BOX_SIZE`` after clipping).
    Images without any annotation stay in the dataset with ``boxes`` of shape (0, 4).

    ``categories`` (ids or names, ``data.categories`` in a config): train and evaluate on these
    categories of the file only. Labels ``1..K`` follow their ids' sorted order, as for the whole
    file, and ``label_to_cat_id`` maps them back to the file's ids, so results and exports carry
    the real category ids; annotations of other categories are left out of training and of
    :meth:`coco_gt` alike (counted in ``num_other_category`` and logged); their images stay, as
    images with fewer (or no) objects. A name or id the file does not list raises ``ValueError``
    naming the file, the entry and close matches.

    Checked once, here, with errors naming the file and ``images[k]``/``categories[k]``/
    ``annotations[k]``: image and category ids are integers (``7.0`` is read as ``7``; a name
    such as ``"img_7"`` is refused: the targets, the results and the evaluator carry ids as
    numbers), image sizes positive, ``iscrowd`` 0 or 1. An ``area`` that is missing (silently)
    or not a finite number >= 0 (with a warning) becomes the clipped box's area. A file whose
    split has no usable box, or whose boxes all have area 0, is warned about once.
    :meth:`coco_gt` gives the evaluator these same checked annotations, so training and
    evaluation never read the file differently.

    Bad images. Files listed in the json but absent from ``img_dir`` are found at construction
    (one directory listing, not one stat per file): ``on_bad_image="error"`` raises naming them,
    ``"skip"`` leaves them out of ``image_ids``. Files that exist but cannot be decoded (or decode
    to a size other than the json's width/height, which would misplace every box) are found
    lazily in ``__getitem__``: "error" raises :class:`BadImageError` naming the path, "skip"
    returns the next valid item (``i+1, i+2, ...`` wrapping around, so the answer is
    deterministic). Every skipped file is recorded in ``skipped`` (path -> reason) and logged
    once. With DataLoader workers each worker holds its own copy of ``skipped``.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 img_dir: str | os.PathLike | None = None, ann_file: str | os.PathLike | None = None,
                 transforms: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None,
                 on_bad_image: str = "error", skip_crowd: bool = True,
                 categories: Sequence[int | str] | None = None) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"CocoDetection: on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if root is None and (img_dir is None or ann_file is None):
            raise ValueError(f"CocoDetection: pass root=<COCO folder> (layout {COCO_LAYOUT}), "
                             f"or both img_dir= and ann_file=")
        self.root = None if root is None else os.fspath(root)
        self.split = split
        self.img_dir = os.fspath(img_dir) if img_dir is not None else os.path.join(self.root, f"{split}2017")
        self.ann_file = (os.fspath(ann_file) if ann_file is not None
                         else os.path.join(self.root, "annotations", f"instances_{split}2017.json"))
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.skip_crowd = bool(skip_crowd)
        self.skipped: dict[str, str] = {}  # path -> why it was skipped
        self._bad: set[int] = set()  # dataset positions known to be undecodable

        data = _load_json(self.ann_file)
        self._parse_categories(data["categories"], categories)
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])

    # ----------------------------------------------------------------------------- parsing
    def _parse_categories(self, cats: list, chosen: Sequence[int | str] | None) -> None:
        path = self.ann_file
        names: dict[int, str] = {}
        for k, cat in enumerate(cats):
            cid = _int_id(path, f"categories[{k}]", _field(path, f"categories[{k}]", cat, "id"), "category")
            name = _field(path, f"categories[{k}]", cat, "name")
            if cid in names:
                raise ValueError(f"{path}: categories[{k}] repeats category id {cid} ({names[cid]!r} and {name!r})")
            names[cid] = str(name)
        if not names:
            raise ValueError(f"{path}: 'categories' is empty; a detection dataset needs at least one class")
        self._file_cat_ids = set(names)
        self.cat_ids: list[int] = sorted(names) if chosen is None else _chosen_ids(path, names, chosen)
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}  # 0 = background
        self.label_to_cat_id: dict[int, int] = {lab: cid for cid, lab in self.cat_id_to_label.items()}
        self.class_names: list[str] = ["__background__"] + [names[c] for c in self.cat_ids]  # index by label
        self.num_classes: int = len(self.cat_ids) + 1  # K + 1, what torchvision builders take

    def _parse_images(self, images: list) -> None:
        path = self.ann_file
        info: dict[int, tuple[str, int, int]] = {}  # id -> (file_name, H, W)
        for k, img in enumerate(images):
            where = f"images[{k}]"
            iid = _int_id(path, where, _field(path, where, img, "id"), "image")
            entry = (str(_field(path, where, img, "file_name")),
                     _image_size(path, where, img, "height"), _image_size(path, where, img, "width"))
            if iid in info:
                raise ValueError(f"{path}: {where} repeats image id {iid}; every image needs its own id")
            info[iid] = entry
        if not info:
            raise ValueError(f"{path}: 'images' is empty; there is nothing to train on or evaluate. "
                             f"Check that this is the right annotation file.")
        self._all_image_ids = set(info)
        if not os.path.isdir(self.img_dir):
            raise FileNotFoundError(
                f"COCO image folder not found: {self.img_dir} (images listed in {path}). Expected the "
                f"official layout {COCO_LAYOUT}; or pass img_dir=<folder with the images>.")
        ids = sorted(info)  # torchvision's order: by image id
        missing = self._missing_files([info[i][0] for i in ids])
        if missing:
            shown = ", ".join(os.path.join(self.img_dir, f) for f in missing[:3])
            if self.on_bad_image == "error":
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) listed in {path} are missing from {self.img_dir}: "
                    f"{shown}{' ...' if len(missing) > 3 else ''}. Re-extract the images, point img_dir= "
                    f"at the right folder, or pass on_bad_image='skip' to leave them out.")
            gone = set(missing)
            for f in missing:
                self.skipped[os.path.join(self.img_dir, f)] = "missing on disk"
            ids = [i for i in ids if info[i][0] not in gone]
            logger.warning("%s: %d image file(s) listed in %s are missing from %s and were left out "
                           "(on_bad_image='skip'); first: %s", type(self).__name__, len(missing), path,
                           self.img_dir, shown)
        self.image_ids: list[int] = ids
        self.file_names: list[str] = [info[i][0] for i in ids]
        self._sizes = np.array([info[i][1:] for i in ids], dtype=np.int64).reshape(-1, 2)  # (N, 2) H, W

    def _missing_files(self, file_names: list[str]) -> list[str]:
        """File names absent from ``img_dir``: one listing of the folder (stat-free) when every
        name is a plain base name, one ``os.path.exists`` each otherwise."""
        if all(os.sep not in f and "/" not in f for f in file_names):
            on_disk = set(os.listdir(self.img_dir))
            return [f for f in file_names if f not in on_disk]
        return [f for f in file_names if not os.path.exists(os.path.join(self.img_dir, f))]

    def _parse_annotations(self, anns: list) -> None:
        """Check every annotation once and keep two views of the same checked rows: the training
        targets (crowd regions with ``skip_crowd`` and degenerate boxes left out, boxes clipped)
        and the evaluation ground truth (:meth:`coco_gt`: crowd regions kept, as COCOeval's
        ignore regions, boxes as written). Both drop annotations without a usable box and both
        use the same areas."""
        path = self.ann_file
        pos = {iid: p for p, iid in enumerate(self.image_ids)}
        rows_k, rows_img, rows_box, rows_label, rows_area, rows_crowd = [], [], [], [], [], []
        n_crowd = n_nobox = n_bad_area = n_other = 0
        first_bad_area = -1
        for k, ann in enumerate(anns):
            try:  # fast path; the message (an f-string per annotation is not free on 860k) only on failure
                iid, cid = ann["image_id"], ann["category_id"]
            except (KeyError, TypeError):
                for key in ("image_id", "category_id"):
                    _field(path, _ann_where(k, ann), ann, key)
                raise
            if not _listed(iid, self._all_image_ids):
                raise ValueError(f"{path}: {_ann_where(k, ann)} points to image_id={iid!r}, which is not listed "
                                 f"in 'images'{_id_hint(iid, 'image')}")
            if not _listed(cid, self.cat_id_to_label):
                if _listed(cid, self._file_cat_ids):  # a category not chosen (``categories``)
                    n_other += 1
                    continue
                raise ValueError(f"{path}: {_ann_where(k, ann)} has category_id={cid!r}, which is not listed "
                                 f"in 'categories' (known ids: {self.cat_ids[:10]}{' ...' if len(self.cat_ids) > 10 else ''})"
                                 f"{_id_hint(cid, 'category')}")
            crowd = ann.get("iscrowd", 0)
            if crowd not in _CROWD_FLAGS or isinstance(crowd, str):
                raise ValueError(f"{path}: {_ann_where(k, ann)} has iscrowd={crowd!r}; expected 0 (an object) or "
                                 f"1 (a crowd region). Fix the entry.")
            crowd = 1 if crowd else 0
            for_training = not (crowd and self.skip_crowd)
            if not for_training:
                n_crowd += 1
            if iid not in pos:  # its image was left out (missing on disk, on_bad_image="skip")
                continue
            bbox = ann.get("bbox")
            if bbox is None or (isinstance(bbox, list) and len(bbox) == 0):
                n_nobox += for_training
                continue
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"{path}: {_ann_where(k, ann)} has bbox={bbox!r}; expected [x, y, width, height]")
            area = ann.get("area")
            if area is None:  # missing: the box area, as documented
                area = -1.0
            elif not _valid_area(area):
                n_bad_area += 1
                first_bad_area = k if first_bad_area < 0 else first_bad_area
                area = -1.0
            rows_k.append(k)
            rows_img.append(pos[iid])
            rows_box.append(bbox)
            rows_label.append(self.cat_id_to_label[cid])
            rows_area.append(area)
            rows_crowd.append(crowd)

        n_img = len(self.image_ids)
        img = np.asarray(rows_img, dtype=np.int64)  # (R,) every row with a bbox, file order
        xywh = np.array(rows_box)  # (R, 4); a string or null anywhere gives a non-numeric dtype
        if xywh.size and xywh.dtype.kind not in "iuf":  # find the culprit for the message
            for k, ann in enumerate(anns):
                bbox = ann.get("bbox")
                if isinstance(bbox, list) and not all(_is_number(v) for v in bbox):
                    raise ValueError(f"{path}: {_ann_where(k, ann)} has bbox={bbox!r}; "
                                     f"expected 4 numbers [x, y, width, height]")
        xywh = xywh.astype(np.float64).reshape(-1, 4)
        finite = np.isfinite(xywh).all(axis=1)  # (R,) NaN/inf anywhere: no location, dropped everywhere
        safe = np.where(finite[:, None], xywh, 0.0)  # (R, 4) no inf - inf below
        hw = self._sizes[img].astype(np.float64)  # (R, 2) height, width of each box's image
        x1 = np.clip(safe[:, 0], 0, hw[:, 1])
        y1 = np.clip(safe[:, 1], 0, hw[:, 0])
        x2 = np.clip(safe[:, 0] + safe[:, 2], 0, hw[:, 1])
        y2 = np.clip(safe[:, 1] + safe[:, 3], 0, hw[:, 0])
        crowd = np.asarray(rows_crowd, dtype=np.int64)  # (R,)
        labels = np.asarray(rows_label, dtype=np.int64)  # (R,)
        for_training = (crowd == 0) if self.skip_crowd else np.ones(len(crowd), dtype=bool)
        keep = for_training & finite & ((x2 - x1) > MIN_BOX_SIZE) & ((y2 - y1) > MIN_BOX_SIZE)
        n_degenerate = n_nobox + int((for_training & ~keep).sum())
        area = np.asarray(rows_area, dtype=np.float64)  # (R,) -1: missing or invalid
        area = np.where(area >= 0, area, np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0))  # -> clipped box's

        # training view: grouped by image, json order within an image
        order = np.argsort(img[keep], kind="stable")
        self._boxes = np.stack([x1, y1, x2, y2], axis=1)[keep][order].astype(np.float32)  # (A, 4) xyxy
        self._labels = labels[keep][order]  # (A,)
        self._area = area[keep][order].astype(np.float32)  # (A,)
        self._iscrowd = crowd[keep][order]  # (A,)
        counts = np.bincount(img[keep], minlength=n_img)  # (N,)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (N + 1,)
        # evaluation view (coco_gt): every row with a finite box, json order, boxes as written
        self._gt_img, self._gt_label, self._gt_crowd = img[finite], labels[finite], crowd[finite]  # (G,)
        self._gt_xywh, self._gt_area = xywh[finite], area[finite]  # (G, 4), (G,) float64

        self.num_degenerate = n_degenerate
        self.num_crowd_skipped = n_crowd
        self.num_nonfinite = int((~finite).sum())
        self.num_bad_area = n_bad_area
        self.num_other_category = n_other
        name = type(self).__name__
        if n_other:
            logger.info("%s %s: %d annotation(s) of categories not chosen left out (training on %d of %d "
                        "categories: %s)", name, path, n_other, len(self.cat_ids), len(self._file_cat_ids),
                        ", ".join(f"{cid}={self.class_names[lab]}" for lab, cid in self.label_to_cat_id.items()))
        if n_degenerate:
            logger.warning("%s %s: dropped %d degenerate box(es) (no bbox, or width/height <= %g px after "
                           "clipping to the image) out of %d annotations", name, path,
                           n_degenerate, MIN_BOX_SIZE, len(anns))
        if self.num_nonfinite:
            k = rows_k[int(np.flatnonzero(~finite)[0])]
            logger.warning("%s %s: %d annotation(s) have a bbox with a NaN or infinite value (first: %s bbox=%r); "
                           "they are left out of training and evaluation alike. Fix or delete them.", name, path,
                           self.num_nonfinite, _ann_where(k, anns[k]), anns[k].get("bbox"))
        if n_bad_area:
            bad = anns[first_bad_area]
            logger.warning("%s %s: %d annotation(s) have an 'area' that is not a finite number >= 0 (first: %s "
                           "area=%r); the clipped box area is used instead, in training and evaluation alike. "
                           "Fix the areas (or delete the key) to silence this.", name, path, n_bad_area,
                           _ann_where(first_bad_area, bad), bad.get("area"))
        if not len(self._boxes):
            logger.warning("%s %s: no usable boxes (%d annotations over %d images): a detector trained on it "
                           "learns only background, and COCO evaluation on it has nothing to measure (AP -1). "
                           "Check that this is the annotation file you meant.", name, path, len(anns), n_img)
        elif not (self._area > 0).any():
            logger.warning("%s %s: every one of its %d boxes has 'area' 0, so COCO's size ranges count every "
                           "object as small (APm/APl -1). Fill in the real areas, or delete the 'area' keys to use "
                           "the box areas.", name, path, len(self._boxes))
        logger.info("%s %s: %d images, %d boxes, %d classes (+background), %d crowd regions left out",
                    name, path, n_img, len(self._boxes), len(self.cat_ids), n_crowd)

    def coco_gt(self) -> dict[str, Any]:
        """The checked annotations as a COCO dict for the evaluator (``evaluate_detections``).

        The same annotations as training sees, as COCOeval wants them: boxes ``[x, y, w, h]``
        as written (not clipped), crowd regions kept (``iscrowd=1``: ignore regions), areas
        filled where the file's was missing or invalid, annotations without a usable box left
        out, images this dataset serves. Annotation ids are renumbered ``1..G``: COCOeval
        uses an annotation id of 0 as "unmatched" (and a repeated id merges annotations), and
        no result refers to them, so scores are unchanged for valid files.
        """
        image_ids = np.asarray(self.image_ids, dtype=np.int64)
        cat_ids = np.asarray([0] + self.cat_ids, dtype=np.int64)  # indexed by label
        images = [{"id": int(iid), "file_name": f, "height": int(h), "width": int(w)}
                  for iid, f, (h, w) in zip(self.image_ids, self.file_names, self._sizes.tolist())]
        categories = [{"id": int(cid), "name": self.class_names[lab]} for lab, cid in self.label_to_cat_id.items()]
        annotations = [{"id": j + 1, "image_id": iid, "category_id": cid, "bbox": box, "area": area, "iscrowd": crowd}
                       for j, (iid, cid, box, area, crowd) in enumerate(zip(
                           image_ids[self._gt_img].tolist(), cat_ids[self._gt_label].tolist(),
                           self._gt_xywh.tolist(), self._gt_area.tolist(), self._gt_crowd.tolist()))]
        return {"images": images, "categories": categories, "annotations": annotations}

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_dir, self.file_names[index])

    def target(self, index: int) -> dict[str, Any]:
        """The target of item ``index`` without decoding its image (and without ``transforms``)."""
        s, e = int(self._offsets[index]), int(self._offsets[index + 1])
        return {
            "boxes": torch.from_numpy(self._boxes[s:e].copy()),  # (N, 4) xyxy
            "labels": torch.from_numpy(self._labels[s:e].copy()),  # (N,)
            "image_id": int(self.image_ids[index]),
            "orig_size": torch.from_numpy(self._sizes[index].copy()),  # (2,) H, W
            "area": torch.from_numpy(self._area[s:e].copy()),  # (N,)
            "iscrowd": torch.from_numpy(self._iscrowd[s:e].copy()),  # (N,)
        }

    def _load_image(self, index: int) -> Tensor:
        path = self.image_path(index)
        image = read_rgb_image(path)  # (3, H, W)
        h, w = (int(v) for v in self._sizes[index])
        if tuple(image.shape[1:]) != (h, w):
            raise BadImageError(f"{path}: decoded size {image.shape[1]}x{image.shape[2]} (HxW) differs from "
                                f"{h}x{w} recorded in {self.ann_file}; its boxes would be misplaced. "
                                f"Replace the file, or pass on_bad_image='skip'.")
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return load_skipping_bad(self, index, self._load_pair, self.image_path, self.img_dir)

    def _load_pair(self, j: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self._load_image(j), self.target(j)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_dir={self.img_dir!r}, ann_file={self.ann_file!r}, "
                f"images={len(self)}, num_classes={self.num_classes}, on_bad_image={self.on_bad_image!r})")
