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
_SHOW = 10  # how many offending ids an error message lists

PathLike = Union[str, "os.PathLike[str]"]


def _show(ids: Iterable[Any]) -> str:
    """Sorted ids, at most ``_SHOW`` of them, for an error message."""
    ids = sorted(ids)
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


def load_coco_gt(gt: PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Read and check a COCO ground-truth file (or an already loaded dict).

    Returns ``(dataset, name)``: a dict the caller may mutate (faster-coco-eval writes into
    annotations) and the name to use in error messages.
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
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise ValueError(f"COCO ground truth {name}: images[{i}] has no 'id'")
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise ValueError(f"COCO ground truth {name}: categories[{i}] has no 'id'")
    img_ids = {img["id"] for img in dataset["images"]}
    cat_ids = {cat["id"] for cat in dataset["categories"]}
    for i, ann in enumerate(dataset["annotations"]):
        required = ("id", "image_id", "category_id", "bbox", "area")
        missing = [k for k in required if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"COCO ground truth {name}: annotations[{i}] lacks {missing}")
        if ann["image_id"] not in img_ids:
            raise ValueError(
                f"COCO ground truth {name}: annotations[{i}] (id {ann['id']}) refers to image_id "
                f"{ann['image_id']}, which is not in 'images'"
            )
        if ann["category_id"] not in cat_ids:
            raise ValueError(
                f"COCO ground truth {name}: annotations[{i}] (id {ann['id']}) refers to category_id "
                f"{ann['category_id']}, which is not in 'categories'"
            )
    return dataset, name


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
) -> dict[str, float]:
    """The 12 COCO numbers (keys ``STAT_KEYS``) for ``results_list`` against ``gt_json_path``.

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
        eval_img_ids = sorted({int(i) for i in img_ids})
        unknown = set(eval_img_ids) - {img["id"] for img in gt["images"]}
        if unknown:
            raise ValueError(f"img_ids not in the ground truth {name}: {_show(unknown)}")
        if not eval_img_ids:
            raise ValueError(f"img_ids is empty: nothing to evaluate against {name}")

    # faster-coco-eval logs through `print_function` (logger.debug/info by default); verbose
    # routes it to print. redirect_stdout also catches any stray print in the quiet case.
    log = print if verbose else logging.getLogger(__name__).debug
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
    return {key: float(v) for key, v in zip(STAT_KEYS, stats)}


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
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> a COCO results list.

    ``predictions[i]`` (for image ``image_ids[i]``) holds ``boxes`` ``(N, 4)`` xyxy in the
    original image frame, ``scores`` ``(N,)`` and ``labels`` ``(N,)`` contiguous labels,
    which ``label_to_cat_id`` (dict, or sequence indexed by label; ``None`` = no category,
    e.g. background) maps back to COCO category ids. Boxes become ``[x, y, w, h]``; rounding
    (0.01 px, 1e-5 score by default; ``None`` keeps full precision) only keeps JSON small.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(
            f"predictions has {len(predictions)} entries but image_ids has {len(image_ids)}: one id per image"
        )
    results: list[dict[str, Any]] = []
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
        for box, score, label in zip(xywh, scores, labels):
            label = int(label)
            try:
                cat_id = label_to_cat_id[label]
            except (KeyError, IndexError):
                cat_id = None
            if cat_id is None or (isinstance(label_to_cat_id, Sequence) and label < 0):
                raise ValueError(
                    f"predictions[{i}] (image_id {img_id}): label {label} has no category id in label_to_cat_id"
                )
            results.append({
                "image_id": img_id,
                "category_id": int(cat_id),
                "bbox": [_round(v, box_decimals) for v in box],
                "score": _round(score, score_decimals),
            })
    return results


def evaluate_detections(
    gt_json_path: PathLike | Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | Sequence[int | None],
    verbose: bool = False,
) -> dict[str, float]:
    """``coco_map`` of torchvision-style ``predictions`` on exactly the images ``image_ids``.

    Restricting to ``image_ids`` lets a run on a subset of the gt file (a quick validation,
    the demo) be scored fairly; pass every gt image to score the whole set.
    """
    results = predictions_to_coco_results(predictions, image_ids, label_to_cat_id)
    return coco_map(gt_json_path, results, iou_type="bbox", img_ids=[int(i) for i in image_ids], verbose=verbose)
