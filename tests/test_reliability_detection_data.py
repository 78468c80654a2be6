"""Reliability of COCO detection data and evaluation: annotation files that are wrong but parse,
and predictions the evaluator cannot map.

Each fault class has its promise in docs/reliability.md; the tests here prove it. Fixtures are
tiny COCO folders written into ``tmp_path``; models are ResNet-18 detectors at 64x64.
pycocotools is the yardstick where a number is compared.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from acamkd.config import load_config
from acamkd.data import CocoDetection
from acamkd.engine.detection import DetectionTask
from acamkd.engine.distributed import DistInfo
from acamkd.evaluation import STAT_KEYS, coco_map, evaluate_detections, predictions_to_coco_results
from acamkd.models import build_detector

SIDE = 64  # every image is SIDE x SIDE
CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _ann(ann_id, image_id, cat_id, box, area=None, iscrowd=0):
    ann = {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": list(box), "iscrowd": iscrowd}
    ann["area"] = float(box[2] * box[3]) if area is None else area
    return ann


def two_images(ann_ids=(0, 1)):
    """The issue's example: two images, one (small) box each, annotation ids 0 and 1."""
    images = [{"id": 1, "file_name": "1.jpg", "width": SIDE, "height": SIDE},
              {"id": 2, "file_name": "2.jpg", "width": SIDE, "height": SIDE}]
    anns = [_ann(ann_ids[0], 1, 1, [10, 10, 20, 20]), _ann(ann_ids[1], 2, 3, [5, 8, 30, 24])]
    for ann, ann_id in zip(anns, ann_ids):
        if ann_id is None:
            del ann["id"]
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATS)}


def write_coco(root, doc, split="val", write_images=True):
    """``<root>/<split>2017/*.jpg`` (gray, sized as listed) and ``<root>/annotations/instances_<split>2017.json``."""
    img_dir, ann_dir = root / f"{split}2017", root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    if write_images:
        for img in doc["images"]:
            w, h = int(img.get("width", SIDE)), int(img.get("height", SIDE))
            Image.new("RGB", (w, h), (90, 90, 90)).save(img_dir / img["file_name"], format="JPEG")
    path = ann_dir / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))  # allow_nan: NaN/Infinity are written as the literals json reads
    return path


def perfect_results(doc):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in doc["annotations"] if not a.get("iscrowd")]


def pycocotools_stats(doc, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(doc)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_KEYS, map(float, ev.stats)))


def as_predictions(ds: CocoDetection, results):
    """COCO results -> torchvision outputs (xyxy, contiguous labels) per image of ``ds``."""
    preds = []
    for iid in ds.image_ids:
        rs = [r for r in results if r["image_id"] == iid]
        xywh = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64).reshape(-1, 4)
        preds.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                      "scores": torch.tensor([r["score"] for r in rs]),
                      "labels": torch.tensor([ds.cat_id_to_label[r["category_id"]] for r in rs], dtype=torch.int64)})
    return preds


class Oracle(nn.Module):
    """Predicts the targets it is handed (a perfect model), plus ``extra`` boxes per image."""

    def __init__(self, extra=None):
        super().__init__()
        self.targets, self.extra = [], extra or []

    def forward(self, images):
        out = []
        for t in self.targets.pop(0):
            boxes = torch.cat([t["boxes"], torch.tensor([e[0] for e in self.extra]).reshape(-1, 4)])
            scores = torch.cat([torch.ones(len(t["labels"])), torch.tensor([e[1] for e in self.extra])])
            labels = torch.cat([t["labels"], torch.tensor([e[2] for e in self.extra], dtype=torch.int64)])
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


def task_for(root, *overrides) -> DetectionTask:
    cfg = load_config("configs/det/fcos_r50_coco.yaml",
                      [f"data.root={root}", "student.backbone=resnet18", "student.pretrained=null",
                       f"data.min_size={SIDE}", f"data.max_size={SIDE}", "data.workers=0", *overrides])
    return DetectionTask(cfg, DistInfo())


def engine_evaluate(root, model=None):
    """What ``acamkd eval`` and validation inside training run: DetectionTask.evaluate on the val split."""
    task = task_for(root)
    val = task.val_dataset()
    loader = DataLoader(val, batch_size=2, collate_fn=task.collate)
    model = model or Oracle()
    model.targets = [batch[1] for batch in loader]
    return task.evaluate(model, loader, val)


def warnings_about(caplog, needle):
    return [r for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# =============================================================================================
# 1a. Annotation ids the evaluator misreads (0, negative, repeated, missing)
# =============================================================================================
@pytest.mark.parametrize("ann_ids", [(0, 1), (5, 5), (-3, 1), (None, None)], ids=["zero", "repeated", "negative",
                                                                                   "missing"])
def test_annotation_ids_do_not_change_coco_map(tmp_path, ann_ids):
    doc = two_images(ann_ids)
    path = write_coco(tmp_path, doc)
    stats = coco_map(path, perfect_results(doc))
    assert stats["AP"] == 1.0 and stats["AR100"] == 1.0
    renumbered = copy.deepcopy(doc)
    for k, ann in enumerate(renumbered["annotations"]):
        ann["id"] = k + 1
    ref = pycocotools_stats(renumbered, perfect_results(doc))  # the yardstick, on valid ids
    assert all(abs(stats[k] - ref[k]) < 1e-12 for k in STAT_KEYS), (stats, ref)


def test_annotation_id_zero_scores_perfect_detections_one_through_dataset_and_engine(tmp_path):
    doc = two_images((0, 1))
    write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    gt = ds.coco_gt()
    assert [a["id"] for a in gt["annotations"]] == [1, 2]  # renumbered for the evaluator only
    assert evaluate_detections(gt, as_predictions(ds, perfect_results(doc)), ds.image_ids,
                               ds.label_to_cat_id)["AP"] == 1.0
    assert engine_evaluate(tmp_path)["AP"] == 1.0  # acamkd eval / validation in training


def test_coco_gt_scores_like_the_raw_file_for_a_valid_file(tmp_path):
    """Renumbering and normalising change nothing for a valid file: crowd regions, boxes partly
    outside or degenerate, areas, are what pycocotools sees in the raw file."""
    rng = np.random.default_rng(0)
    images = [{"id": 10 + i, "file_name": f"{i}.jpg", "width": SIDE, "height": SIDE} for i in range(4)]
    anns = [_ann(7, 10, 1, [2, 3, 20, 10]), _ann(8, 10, 3, [50, 40, 30, 30], area=333.0),  # partly outside
            _ann(9, 11, 1, [0, 0, 40, 40], iscrowd=1), _ann(11, 11, 3, [30, 30, 8, 9]),
            _ann(12, 12, 1, [5, 5, 0, 4]),  # zero width: never matched, as in pycocotools
            _ann(13, 12, 3, [1.5, 2.25, 33.5, 40.75])]
    doc = {"images": images, "annotations": anns, "categories": CATS}
    write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    results = [dict(r, bbox=[v + rng.normal(0, 1.5) for v in r["bbox"]], score=float(rng.random()))
               for r in perfect_results(doc)]
    results += [{"image_id": 13, "category_id": 1, "bbox": [3.0, 4.0, 20.0, 20.0], "score": 0.7}]
    ours = evaluate_detections(ds.coco_gt(), as_predictions(ds, results), ds.image_ids, ds.label_to_cat_id)
    ref = pycocotools_stats(doc, predictions_to_coco_results(as_predictions(ds, results), ds.image_ids,
                                                             ds.label_to_cat_id))
    assert all(abs(ours[k] - ref[k]) < 1e-12 for k in STAT_KEYS), (ours, ref)


# =============================================================================================
# 1b. Ids that are not integers: refused where the file is read, naming file and entry
# =============================================================================================
def _with(doc, key, k, **changes):
    doc = copy.deepcopy(doc)
    doc[key][k].update(changes)
    return doc


@pytest.mark.parametrize("key, k, changes, entry, hint", [
    ("images", 1, {"id": "img_7"}, r"images\[1\]", "file_name"),
    ("images", 0, {"id": True}, r"images\[0\]", "integer"),
    ("images", 0, {"id": 1.5}, r"images\[0\]", "integer"),
    ("categories", 0, {"id": "person"}, r"categories\[0\]", "'name'"),
])
def test_non_integer_image_or_category_id_refused_at_load(tmp_path, key, k, changes, entry, hint):
    path = write_coco(tmp_path, _with(two_images(), key, k, **changes))
    for load in (lambda: CocoDetection(tmp_path, "val"), lambda: coco_map(path, [])):
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert str(path) in msg and re.search(entry, msg) and "must be integers" in msg and hint in msg, msg


@pytest.mark.parametrize("changes, what", [({"image_id": "img_7"}, "image_id='img_7'"),
                                           ({"category_id": "car"}, "category_id='car'")])
def test_annotation_naming_image_or_category_by_name_refused_at_load(tmp_path, changes, what):
    path = write_coco(tmp_path, _with(two_images(), "annotations", 1, **changes))
    with pytest.raises(ValueError) as err:
        CocoDetection(tmp_path, "val")
    msg = str(err.value)
    assert str(path) in msg and "annotations[1]" in msg and what in msg and "not its name" in msg, msg
    with pytest.raises(ValueError, match=r"annotations\[1\]"):
        coco_map(path, [])


@pytest.mark.parametrize("changes, what", [({"image_id": [2]}, "image_id=[2]"), ({"image_id": True}, "image_id=True"),
                                           ({"category_id": {"id": 3}}, "category_id={'id': 3}")], ids=str)
def test_annotation_id_of_the_wrong_type_refused_at_load(tmp_path, changes, what):
    path = write_coco(tmp_path, _with(two_images(), "annotations", 1, **changes))
    with pytest.raises(ValueError) as err:
        CocoDetection(tmp_path, "val")
    msg = str(err.value)
    assert str(path) in msg and "annotations[1]" in msg and what in msg, msg
    with pytest.raises(ValueError, match=r"annotations\[1\]"):
        coco_map(path, [])


def test_category_names_fail_before_training_not_after(tmp_path):
    """A run whose categories are named by string fails at dataset construction, before any step."""
    from acamkd.engine import run

    doc = _with(two_images(), "categories", 1, id="car")
    write_coco(tmp_path, doc, split="train")
    write_coco(tmp_path, doc, split="val")
    cfg = task_for(tmp_path).cfg
    with pytest.raises(ValueError, match=r"instances_train2017\.json: categories\[1\] has id='car'"):
        run.prepare(cfg, "train")


def test_integral_float_ids_are_read_as_integers(tmp_path):
    doc = two_images((1, 2))
    doc["images"][0]["id"] = 1.0
    doc["categories"][1]["id"] = 3.0
    doc["annotations"][0]["image_id"] = 1.0
    path = write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    assert ds.image_ids == [1, 2] and all(type(i) is int for i in ds.image_ids)
    assert ds.cat_ids == [1, 3] and all(type(c) is int for c in ds.cat_ids)
    assert type(ds.target(0)["image_id"]) is int
    assert coco_map(path, perfect_results(two_images((1, 2))))["AP"] == 1.0


def test_results_and_img_ids_with_non_integer_ids_name_the_entry(tmp_path):
    doc = two_images((1, 2))
    path = write_coco(tmp_path, doc)
    res = perfect_results(doc)
    with pytest.raises(ValueError, match=r"results_list\[1\]: 'image_id' must be an integer id.*'img_7'"):
        coco_map(path, [res[0], dict(res[1], image_id="img_7")])
    with pytest.raises(ValueError, match=r"results_list\[0\]: 'category_id' must be an integer id.*'car'"):
        coco_map(path, [dict(res[0], category_id="car")])
    with pytest.raises(ValueError, match=r"img_ids\[1\]='img_7' is not an integer image id"):
        coco_map(path, res, img_ids=[1, "img_7"])


# =============================================================================================
# 1c. Non-finite or inconsistent values: handled one way, the same for training and evaluation
# =============================================================================================
def test_nan_area_on_val_annotation_gives_apl_minus_one(tmp_path, caplog):
    """The issue's example: a small box whose area is NaN must not count as a large object."""
    caplog.set_level(logging.INFO, logger="acamkd")
    doc = two_images((1, 2))
    doc["annotations"][0]["area"] = float("nan")
    path = write_coco(tmp_path, doc)
    expected = {"AP": 1.0, "APs": 1.0, "APm": -1.0, "APl": -1.0}
    raw = coco_map(path, perfect_results(doc))  # the evaluator alone reads it the loader's way
    assert {k: raw[k] for k in expected} == expected
    through_engine = engine_evaluate(tmp_path)
    assert {k: through_engine[k] for k in expected} == expected
    assert warnings_about(caplog, "annotations[0]") and warnings_about(caplog, "finite number >= 0")


@pytest.mark.parametrize("area", [float("nan"), float("inf"), -5.0, "big", None], ids=str)
def test_invalid_area_becomes_the_clipped_box_area_in_training_and_evaluation(tmp_path, caplog, area):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    doc = two_images((1, 2))
    doc["annotations"][1]["bbox"] = [50, 8, 30, 24]  # 14 px inside the 64 px image
    doc["annotations"][1]["area"] = area
    if area is None:
        del doc["annotations"][1]["area"]  # missing: silently the box area (documented)
    write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    assert ds.target(1)["area"].tolist() == [14.0 * 24.0]
    assert [a["area"] for a in ds.coco_gt()["annotations"]] == [400.0, 14.0 * 24.0]
    warned = warnings_about(caplog, "'area' that is not a finite number >= 0")
    if area is None:
        assert not warned and ds.num_bad_area == 0
    else:
        assert len(warned) == 1 and ds.num_bad_area == 1
        assert "instances_val2017.json" in warned[0].getMessage() and "annotations[1]" in warned[0].getMessage()


@pytest.mark.parametrize("bbox", [[float("nan"), 1, 5, 5], [0, 0, float("inf"), 5], [float("inf"), 0, 5, 5],
                                  [0, 0, 5, float("-inf")], [0, float("-inf"), 5, float("inf")]], ids=str)
def test_non_finite_box_dropped_from_training_and_evaluation_alike(tmp_path, caplog, bbox):
    caplog.set_level(logging.INFO, logger="acamkd")
    doc = two_images((1, 2))
    doc["annotations"].append(_ann(3, 2, 1, [0, 0, 1, 1]))
    doc["annotations"][2]["bbox"] = bbox
    path = write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    assert ds.target(1)["boxes"].tolist() == [[5.0, 8.0, 35.0, 32.0]]  # an inf width is not a full-width box
    assert ds.num_nonfinite == 1 and ds.num_degenerate == 1
    assert [a["image_id"] for a in ds.coco_gt()["annotations"]] == [1, 2]
    warned = warnings_about(caplog, "NaN or infinite")
    assert len(warned) == 1 and "annotations[2]" in warned[0].getMessage()
    assert "instances_val2017.json" in warned[0].getMessage()
    # the evaluator alone leaves it out the same way: perfect detections of the rest score 1
    assert coco_map(path, perfect_results(two_images((1, 2))))["AP"] == 1.0
    assert engine_evaluate(tmp_path)["AP"] == 1.0


@pytest.mark.parametrize("key, k, changes, match", [
    ("annotations", 0, {"iscrowd": float("nan")}, r"annotations\[0\] \(id=1\) has iscrowd=nan"),
    ("annotations", 0, {"iscrowd": 2}, r"annotations\[0\] \(id=1\) has iscrowd=2"),
    ("annotations", 0, {"iscrowd": "no"}, r"annotations\[0\] \(id=1\) has iscrowd='no'"),
    ("images", 1, {"height": float("nan")}, r"images\[1\] has height=nan"),
    ("images", 1, {"width": 0}, r"images\[1\] has width=0"),
    ("images", 0, {"width": "64"}, r"images\[0\] has width='64'"),
])
def test_invalid_iscrowd_or_image_size_refused_naming_the_entry(tmp_path, key, k, changes, match):
    path = write_coco(tmp_path, _with(two_images((1, 2)), key, k, **changes), write_images=key != "images")
    (tmp_path / "val2017").mkdir(exist_ok=True)  # sizes are checked before the folder is listed
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
        CocoDetection(tmp_path, "val")


# =============================================================================================
# 1d. Empty or degenerate sets: warned once, naming the file; an empty image list refused
# =============================================================================================
@pytest.mark.parametrize("annotations", [[], [_ann(1, 1, 1, [5, 5, 0, 3]), _ann(2, 2, 1, [70, 5, 4, 4])],
                                         [_ann(1, 1, 1, [0, 0, 9, 9], iscrowd=1)]],
                         ids=["none", "all-degenerate", "crowd-only"])
def test_split_without_usable_boxes_warns_once_naming_the_file(tmp_path, caplog, annotations):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    doc = dict(two_images(), annotations=annotations)
    write_coco(tmp_path, doc, split="train")
    ds = CocoDetection(tmp_path, "train")
    for i in range(len(ds)):
        ds[i]
    warned = warnings_about(caplog, "no usable boxes")
    assert len(warned) == 1 and "instances_train2017.json" in warned[0].getMessage()


def test_every_area_zero_warns_once_naming_the_file(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    doc = two_images((1, 2))
    for ann in doc["annotations"]:
        ann["area"] = 0
    write_coco(tmp_path, doc, split="train")
    CocoDetection(tmp_path, "train")
    warned = warnings_about(caplog, "area' 0")
    assert len(warned) == 1 and "instances_train2017.json" in warned[0].getMessage()


def test_valid_split_warns_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="acamkd")
    write_coco(tmp_path, two_images((1, 2)))
    CocoDetection(tmp_path, "val")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_empty_image_list_refused(tmp_path):
    path = write_coco(tmp_path, dict(two_images(), images=[], annotations=[]))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": 'images' is empty"):
        CocoDetection(tmp_path, "val")


# =============================================================================================
# 3. Predictions the evaluator cannot map
# =============================================================================================
@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
@pytest.mark.parametrize("score_thresh", [0.0, -1.0])
def test_untrained_sigmoid_detector_never_emits_background_label(arch, score_thresh):
    model = build_detector(arch, "resnet18", 3, score_thresh=score_thresh, detections_per_img=60).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, SIDE, SIDE), torch.rand(3, SIDE, SIDE)])
    for out in outputs:
        assert len(out["labels"]) == 60  # no slot went to background boxes
        assert out["labels"].min() >= 1 and out["labels"].max() <= 2
        assert len(out["boxes"]) == len(out["scores"]) == 60


def test_evaluate_detections_drops_unmappable_and_non_finite_predictions_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="acamkd")
    doc = two_images((1, 2))
    path = write_coco(tmp_path, doc)
    ds = CocoDetection(tmp_path, "val")
    clean = as_predictions(ds, perfect_results(doc))
    expected = evaluate_detections(path, clean, ds.image_ids, ds.label_to_cat_id)
    odd = copy.deepcopy(clean)
    junk = {"boxes": torch.tensor([[1.0, 1, 9, 9], [2, 2, 8, 8], [3, 3, 7, 7], [0, 0, float("nan"), 5],
                                   [1, 1, 5, 5]]),
            "scores": torch.tensor([0.99, 0.98, 0.97, 0.96, float("inf")]),
            "labels": torch.tensor([0, 3, -1, 1, 2])}  # background, beyond K=2, negative, NaN box, inf score
    odd[0] = {k: torch.cat([odd[0][k].to(junk[k].dtype), junk[k]]) for k in junk}
    for mapping in (ds.label_to_cat_id, [None] + ds.cat_ids):
        caplog.clear()
        assert evaluate_detections(path, odd, ds.image_ids, mapping) == expected
        unmapped = warnings_about(caplog, "has no category id")
        assert len(unmapped) == 1 and "dropped 3 prediction(s)" in unmapped[0].getMessage()
        non_finite = warnings_about(caplog, "NaN or infinite box or score")
        assert len(non_finite) == 1 and "dropped 2 prediction(s)" in non_finite[0].getMessage()


def test_predictions_to_coco_results_unmapped_option():
    pred = {"boxes": torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 2]]), "scores": torch.tensor([0.5, 0.6]),
            "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="label 0 has no category id"):  # converting alone stays strict
        predictions_to_coco_results([pred], [5], {1: 7})
    assert [r["category_id"] for r in predictions_to_coco_results([pred], [5], {1: 7}, unmapped="drop")] == [7]
    with pytest.raises(ValueError, match=r"unmapped must be one of \('error', 'drop'\)"):
        predictions_to_coco_results([pred], [5], {1: 7}, unmapped="skip")


def test_engine_evaluation_survives_predictions_it_cannot_map(tmp_path, caplog):
    """Validation in training and acamkd eval: a background or out-of-range label costs nothing."""
    caplog.set_level(logging.WARNING, logger="acamkd")
    write_coco(tmp_path, two_images((1, 2)))
    extra = [([1.0, 1, 9, 9], 0.99, 0), ([2.0, 2, 8, 8], 0.98, 3)]  # per image: labels 0 and K+1
    metrics = engine_evaluate(tmp_path, Oracle(extra))
    assert metrics["AP"] == 1.0
    warned = warnings_about(caplog, "has no category id")
    assert len(warned) == 1 and "dropped 4 prediction(s)" in warned[0].getMessage()


def test_acamkd_eval_of_an_untrained_fcos_at_score_thresh_zero(tmp_path):
    """The issue's case: ``acamkd eval`` of a detector that used to predict label 0 for a quarter of its boxes."""
    from acamkd.engine import run

    write_coco(tmp_path, two_images((0, 1)))
    task = task_for(tmp_path, "eval.score_thresh=0.0")
    model = task.build_model(task.cfg.student, 2, "student")
    checkpoint = tmp_path / "untrained.pt"
    torch.save(model.state_dict(), checkpoint)
    metrics = run.evaluate(task.cfg, str(checkpoint))
    assert list(metrics)[:len(STAT_KEYS)] == list(STAT_KEYS) and all(math.isfinite(v) for v in metrics.values())
    assert all(k.startswith("AP.") for k in list(metrics)[len(STAT_KEYS):])  # per category, after the 12
