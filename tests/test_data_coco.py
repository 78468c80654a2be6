"""CocoDetection: label mapping, target format, dropped boxes (logged once), and every error path.

Fixtures are tiny COCO-layout folders written to ``tmp_path``; nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from acamkd.data import BadImageError, CocoDetection, detection_collate

# Category ids non-contiguous and listed out of order: labels must follow sorted ids.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
# id -> (file_name, width, height, PIL mode)
IMAGES = {
    10: ("a.jpg", 40, 30, "RGB"),
    5: ("b.jpg", 20, 20, "RGB"),   # no annotations at all
    7: ("c.jpg", 24, 16, "L"),     # grayscale jpeg
    8: ("d.jpg", 16, 24, "CMYK"),  # CMYK jpeg
}
ANNOTATIONS = [
    {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 5], "area": 42.0, "iscrowd": 0},
    {"id": 2, "image_id": 10, "category_id": 90, "bbox": [35, 25, 10, 10], "area": 20.0, "iscrowd": 0},  # clipped
    {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 1},  # crowd
    {"id": 4, "image_id": 10, "category_id": 1, "bbox": [5, 5, 0, 3], "area": 0.0, "iscrowd": 0},  # zero width
    {"id": 5, "image_id": 10, "category_id": 1, "bbox": [45, 5, 4, 4], "area": 16.0, "iscrowd": 0},  # outside
    {"id": 6, "image_id": 7, "category_id": 1, "area": 3.0, "iscrowd": 0},  # no bbox
    {"id": 7, "image_id": 7, "category_id": 1, "bbox": [-5, -5, 10, 10], "iscrowd": 0},  # clipped, no area
    {"id": 8, "image_id": 8, "category_id": 3, "bbox": [1.5, 2.5, 4, 6], "area": 24.0},  # no iscrowd key
]
N_DEGENERATE = 3  # ids 4, 5, 6


def _write_image(path, width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    img.save(path, format="JPEG", quality=95)


def make_coco(root, split="train", images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES,
              write_images=True, json_text=None):
    """Write ``<root>/<split>2017/*.jpg`` and ``<root>/annotations/instances_<split>2017.json``."""
    img_dir = root / f"{split}2017"
    ann_dir = root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    if write_images:
        for k, (iid, (name, w, h, mode)) in enumerate(images.items()):
            _write_image(img_dir / name, w, h, mode, seed=k)
    doc = {"images": [{"id": iid, "file_name": name, "width": w, "height": h}
                      for iid, (name, w, h, _) in images.items()],
           "annotations": annotations, "categories": categories}
    ann_file = ann_dir / f"instances_{split}2017.json"
    ann_file.write_text(json_text if json_text is not None else json.dumps(doc))
    return ann_file


@pytest.fixture
def coco_root(tmp_path):
    make_coco(tmp_path)
    return tmp_path


def _index_of(ds, image_id):
    return ds.image_ids.index(image_id)


# --------------------------------------------------------------------------- mapping and format
def test_labels_are_contiguous_in_sorted_category_id_order(coco_root):
    ds = CocoDetection(coco_root)
    assert ds.cat_ids == [1, 3, 90]
    assert ds.cat_id_to_label == {1: 1, 3: 2, 90: 3}
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 90}
    assert ds.num_classes == 4  # K + 1: background is label 0
    assert ds.class_names == ["__background__", "person", "car", "toothbrush"]
    for cid in ds.cat_ids:  # round trip
        assert ds.label_to_cat_id[ds.cat_id_to_label[cid]] == cid


def test_images_ordered_by_id_and_item_format(coco_root):
    ds = CocoDetection(coco_root)
    assert ds.image_ids == [5, 7, 8, 10]
    assert len(ds) == 4
    image, target = ds[_index_of(ds, 10)]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert image.is_contiguous() and 0.0 <= image.min() and image.max() <= 1.0
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "area", "iscrowd"}
    assert target["image_id"] == 10 and isinstance(target["image_id"], int)
    assert target["orig_size"].dtype == torch.int64 and target["orig_size"].tolist() == [30, 40]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # xywh -> xyxy; the second box is clipped to the 40x30 image; crowd and degenerate dropped
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [35, 25, 40, 30]]))
    assert target["labels"].tolist() == [2, 3]
    assert target["iscrowd"].tolist() == [0, 0] and target["iscrowd"].dtype == torch.int64
    torch.testing.assert_close(target["area"], torch.tensor([42.0, 20.0]))


def test_boxes_partly_outside_are_clipped_and_missing_area_uses_box_area(coco_root):
    ds = CocoDetection(coco_root)
    _, target = ds[_index_of(ds, 7)]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 5, 5]]))
    assert target["labels"].tolist() == [1]
    torch.testing.assert_close(target["area"], torch.tensor([25.0]))
    _, target = ds[_index_of(ds, 8)]  # fractional coordinates survive, missing iscrowd = 0
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.5, 2.5, 5.5, 8.5]]))
    assert target["iscrowd"].tolist() == [0]


def test_image_without_annotations_has_empty_targets(coco_root):
    ds = CocoDetection(coco_root)
    image, target = ds[_index_of(ds, 5)]
    assert image.shape == (3, 20, 20)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_grayscale_and_cmyk_become_rgb(coco_root):
    ds = CocoDetection(coco_root)
    gray, _ = ds[_index_of(ds, 7)]
    assert gray.shape == (3, 16, 24)
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[1], gray[2])
    cmyk, _ = ds[_index_of(ds, 8)]
    assert cmyk.shape == (3, 24, 16) and cmyk.dtype == torch.float32


def test_crowd_regions_kept_out_by_default_and_kept_when_asked(coco_root):
    ds = CocoDetection(coco_root)
    assert ds.num_crowd_skipped == 1
    ds_all = CocoDetection(coco_root, skip_crowd=False)
    assert ds_all.num_crowd_skipped == 0
    _, target = ds_all[_index_of(ds_all, 10)]
    assert target["labels"].tolist() == [2, 3, 1]
    assert target["iscrowd"].tolist() == [0, 0, 1]
    torch.testing.assert_close(target["boxes"][2], torch.tensor([0.0, 0, 5, 5]))


def test_degenerate_boxes_counted_and_logged_once(coco_root, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    ds = CocoDetection(coco_root)
    assert ds.num_degenerate == N_DEGENERATE
    for i in range(len(ds)):  # reading items must not log again
        ds[i]
    for i in range(len(ds)):
        ds[i]
    degenerate = [r for r in caplog.records if "degenerate box" in r.getMessage()]
    assert len(degenerate) == 1
    assert degenerate[0].name == "acamkd.data" and degenerate[0].levelno == logging.WARNING
    assert f"dropped {N_DEGENERATE} degenerate" in degenerate[0].getMessage()
    assert "instances_train2017.json" in degenerate[0].getMessage()


def test_no_degenerate_no_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    make_coco(tmp_path, annotations=ANNOTATIONS[:2])
    ds = CocoDetection(tmp_path)
    assert ds.num_degenerate == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_agrees_with_pycocotools(coco_root):
    """Cross-check against the official loader: the same non-crowd boxes per image, in xyxy."""
    pycocotools_coco = pytest.importorskip("pycocotools.coco")
    ann_file = str(coco_root / "annotations" / "instances_train2017.json")
    ref = pycocotools_coco.COCO(ann_file)
    ds = CocoDetection(coco_root)
    assert sorted(ref.getCatIds()) == ds.cat_ids
    for i, iid in enumerate(ds.image_ids):
        info = ref.imgs[iid]
        expected = []
        for ann in ref.loadAnns(ref.getAnnIds(imgIds=[iid])):
            if "bbox" not in ann or ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = min(max(x, 0), info["width"]), min(max(y, 0), info["height"])
            x2, y2 = min(max(x + w, 0), info["width"]), min(max(y + h, 0), info["height"])
            if x2 - x1 > 1e-3 and y2 - y1 > 1e-3:
                expected.append(([x1, y1, x2, y2], ds.cat_id_to_label[ann["category_id"]]))
        target = ds.target(i)
        assert target["boxes"].tolist() == [b for b, _ in expected]
        assert target["labels"].tolist() == [lab for _, lab in expected]


def test_root_split_and_overrides(tmp_path):
    make_coco(tmp_path, split="val")
    ds = CocoDetection(tmp_path, split="val")
    assert ds.img_dir == os.path.join(str(tmp_path), "val2017")
    assert ds.ann_file.endswith(os.path.join("annotations", "instances_val2017.json"))
    other = CocoDetection(img_dir=tmp_path / "val2017", ann_file=tmp_path / "annotations" / "instances_val2017.json")
    assert other.image_ids == ds.image_ids


def test_transforms_run_last_on_the_pair(coco_root):
    seen = []

    def transforms(image, target):
        seen.append((tuple(image.shape), target["image_id"]))
        return image * 0, {**target, "tagged": True}

    ds = CocoDetection(coco_root, transforms=transforms)
    image, target = ds[_index_of(ds, 10)]
    assert seen == [((3, 30, 40), 10)] and target["tagged"] and image.abs().sum() == 0


def test_dataloader_with_detection_collate(coco_root):
    ds = CocoDetection(coco_root)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert [tuple(im.shape) for im in images] == [(3, 20, 20), (3, 16, 24), (3, 24, 16)]


def test_index_out_of_range_and_negative(coco_root):
    ds = CocoDetection(coco_root)
    assert ds[-1][1]["image_id"] == ds.image_ids[-1]
    with pytest.raises(IndexError, match="out of range for 4 samples"):
        ds[4]


# --------------------------------------------------------------------------- errors
def test_missing_annotation_file_names_path_and_layout(tmp_path):
    (tmp_path / "train2017").mkdir()
    expected = re.escape(os.path.join("annotations", "instances_train2017.json"))
    with pytest.raises(FileNotFoundError, match=expected) as info:
        CocoDetection(tmp_path)
    assert "train2017/*.jpg" in str(info.value)  # the expected layout is spelled out


def test_needs_root_or_both_paths(tmp_path):
    with pytest.raises(ValueError, match="root=.*img_dir=.*ann_file="):
        CocoDetection(img_dir=tmp_path)


def test_bad_on_bad_image_value(coco_root):
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        CocoDetection(coco_root, on_bad_image="ignore")


def test_malformed_json_names_file_and_position(tmp_path):
    make_coco(tmp_path, json_text='{"images": [}\n')
    with pytest.raises(ValueError, match=r"instances_train2017\.json: malformed JSON at line 1, column 13"):
        CocoDetection(tmp_path)


def test_json_top_level_not_an_object(tmp_path):
    make_coco(tmp_path, json_text="[1, 2]")
    with pytest.raises(ValueError, match=r"instances_train2017\.json: top level must be a JSON object"):
        CocoDetection(tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_missing_key_names_key_and_file(tmp_path, key):
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    del doc[key]
    make_coco(tmp_path, json_text=json.dumps(doc))
    with pytest.raises(ValueError, match=rf"instances_train2017\.json: missing key '{key}'"):
        CocoDetection(tmp_path)


def test_image_entry_missing_field(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 4}], "annotations": [], "categories": CATEGORIES}
    make_coco(tmp_path, json_text=json.dumps(doc))
    with pytest.raises(ValueError, match=r"instances_train2017\.json: images\[0\] has no 'height' key"):
        CocoDetection(tmp_path)


def test_annotation_pointing_to_missing_image_id(tmp_path):
    anns = ANNOTATIONS + [{"id": 99, "image_id": 12345, "category_id": 1, "bbox": [0, 0, 2, 2]}]
    make_coco(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"instances_train2017\.json: annotations\[8\] \(id=99\) points to "
                                         r"image_id=12345"):
        CocoDetection(tmp_path)


def test_annotation_with_unknown_category(tmp_path):
    anns = [{"id": 5, "image_id": 10, "category_id": 2, "bbox": [0, 0, 2, 2]}]
    make_coco(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"instances_train2017\.json: .*category_id=2"):
        CocoDetection(tmp_path)


def test_annotation_missing_image_id_key(tmp_path):
    make_coco(tmp_path, annotations=[{"id": 5, "category_id": 1, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(ValueError, match=r"instances_train2017\.json: annotations\[0\] \(id=5\) has no 'image_id'"):
        CocoDetection(tmp_path)


@pytest.mark.parametrize("bbox", [[0, 0, 2], "0 0 2 2", [0, 0, "2", 2]])
def test_malformed_bbox(tmp_path, bbox):
    make_coco(tmp_path, annotations=[{"id": 5, "image_id": 10, "category_id": 1, "bbox": bbox}])
    with pytest.raises(ValueError, match=r"instances_train2017\.json: annotations\[0\] \(id=5\) has bbox="):
        CocoDetection(tmp_path)


def test_missing_image_folder(tmp_path):
    make_coco(tmp_path)
    ann = tmp_path / "annotations" / "instances_train2017.json"
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), "nowhere"))):
        CocoDetection(img_dir=tmp_path / "nowhere", ann_file=ann)


def test_image_missing_on_disk_error_names_path(coco_root):
    os.remove(coco_root / "train2017" / "c.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .*instances_train2017\.json.*c\.jpg"):
        CocoDetection(coco_root)


def test_image_missing_on_disk_skip_leaves_it_out(coco_root, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    os.remove(coco_root / "train2017" / "c.jpg")
    ds = CocoDetection(coco_root, on_bad_image="skip")
    assert ds.image_ids == [5, 8, 10]
    assert list(ds.skipped) == [os.path.join(str(coco_root), "train2017", "c.jpg")]
    assert sum("are missing from" in r.getMessage() for r in caplog.records) == 1
    assert ds.num_degenerate == 2  # image 7's missing-bbox annotation is not counted: its image is gone
    _, target = ds[ds.image_ids.index(10)]
    assert target["labels"].tolist() == [2, 3]


def test_missing_file_in_subfolder_uses_exists(tmp_path):
    images = {1: ("sub/a.jpg", 8, 8, "RGB")}
    (tmp_path / "train2017" / "sub").mkdir(parents=True)
    make_coco(tmp_path, images=images, annotations=[], write_images=False)
    with pytest.raises(FileNotFoundError, match=r"sub/a\.jpg"):
        CocoDetection(tmp_path)
    _write_image(tmp_path / "train2017" / "sub" / "a.jpg", 8, 8)
    assert CocoDetection(tmp_path)[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_corrupt_image_error_names_path(coco_root, corruption):
    path = coco_root / "train2017" / "c.jpg"
    data = path.read_bytes()
    path.write_bytes(b"this is not a jpeg" if corruption == "garbage" else data[: len(data) // 2])
    ds = CocoDetection(coco_root)  # found lazily: construction only lists the folder
    with pytest.raises(BadImageError, match=re.escape(str(path))):
        ds[_index_of(ds, 7)]
    # the other images are fine
    assert ds[_index_of(ds, 10)][1]["image_id"] == 10


def test_corrupt_image_skip_returns_next_valid_and_counts(coco_root, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    path = coco_root / "train2017" / "c.jpg"
    path.write_bytes(b"\xff\xd8 broken")
    ds = CocoDetection(coco_root, on_bad_image="skip")
    i = _index_of(ds, 7)
    _, target = ds[i]
    assert target["image_id"] == ds.image_ids[i + 1]  # the next item, deterministically
    assert list(ds.skipped) == [str(path)] and "cannot decode" in ds.skipped[str(path)]
    _, again = ds[i]  # known bad: not decoded or logged again
    assert again["image_id"] == ds.image_ids[i + 1]
    assert sum("skipping unreadable" in r.getMessage() for r in caplog.records) == 1
    assert len(ds) == 4  # length is stable (DataLoader samplers rely on it)


def test_skip_wraps_around_at_the_end(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "train2017" / "a.jpg").write_bytes(b"broken")  # id 10: the last item
    ds = CocoDetection(tmp_path, on_bad_image="skip")
    assert ds[len(ds) - 1][1]["image_id"] == ds.image_ids[0]


def test_all_images_bad_raises(tmp_path):
    images = {1: ("a.jpg", 8, 8, "RGB")}
    make_coco(tmp_path, images=images, annotations=[])
    (tmp_path / "train2017" / "a.jpg").write_bytes(b"broken")
    ds = CocoDetection(tmp_path, on_bad_image="skip")
    with pytest.raises(BadImageError, match="none of the 1 samples"):
        ds[0]


def test_image_size_differs_from_json(tmp_path):
    make_coco(tmp_path)
    _write_image(tmp_path / "train2017" / "a.jpg", 41, 30)  # json says 40x30
    ds = CocoDetection(tmp_path)
    with pytest.raises(BadImageError, match=r"a\.jpg: decoded size 30x41 \(HxW\) differs from 30x40"):
        ds[_index_of(ds, 10)]
    skipping = CocoDetection(tmp_path, on_bad_image="skip")
    assert skipping[_index_of(skipping, 10)][1]["image_id"] == skipping.image_ids[0]
