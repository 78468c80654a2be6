"""coco_map against pycocotools (the reference implementation) on small hand-made COCO sets.

Fixtures cover what changes the numbers: non-contiguous category ids, all three area
ranges, an iscrowd region, an image without annotations, false positives, misses,
duplicates and more than 100 detections on one image.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from acamkd.evaluation import STAT_KEYS, coco_map, evaluate_detections, predictions_to_coco_results

CAT_IDS = [1, 3, 7, 90]
IMG_IDS = [11, 12, 15, 20, 33, 42]  # 42 has no annotations
W, H = 640, 480


def _ann(ann_id, img_id, cat_id, box, iscrowd=0):
    return {
        "id": ann_id, "image_id": img_id, "category_id": cat_id, "bbox": [float(v) for v in box],
        "area": float(box[2] * box[3]), "iscrowd": iscrowd,
    }


def fixed_gt() -> dict:
    """Six images, four categories, small/medium/large boxes, one crowd region, one empty image."""
    anns = [
        _ann(1, 11, 1, [10, 10, 20, 15]),  # small (300)
        _ann(2, 11, 3, [50, 40, 60, 50]),  # medium (3000)
        _ann(3, 11, 90, [200, 100, 200, 150]),  # large (30000)
        _ann(4, 12, 7, [5, 5, 25, 25]),  # small
        _ann(5, 12, 7, [100, 100, 80, 70]),  # medium
        _ann(6, 12, 1, [300, 200, 250, 200]),  # large
        _ann(7, 15, 3, [0, 0, 300, 300], iscrowd=1),  # crowd: matches are ignored, not counted
        _ann(8, 15, 3, [400, 300, 40, 40]),  # medium
        _ann(9, 20, 90, [20, 30, 12, 9]),  # small
        _ann(10, 20, 1, [120, 60, 33, 35]),  # medium
        _ann(11, 33, 7, [50, 50, 400, 300]),  # large
        _ann(12, 33, 90, [500, 400, 60, 50]),  # medium
    ]
    return {
        "images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.jpg"} for i in IMG_IDS],
        "categories": [{"id": c, "name": f"cat{c}"} for c in CAT_IDS],
        "annotations": anns,
    }


def random_gt(rng: np.random.Generator, n_images: int = 8) -> dict:
    """Random boxes spread over the area ranges (log-uniform sides), a few crowds, one empty image."""
    images = [{"id": 100 + 3 * i, "width": W, "height": H} for i in range(n_images)]
    anns, ann_id = [], 1
    for img in images[:-1]:  # last image: no annotations
        for _ in range(rng.integers(1, 9)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), size=2)).round(2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            crowd = int(rng.random() < 0.08)
            anns.append(_ann(ann_id, img["id"], int(rng.choice(CAT_IDS)), [round(x, 2), round(y, 2), w, h], crowd))
            ann_id += 1
    return {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS], "annotations": anns}


def perfect_results(gt: dict, rng: np.random.Generator) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
         "score": float(rng.uniform(0.5, 1.0))}
        for a in gt["annotations"] if not a["iscrowd"]
    ]


def noisy_results(gt: dict, rng: np.random.Generator, jitter=0.1, drop=0.25, n_fp=15, dup=0.2) -> list[dict]:
    """Jittered true positives, some dropped (misses), some duplicated, plus random false positives."""
    out = []
    for a in gt["annotations"]:
        if rng.random() < drop:
            continue
        x, y, w, h = a["bbox"]
        for _ in range(1 + int(rng.random() < dup)):
            dx, dy = rng.normal(0, jitter, 2) * [w, h]
            sw, sh = np.exp(rng.normal(0, jitter, 2))
            out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [float(x + dx), float(y + dy), float(w * sw), float(h * sh)],
                        "score": float(rng.random())})
    img_ids = [i["id"] for i in gt["images"]]
    for _ in range(n_fp):
        w, h = np.exp(rng.uniform(np.log(4), np.log(300), size=2))
        out.append({"image_id": int(rng.choice(img_ids)), "category_id": int(rng.choice(CAT_IDS)),
                    "bbox": [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)],
                    "score": float(rng.random())})
    return out


def write(tmp_path, data, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def pycocotools_stats(gt_path, results, img_ids=None) -> dict[str, float]:
    """The reference: pycocotools' COCOeval on the same file and results (its prints swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_KEYS, map(float, ev.stats)))


def assert_stats_match(ours: dict, ref: dict, tol: float = 1e-12):
    assert list(ours) == list(STAT_KEYS)
    assert all(type(v) is float for v in ours.values())
    bad = {k: (ours[k], ref[k]) for k in STAT_KEYS if abs(ours[k] - ref[k]) > tol}
    assert not bad, f"coco_map differs from pycocotools: {bad}"


# ---------------------------------------------------------------- agreement with pycocotools

@pytest.fixture
def gt_path(tmp_path):
    return write(tmp_path, fixed_gt())


def test_perfect_detections_give_ap_one(gt_path):
    res = perfect_results(fixed_gt(), np.random.default_rng(0))
    ours = coco_map(gt_path, res)
    assert_stats_match(ours, pycocotools_stats(gt_path, res))
    for k in STAT_KEYS:  # AR1 < 1: image 12 has two boxes of category 7, one detection counts
        assert ours[k] == (11 / 12 if k == "AR1" else 1.0), k


@pytest.mark.parametrize("kind", ["jittered", "false_positives", "missing", "mixed"])
def test_fixed_gt_matches_pycocotools(gt_path, kind):
    rng = np.random.default_rng(1)
    gt = fixed_gt()
    kw = {
        "jittered": dict(jitter=0.08, drop=0.0, n_fp=0, dup=0.0),
        "false_positives": dict(jitter=0.0, drop=0.0, n_fp=25, dup=0.0),
        "missing": dict(jitter=0.02, drop=0.4, n_fp=0, dup=0.0),
        "mixed": dict(jitter=0.1, drop=0.25, n_fp=15, dup=0.3),
    }[kind]
    res = noisy_results(gt, rng, **kw)
    ours = coco_map(gt_path, res)
    assert_stats_match(ours, pycocotools_stats(gt_path, res))
    if kind != "jittered":
        assert ours["AP"] < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_random_sets_match_pycocotools(tmp_path, seed):
    rng = np.random.default_rng(seed)
    gt = random_gt(rng)
    path = write(tmp_path, gt)
    res = noisy_results(gt, rng, jitter=0.12, drop=0.3, n_fp=30, dup=0.25)
    assert_stats_match(coco_map(path, res), pycocotools_stats(path, res))


def test_more_than_100_detections_on_one_image(gt_path):
    """maxDets=1/10/100 truncation per image is where AR1/AR10/AR100 part ways."""
    rng = np.random.default_rng(2)
    res = noisy_results(fixed_gt(), rng, jitter=0.05, drop=0.0, n_fp=0, dup=0.0)
    for _ in range(150):
        res.append({"image_id": 11, "category_id": int(rng.choice(CAT_IDS)),
                    "bbox": [float(v) for v in rng.uniform(0, 200, 4)], "score": float(rng.random())})
    assert_stats_match(coco_map(gt_path, res), pycocotools_stats(gt_path, res))


def test_minus_one_where_no_ground_truth_in_area_range(tmp_path):
    gt = fixed_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 96 ** 2]  # no large boxes
    path = write(tmp_path, gt)
    res = noisy_results(gt, np.random.default_rng(3))
    ours = coco_map(path, res)
    assert ours["APl"] == -1.0 and ours["ARl"] == -1.0
    assert_stats_match(ours, pycocotools_stats(path, res))


def test_img_ids_restricts_evaluation(gt_path):
    gt = fixed_gt()
    res = noisy_results(gt, np.random.default_rng(4))
    subset = [11, 15, 42]
    ours = coco_map(gt_path, res, img_ids=subset)
    assert_stats_match(ours, pycocotools_stats(gt_path, res, img_ids=subset))
    # perfect on the subset only: AP 1 even though the other images' boxes are not detected
    only = [r for r in perfect_results(gt, np.random.default_rng(0)) if r["image_id"] in (11, 12)]
    assert coco_map(gt_path, only, img_ids=[11, 12])["AP"] == 1.0
    assert coco_map(gt_path, only)["AP"] < 1.0


def test_empty_results_do_not_crash(gt_path):
    ours = coco_map(gt_path, [])
    assert list(ours) == list(STAT_KEYS)
    assert all(v == 0.0 for v in ours.values())  # every area range has gt: 0, not -1


def test_empty_results_and_missing_area_range(tmp_path):
    gt = fixed_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 32 ** 2]  # no small boxes
    ours = coco_map(write(tmp_path, gt), [])
    assert ours["APs"] == -1.0 and ours["ARs"] == -1.0
    assert all(ours[k] == 0.0 for k in STAT_KEYS if k not in ("APs", "ARs"))


def test_inputs_are_not_mutated_and_results_file_accepted(tmp_path, gt_path):
    res = noisy_results(fixed_gt(), np.random.default_rng(5))
    before = copy.deepcopy(res)
    a = coco_map(gt_path, res)
    assert res == before  # faster-coco-eval's loadRes would add id/area/segmentation
    assert coco_map(gt_path, res) == a  # repeatable
    assert coco_map(gt_path, write(tmp_path, res, "res.json")) == a
    assert coco_map(fixed_gt(), res) == a  # an already loaded gt dict


def test_quiet_by_default_verbose_prints(gt_path, capsys):
    res = perfect_results(fixed_gt(), np.random.default_rng(0))
    coco_map(gt_path, res)
    assert capsys.readouterr().out == ""
    coco_map(gt_path, res, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# ---------------------------------------------------------------- errors

def test_missing_gt_file(tmp_path):
    path = tmp_path / "nope" / "instances_val.json"
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        coco_map(path, [])


def test_malformed_gt_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        coco_map(path, [])


def test_gt_missing_key(tmp_path):
    gt = fixed_gt()
    del gt["categories"]
    with pytest.raises(ValueError, match=r"nocats\.json.*'categories'"):
        coco_map(write(tmp_path, gt, "nocats.json"), [])


def test_gt_annotation_missing_area(tmp_path):
    gt = fixed_gt()
    del gt["annotations"][3]["area"]
    with pytest.raises(ValueError, match=r"annotations\[3\].*area"):
        coco_map(write(tmp_path, gt), [])


def test_results_with_unknown_image_ids(gt_path):
    res = perfect_results(fixed_gt(), np.random.default_rng(0))
    res += [dict(res[0], image_id=999), dict(res[1], image_id=1000)]
    with pytest.raises(ValueError, match=r"image ids not in the ground truth .*gt\.json.*\[999, 1000\]"):
        coco_map(gt_path, res)


def test_results_with_unknown_category_ids(gt_path):
    res = perfect_results(fixed_gt(), np.random.default_rng(0))
    res += [dict(res[0], category_id=2), dict(res[1], category_id=0)]
    with pytest.raises(ValueError, match=r"category ids not in the ground truth .*gt\.json.*\[0, 2\]"):
        coco_map(gt_path, res)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"image_id": 11, "category_id": 1, "score": 0.5}, r"results_list\[0\] lacks \['bbox'\]"),
        ({"image_id": 11, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}, r"'bbox' must be 4"),
        ({"image_id": 11, "category_id": 1, "bbox": [1, 2, 3, 4], "score": float("nan")}, r"'score'"),
    ],
)
def test_malformed_results(gt_path, bad, match):
    with pytest.raises(ValueError, match=match):
        coco_map(gt_path, [bad])


def test_bad_img_ids_and_iou_type(gt_path):
    with pytest.raises(ValueError, match=r"img_ids not in the ground truth.*\[7\]"):
        coco_map(gt_path, [], img_ids=[11, 7])
    with pytest.raises(ValueError, match="iou_type"):
        coco_map(gt_path, [], iou_type="keypoints")


# ---------------------------------------------------------------- torchvision outputs

def test_predictions_to_coco_results_xyxy_to_xywh_and_labels():
    preds = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.5, 1.25, 2.5, 3.75]]),
         "scores": torch.tensor([0.9, 0.123456789]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": np.array([[1.0, 1.0, 2.0, 3.0]]), "scores": np.array([0.5]), "labels": np.array([2])},
    ]
    as_list = [None, 1, 3, 7, 90]  # label 0 = background (torchvision)
    as_dict = {1: 1, 2: 3, 3: 7, 4: 90}
    for mapping in (as_list, as_dict):
        res = predictions_to_coco_results(preds, [11, 12, torch.tensor(15)], mapping)
        assert res == [
            {"image_id": 11, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9},
            {"image_id": 11, "category_id": 90, "bbox": [0.5, 1.25, 2.0, 2.5], "score": 0.12346},
            {"image_id": 15, "category_id": 3, "bbox": [1.0, 1.0, 1.0, 2.0], "score": 0.5},
        ]
        assert all(type(v) is float for r in res for v in r["bbox"])
        assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in res)
    full = predictions_to_coco_results(preds, [11, 12, 15], as_dict, box_decimals=None, score_decimals=None)
    assert full[1]["score"] == float(torch.tensor(0.123456789))


def test_predictions_to_coco_results_errors():
    pred = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"predictions\[0\] \(image_id 5\): label 0 has no category id"):
        predictions_to_coco_results([pred], [5], [None, 1])
    with pytest.raises(ValueError, match="label 0 has no category id"):
        predictions_to_coco_results([pred], [5], {1: 1})
    with pytest.raises(ValueError, match="label -1"):
        predictions_to_coco_results([dict(pred, labels=torch.tensor([-1]))], [5], [1, 3])
    with pytest.raises(ValueError, match="one id per image"):
        predictions_to_coco_results([pred], [5, 6], [1])
    with pytest.raises(ValueError, match=r"boxes \(N, 4\).*got boxes \(1, 5\)"):
        predictions_to_coco_results([dict(pred, boxes=torch.zeros(1, 5))], [5], [1])
    with pytest.raises(ValueError, match=r"lacks \['scores'\]"):
        predictions_to_coco_results([{"boxes": pred["boxes"], "labels": pred["labels"]}], [5], [1])


def _gt_as_predictions(gt: dict, img_ids: list[int]):
    """Ground truth of ``img_ids`` as torchvision outputs (contiguous labels 1..4)."""
    cat_to_label = {c: i + 1 for i, c in enumerate(CAT_IDS)}
    preds = []
    for img_id in img_ids:
        anns = [a for a in gt["annotations"] if a["image_id"] == img_id and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        preds.append({
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),  # (N, 4) xyxy
            "scores": torch.linspace(0.9, 0.5, len(anns)),
            "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
        })
    return preds


def test_evaluate_detections_round_trip(gt_path):
    gt = fixed_gt()
    label_to_cat = [None] + CAT_IDS
    perfect = evaluate_detections(gt_path, _gt_as_predictions(gt, IMG_IDS), IMG_IDS, label_to_cat)
    assert all(v == 1.0 for k, v in perfect.items() if k != "AR1")
    # a subset of images is scored on that subset only, like coco_map(img_ids=...)
    subset = [12, 33, 42]
    preds = _gt_as_predictions(gt, subset)
    preds[0]["scores"] = torch.tensor([0.3, 0.9, 0.8])
    preds[0]["boxes"][0] += torch.tensor([3.0, 3.0, 0.0, 0.0])  # one poor box
    ours = evaluate_detections(gt_path, preds, subset, label_to_cat)
    ref = pycocotools_stats(gt_path, predictions_to_coco_results(preds, subset, label_to_cat), img_ids=subset)
    assert_stats_match(ours, ref)
    assert ours["AP"] < 1.0
