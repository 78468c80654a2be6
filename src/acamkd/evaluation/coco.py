"""COCO box mAP through faster-coco-eval, with inputs checked before the evaluator sees them.

faster-coco-eval gives the same 12 numbers as pycocotools (the tests check this to ~1e-12)
several times faster, because per-image matching and accumulation run in C++. Its own
failures on bad input are bare asserts or KeyErrors deep inside; here a missing file,
malformed JSON, or results that name images/categories the ground truth lacks raise
errors that name the file and the ids. Quiet by default (``verbose=True`` prints the
usual COCOeval table).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np

__all__ = [
    "STAT_KEYS",
    "coco_map",
    "predictions_to_coco_results",
    "evaluate_detections",
    "load_coco_gt",
]

# Order of COCOeval.stats for bbox/segm: AP@[.5:.95], AP50, AP75, AP small/medium/large,
# AR with 1/10/100 detections per image, AR small/medium/large (100 detections).
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
UNMAPPED = ("error", "drop")  # what predictions_to_coco_results does with a label it cannot map
logger = logging.getLogger(__name__)
_SHOW = 10  # how many offending ids an error message lists

PathLike = Union[str, "os.PathLike[str]"]


def _show(ids: Iterable[Any]) -> str:
    """Sorted ids, at most ``_SHOW`` of them, for an error message (mixed types sort by repr)."""
    ids = list(ids)
    try:
        ids = sorted(ids)
    except TypeError:
        ids = sorted(ids, key=repr)
    more = f" ... ({len(ids)} in all)" if len(ids) > _SHOW else ""
    return f"{ids[:_SHOW]}{more}"


def _read_json(path: PathLike, what: str) -> Any:
    """``json.load`` with errors that name the file and say what it was meant to be."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} path is a directory, expected a JSON file: {os.fspath(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {os.fspath(path)} is not valid JSON: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_int_id(v: Any) -> int | None:
    """``v`` as an integer id (integral floats such as ``7.0`` too), or ``None``."""
    if _is_int(v):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _finite_number(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


_ID_FIX = {
    "images": "give every image an integer id and use that number as image_id in its annotations "
              "(a name such as 'img_7' belongs in file_name)",
    "categories": "give every category an integer id and use that number as category_id in the annotations "
                  "(the name belongs in 'name')",
}


def load_coco_gt(gt: PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Read and check a COCO ground-truth file (or an already loaded dict).

    Returns ``(dataset, name)``: a dict the caller may mutate (faster-coco-eval writes into
    annotations) and the name to use in error messages. Errors name the file and the entry:
    image and category ids must be unique integers (``7.0`` becomes ``7``), every annotation
    names a listed image and category and has ``bbox`` (4 numbers), ``area`` and ``iscrowd``
    0/1 (when present). Normalised as :class:`acamkd.data.CocoDetection` does for training, with
    a warning naming the file: an annotation whose bbox has a NaN/inf value is left out, an
    ``area`` that is not a finite number >= 0 becomes the box area clipped to the image.
    Annotation ids are renumbered ``1..N``: COCOeval records a match by annotation id and reads
    0 as "unmatched" (faster-coco-eval any id <= 0), and a repeated id merges annotations; no
    result refers to them, so for a valid file the scores are unchanged.
    """
    if isinstance(gt, Mapping):
        name = "<gt dict>"
        dataset = json.loads(json.dumps(gt))  # deep copy; evaluation mutates annotations
    elif isinstance(gt, (str, os.PathLike)):
        name = os.fspath(gt)
        dataset = _read_json(gt, "COCO ground-truth")
    else:
        raise TypeError(f"gt_json_path must be a path or a COCO dict, got {type(gt).__name__}")

    if not isinstance(dataset, dict):
        raise ValueError(f"COCO ground truth {name}: top level must be an object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"COCO ground truth {name}: key '{key}' must be a list (missing or wrong type)")
    ids: dict[str, set[int]] = {}
    for key in ("images", "categories"):
        seen: set[int] = set()
        for i, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"COCO ground truth {name}: {key}[{i}] has no 'id'")
            value = _as_int_id(entry["id"])
            if value is None:
                raise ValueError(f"COCO ground truth {name}: {key}[{i}] has id={entry['id']!r}, but COCO ids "
                                 f"must be integers; {_ID_FIX[key]}")
            if value in seen:
                raise ValueError(f"COCO ground truth {name}: {key}[{i}] repeats id {value}; ids must be unique")
            seen.add(value)
            entry["id"] = value
        ids[key] = seen
    img_ids, cat_ids = ids["images"], ids["categories"]
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in dataset["images"]}
    kept: list[dict[str, Any]] = []
    nonfinite: list[int] = []  # annotations[i] whose bbox has NaN/inf: no location, left out
    bad_area: list[int] = []  # annotations[i] whose area was replaced by the box area
    for i, ann in enumerate(dataset["annotations"]):
        required = ("image_id", "category_id", "bbox", "area")
        missing = [k for k in required if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"COCO ground truth {name}: annotations[{i}] lacks {missing}")
        where = f"COCO ground truth {name}: annotations[{i}] (id {ann.get('id')!r})"
        image_id, cat_id = _as_int_id(ann["image_id"]), _as_int_id(ann["category_id"])
        if image_id is None or image_id not in img_ids:
            hint = "" if image_id is not None else " (ids are integers: use the image's id from 'images')"
            raise ValueError(f"{where} refers to image_id {ann['image_id']!r}, which is not in 'images'{hint}")
        if cat_id is None or cat_id not in cat_ids:
            hint = "" if cat_id is not None else " (ids are integers: use the category's id, not its name)"
            raise ValueError(f"{where} refers to category_id {ann['category_id']!r}, which is not in "
                             f"'categories'{hint}")
        box = ann["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise ValueError(f"{where} has bbox={box!r}; expected 4 numbers [x, y, width, height]. "
                             f"Fix or delete the annotation.")
        if not all(math.isfinite(v) for v in box):
            nonfinite.append(i)
            continue
        if not _is_number(ann["area"]) or not math.isfinite(ann["area"]) or ann["area"] < 0:
            bad_area.append(i)
            ann["area"] = _clipped_area(box, *sizes[image_id])
        crowd = ann.get("iscrowd")
        crowd = 0 if crowd is None else crowd  # missing or null: an object, as in pycocotools
        if isinstance(crowd, str) or crowd not in (0, 1):
            raise ValueError(f"{where} has iscrowd={crowd!r}; expected 0 (an object) or 1 (a crowd region)")
        ann.update(image_id=image_id, category_id=cat_id, iscrowd=int(crowd))
        kept.append(ann)
    for j, ann in enumerate(kept):
        ann["id"] = j + 1
    dataset["annotations"] = kept
    if nonfinite:
        logger.warning("COCO ground truth %s: left out %d annotation(s) whose bbox has a NaN or infinite value "
                       "(first: annotations[%d]), as CocoDetection does for training; fix or delete them.",
                       name, len(nonfinite), nonfinite[0])
    if bad_area:
        logger.warning("COCO ground truth %s: %d annotation(s) have an 'area' that is not a finite number >= 0 "
                       "(first: annotations[%d]); the box area (clipped to the image) is used instead, as "
                       "CocoDetection does. Fix the areas to silence this.", name, len(bad_area), bad_area[0])
    return dataset, name


def _clipped_area(box: Sequence[float], width: Any, height: Any) -> float:
    """Area of the ``[x, y, w, h]`` box clipped to a ``width`` x ``height`` image (unclipped if
    the image has no numeric size): the area CocoDetection gives an annotation without a valid one."""
    x, y, w, h = (float(v) for v in box)
    x1, y1, x2, y2 = x, y, x + w, y + h
    if _finite_number(width) and _finite_number(height):
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def _check_results(results: list, gt: dict[str, Any], name: str, iou_type: str) -> list[dict[str, Any]]:
    """Copy of ``results`` with each entry checked; ids are checked against the gt file ``name``.

    Copies because faster-coco-eval's ``loadRes`` writes ``id``/``area``/``segmentation``
    into the dicts it is given, which would surprise a caller who reuses the list.
    """
    if not isinstance(results, list):
        raise TypeError(f"results_list must be a list of COCO result dicts, got {type(results).__name__}")
    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise TypeError(f"results_list[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"results_list[{i}] lacks {missing} (a COCO {iou_type} result needs {list(need)})")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or not math.isfinite(score):
            raise ValueError(f"results_list[{i}]: 'score' must be a finite number, got {score!r}")
        if iou_type == "bbox":
            box = r["bbox"]
            if (
                not isinstance(box, (list, tuple))
                or len(box) != 4
                or not all(isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in box)
            ):
                raise ValueError(f"results_list[{i}]: 'bbox' must be 4 finite numbers [x, y, w, h], got {box!r}")
        r = dict(r)
        for key in ("image_id", "category_id"):
            value = _as_int_id(r[key])
            if value is None:
                raise ValueError(f"results_list[{i}]: {key!r} must be an integer id (as in the ground truth), "
                                 f"got {r[key]!r}")
            r[key] = value
        if iou_type == "bbox":
            r["bbox"] = [float(v) for v in r["bbox"]]
        r["score"] = float(score)
        out.append(r)

    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    bad_imgs = {r["image_id"] for r in out} - img_ids
    if bad_imgs:
        raise ValueError(f"results refer to image ids not in the ground truth {name}: {_show(bad_imgs)}")
    bad_cats = {r["category_id"] for r in out} - cat_ids
    if bad_cats:
        raise ValueError(
            f"results refer to category ids not in the ground truth {name}: {_show(bad_cats)} "
            f"(its categories are {_show(cat_ids)}; map contiguous labels back to category ids)"
        )
    return out


def coco_map(
    gt_json_path: PathLike | Mapping[str, Any],
    results_list: list[dict[str, Any]] | PathLike,
    iou_type: str = "bbox",
    img_ids: Iterable[int] | None = None,
    verbose: bool = False,
    per_class: bool = False,
) -> dict[str, float]:
    """The 12 COCO numbers (keys ``STAT_KEYS``) for ``results_list`` against ``gt_json_path``;
    with ``per_class`` also ``AP.<category name>`` (AP@[.5:.95], all areas, 100 detections) for
    every category with ground truth in the evaluated images, in category-id order.

    Values are on COCOeval's 0..1 scale, ``-1.0`` where COCO has nothing to measure (e.g.
    ``APl`` without large ground-truth boxes). Evaluation covers every image of the gt file,
    or only ``img_ids``; an image without detections counts as all misses. ``results_list``
    may also be the path of a results JSON file. An empty list gives zeros (and -1s).
    """
    from faster_coco_eval import COCO, COCOeval_faster  # deferred: C extension, only needed here

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt, name = load_coco_gt(gt_json_path)
    if isinstance(results_list, (str, os.PathLike)):
        results_list = _read_json(results_list, "COCO results")
    results = _check_results(results_list, gt, name, iou_type)

    eval_img_ids = None
    if img_ids is not None:
        eval_img_ids = []
        for k, i in enumerate(img_ids):
            if _as_int_id(i) is None and not (hasattr(i, "item") and _as_int_id(i.item()) is not None):
                raise ValueError(f"img_ids[{k}]={i!r} is not an integer image id (ids of {name} are integers)")
            eval_img_ids.append(int(i))
        eval_img_ids = sorted(set(eval_img_ids))
        unknown = set(eval_img_ids) - {img["id"] for img in gt["images"]}
        if unknown:
            raise ValueError(f"img_ids not in the ground truth {name}: {_show(unknown)}")
        if not eval_img_ids:
            raise ValueError(f"img_ids is empty: nothing to evaluate against {name}")

    # faster-coco-eval logs through `print_function` (logger.debug/info by default); verbose
    # routes it to print. redirect_stdout also catches any stray print in the quiet case.
    log = print if verbose else logger.debug
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO(gt, print_function=log)
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=log)
        if eval_img_ids is not None:
            evaluator.params.imgIds = eval_img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    if stats.shape != (len(STAT_KEYS),):
        raise RuntimeError(f"faster-coco-eval returned {stats.shape[0]} stats, expected {len(STAT_KEYS)}")
    metrics = {key: float(v) for key, v in zip(STAT_KEYS, stats)}
    if per_class:
        metrics.update(_per_class_ap(evaluator, gt))
    return metrics


def _per_class_ap(evaluator: Any, gt: Mapping[str, Any]) -> dict[str, float]:
    """``AP.<name>`` per category from the accumulated precision ``(T, R, K, A, M)`` (area "all",
    the last max-detections), as COCOeval's summary computes the overall AP; categories without
    ground truth in the evaluated images (every entry -1) are left out."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    precision = np.asarray(evaluator.eval["precision"])  # (T, R, K, A, M)
    area = list(evaluator.params.areaRngLbl).index("all")
    out: dict[str, float] = {}
    for k, cid in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, area, -1]
        if (values > -1).any():
            name = names.get(int(cid), str(cid))
            out[f"AP.{name}" if f"AP.{name}" not in out else f"AP.{name}#{cid}"] = float(values[values > -1].mean())
    return out


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy, without autograd."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{what} must be a tensor or array, got {type(x).__name__}") from e


def _round(x: float, decimals: int | None) -> float:
    return float(x) if decimals is None else round(float(x), decimals)


def predictions_to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | Sequence[int | None],
    box_decimals: int | None = 2,
    score_decimals: int | None = 5,
    unmapped: str = "error",
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> a COCO results list.

    ``predictions[i]`` (for image ``image_ids[i]``) holds ``boxes`` ``(N, 4)`` xyxy in the
    original image frame, ``scores`` ``(N,)`` and ``labels`` ``(N,)`` contiguous labels,
    which ``label_to_cat_id`` (dict, or sequence indexed by label; ``None`` = no category,
    e.g. background) maps back to COCO category ids. Boxes become ``[x, y, w, h]``; rounding
    (0.01 px, 1e-5 score by default; ``None`` keeps full precision) only keeps JSON small.

    ``unmapped``: what to do with a prediction whose label has no category id (background
    label 0, a label beyond the dataset's classes): ``"error"`` raises naming it; ``"drop"``
    leaves it out, and likewise a prediction with a NaN/infinite box or score (which COCOeval
    cannot score), and logs one warning with the counts.
    """
    if unmapped not in UNMAPPED:
        raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
    if len(predictions) != len(image_ids):
        raise ValueError(
            f"predictions has {len(predictions)} entries but image_ids has {len(image_ids)}: one id per image"
        )
    results: list[dict[str, Any]] = []
    dropped_labels: dict[int, int] = {}  # label -> how many predictions carried it
    n_nonfinite = 0
    for i, (pred, img_id) in enumerate(zip(predictions, image_ids)):
        img_id = int(img_id)
        if not isinstance(pred, Mapping):
            raise TypeError(f"predictions[{i}] must be a dict with boxes/scores/labels, got {type(pred).__name__}")
        missing = [k for k in ("boxes", "scores", "labels") if k not in pred]
        if missing:
            raise ValueError(f"predictions[{i}] (image_id {img_id}) lacks {missing}")
        boxes = _to_numpy(pred["boxes"], f"predictions[{i}]['boxes']").astype(np.float64)  # (N, 4) xyxy
        scores = _to_numpy(pred["scores"], f"predictions[{i}]['scores']").astype(np.float64)  # (N,)
        labels = _to_numpy(pred["labels"], f"predictions[{i}]['labels']")  # (N,)
        n = scores.shape[0] if scores.ndim == 1 else -1
        if boxes.size == 0 and n == 0:
            boxes = boxes.reshape(0, 4)
        if n < 0 or boxes.shape != (n, 4) or labels.shape != (n,):
            raise ValueError(
                f"predictions[{i}] (image_id {img_id}): expected boxes (N, 4), scores (N,), labels (N,); "
                f"got boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)}, labels {tuple(labels.shape)}"
            )
        xywh = boxes.copy()  # (N, 4)
        xywh[:, 2:] -= boxes[:, :2]
        finite = np.isfinite(xywh).all(axis=1) & np.isfinite(scores)  # (N,)
        for box, score, label, ok in zip(xywh, scores, labels, finite):
            label = int(label)
            try:
                cat_id = label_to_cat_id[label]
            except (KeyError, IndexError):
                cat_id = None
            if cat_id is None or (isinstance(label_to_cat_id, Sequence) and label < 0):
                if unmapped == "drop":
                    dropped_labels[label] = dropped_labels.get(label, 0) + 1
                    continue
                raise ValueError(
                    f"predictions[{i}] (image_id {img_id}): label {label} has no category id in label_to_cat_id"
                )
            if not ok and unmapped == "drop":
                n_nonfinite += 1
                continue
            results.append({
                "image_id": img_id,
                "category_id": int(cat_id),
                "bbox": [_round(v, box_decimals) for v in box],
                "score": _round(score, score_decimals),
            })
    if dropped_labels:
        known = sorted(lab for lab in (label_to_cat_id if isinstance(label_to_cat_id, Mapping)
                                       else range(len(label_to_cat_id))) if label_to_cat_id[lab] is not None)
        logger.warning(
            "evaluation: dropped %d prediction(s) whose label has no category id (label: count %s; labels with "
            "a category: %s). A detector should predict only the dataset's labels: label 0 is background, and "
            "a model built for more classes than the dataset has predicts labels it does not know.",
            sum(dropped_labels.values()), dict(sorted(dropped_labels.items())), _show(known))
    if n_nonfinite:
        logger.warning("evaluation: dropped %d prediction(s) with a NaN or infinite box or score (COCOeval cannot "
                       "score them); the model's outputs are not finite, check its weights and training losses.",
                       n_nonfinite)
    return results


def evaluate_detections(
    gt_json_path: PathLike | Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | Sequence[int | None],
    verbose: bool = False,
    unmapped: str = "drop",
    per_class: bool = False,
) -> dict[str, float]:
    """``coco_map`` of torchvision-style ``predictions`` on exactly the images ``image_ids``.

    Restricting to ``image_ids`` lets a run on a subset of the gt file (a quick validation,
    the demo) be scored fairly; pass every gt image to score the whole set. ``gt_json_path``
    may be a dict: pass ``CocoDetection.coco_gt()`` to score against the annotations the
    dataset checked. A prediction that cannot be scored (its label has no category id, or it
    is not finite) is dropped and counted in a warning (``unmapped="drop"``, see
    :func:`predictions_to_coco_results`), so an odd prediction never aborts an evaluation.
    ``per_class`` adds ``AP.<category name>`` (:func:`coco_map`).
    """
    results = predictions_to_coco_results(predictions, image_ids, label_to_cat_id, unmapped=unmapped)
    return coco_map(gt_json_path, results, iou_type="bbox", img_ids=[int(i) for i in image_ids], verbose=verbose,
                    per_class=per_class)
