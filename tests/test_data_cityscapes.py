"""CityscapesSegmentation: file discovery, labelIds -> trainIds, value/size checks, bad files.

Fixtures are tiny Cityscapes-layout folders written to ``tmp_path``; nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from acamkd.data import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    BadImageError,
    CityscapesSegmentation,
    labelids_to_trainids,
    segmentation_collate,
)

H, W = 6, 10


def _stem(city, k):
    return f"{city}_{k:06d}_000019"


def write_sample(root, split, city, k, label=None, kind="labelTrainIds", image_size=(H, W), label_mode="L",
                 seed=0):
    """One ``*_leftImg8bit.png`` and its ``*_gtFine_<kind>.png`` (``kind=None``: no label file)."""
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = image_size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{_stem(city, k)}_leftImg8bit.png")
    if kind is not None:
        if label is None:
            label = rng.integers(0, 19, (H, W)).astype(np.uint8)
            label[0, 0] = 255
        img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L")
        if label_mode == "P":
            img = img.convert("P")  # palette png: indices are the ids
            img.putpalette([v for i in range(256) for v in (255 - i, i, (7 * i) % 256)])
        img.save(gt_dir / f"{_stem(city, k)}_gtFine_{kind}.png")
    return img_dir / f"{_stem(city, k)}_leftImg8bit.png", gt_dir / f"{_stem(city, k)}_gtFine_{kind}.png"


@pytest.fixture
def city_root(tmp_path):
    """Two cities, listed out of order on disk, 3 images."""
    write_sample(tmp_path, "train", "zurich", 0, seed=1)
    write_sample(tmp_path, "train", "aachen", 1, seed=2)
    write_sample(tmp_path, "train", "aachen", 0, seed=3)
    return tmp_path


def test_item_format_and_sorted_order(city_root):
    ds = CityscapesSegmentation(city_root)
    assert len(ds) == 3
    assert [os.path.basename(p) for p in ds.images] == [
        "aachen_000000_000019_leftImg8bit.png", "aachen_000001_000019_leftImg8bit.png",
        "zurich_000000_000019_leftImg8bit.png"]
    assert ds.label_kinds == ["trainIds"] * 3
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert label.dtype == torch.int64 and label.shape == (H, W)
    on_disk = np.asarray(Image.open(ds.label_files[0]))
    assert label.tolist() == on_disk.astype(np.int64).tolist()
    assert ds.num_classes == 19 and ds.class_names == list(CITYSCAPES_CLASSES) and ds.ignore_index == 255


def test_image_pixels_match_png(city_root):
    ds = CityscapesSegmentation(city_root)
    image, _ = ds[2]
    ref = np.asarray(Image.open(ds.images[2]).convert("RGB")).astype(np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(ref).permute(2, 0, 1))


def test_official_table_is_complete():
    assert sorted(CITYSCAPES_ID_TO_TRAINID) == [-1] + list(range(34))
    train_ids = sorted(v for v in CITYSCAPES_ID_TO_TRAINID.values() if v != 255)
    assert train_ids == list(range(19))
    assert CITYSCAPES_ID_TO_TRAINID[-1] == 255  # license plate
    assert CITYSCAPES_ID_TO_TRAINID[7] == 0 and CITYSCAPES_ID_TO_TRAINID[26] == 13  # road, car
    assert CITYSCAPES_ID_TO_TRAINID[33] == 18  # bicycle


def test_labelids_to_trainids_every_id():
    ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    mapped = labelids_to_trainids(ids)
    assert mapped.dtype == np.uint8
    assert mapped.ravel().tolist() == [CITYSCAPES_ID_TO_TRAINID[i] for i in range(34)]


def test_labelids_minus_one_and_255_are_ignore():
    assert labelids_to_trainids(np.array([[-1, 7, 33]], dtype=np.int32)).tolist() == [[255, 0, 18]]
    assert labelids_to_trainids(np.array([[255, 8]], dtype=np.uint8)).tolist() == [[255, 1]]


def test_labelids_unknown_values_listed():
    with pytest.raises(ValueError, match=r"x\.png: values \[34, 200\] are not Cityscapes label ids"):
        labelids_to_trainids(np.array([[34, 7, 200]], dtype=np.uint8), "x.png")
    with pytest.raises(ValueError, match=r"values \[-7, 300\]"):
        labelids_to_trainids(np.array([[-7, 300, 7]], dtype=np.int32))


def test_dataset_maps_labelids_when_no_trainids(tmp_path):
    raw = np.array([[0, 7, 8, 11, 26, 33, 24, 23, 255, 14]] * H, dtype=np.uint8)
    write_sample(tmp_path, "val", "lindau", 0, label=raw, kind="labelIds")
    ds = CityscapesSegmentation(tmp_path, split="val")
    assert ds.label_kinds == ["labelIds"]
    _, label = ds[0]
    assert label[0].tolist() == [255, 0, 1, 2, 13, 18, 11, 10, 255, 255]


def test_trainids_preferred_when_both_exist(tmp_path):
    trainids = np.full((H, W), 3, dtype=np.uint8)
    write_sample(tmp_path, "train", "bonn", 0, label=trainids)
    gt = tmp_path / "gtFine" / "train" / "bonn" / f"{_stem('bonn', 0)}_gtFine_labelIds.png"
    Image.fromarray(np.full((H, W), 7, dtype=np.uint8)).save(gt)
    ds = CityscapesSegmentation(tmp_path)
    assert ds.label_kinds == ["trainIds"]
    assert (ds[0][1] == 3).all()


def test_palette_label_png_reads_indices_not_colours(tmp_path):
    label = np.arange(H * W).reshape(H, W) % 19
    write_sample(tmp_path, "train", "bonn", 0, label=label, label_mode="P")
    assert CityscapesSegmentation(tmp_path)[0][1].tolist() == label.tolist()


def test_fewer_classes_with_names(tmp_path):
    label = np.array([[0, 1, 2, 3, 4, 255, 0, 1, 2, 3]] * H, dtype=np.uint8)
    write_sample(tmp_path, "train", "synth", 0, label=label)
    names = ["a", "b", "c", "d", "e"]
    ds = CityscapesSegmentation(tmp_path, num_classes=5, class_names=names)
    assert ds.class_names == names and ds[0][1].max() == 255
    assert CityscapesSegmentation(tmp_path, num_classes=5).class_names == [f"class_{i}" for i in range(5)]
    with pytest.raises(ValueError, match="class_names has 2 names, num_classes is 5"):
        CityscapesSegmentation(tmp_path, num_classes=5, class_names=["a", "b"])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            CityscapesSegmentation(tmp_path, num_classes=bad)
    with pytest.raises(ValueError, match=r"ignore_index=255 is one of the train ids 0..255"):
        CityscapesSegmentation(tmp_path, num_classes=256)  # 256 classes need another ignore label
    assert CityscapesSegmentation(tmp_path, num_classes=256, ignore_index=1000).ignore_index == 1000


def test_own_ignore_label(tmp_path):
    """``ignore_index`` replaces 255: 9 is then unlabelled, and 255 an out-of-range value."""
    label = np.array([[0, 1, 2, 9, 9, 0, 1, 2, 0, 1]] * H, dtype=np.uint8)
    _, gt = write_sample(tmp_path, "train", "synth", 0, label=label)
    ds = CityscapesSegmentation(tmp_path, num_classes=3, ignore_index=9)
    assert ds.ignore_index == 9 and ds[0][1][0].tolist() == label[0].tolist()
    with pytest.raises(ValueError, match=re.escape(f"{gt}: label values [9] are outside the train ids 0..2 and "
                                                   f"255 (ignore)") + ".*set data.num_classes.*data.ignore_index"):
        CityscapesSegmentation(tmp_path, num_classes=3)[0]


def test_labelids_need_the_19_class_table(tmp_path):
    write_sample(tmp_path, "train", "bonn", 0, label=np.full((H, W), 7), kind="labelIds")
    with pytest.raises(ValueError, match=r"bonn_000000_000019_gtFine_labelIds\.png: only a .*num_classes=5"):
        CityscapesSegmentation(tmp_path, num_classes=5)


def test_transforms_run_last(city_root):
    ds = CityscapesSegmentation(city_root, transforms=lambda im, lab: (im[:, :2], lab[:2]))
    image, label = ds[0]
    assert image.shape == (3, 2, W) and label.shape == (2, W)


def test_dataloader_with_segmentation_collate(city_root):
    loader = torch.utils.data.DataLoader(CityscapesSegmentation(city_root), batch_size=2,
                                         collate_fn=segmentation_collate)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, H, W) and labels.shape == (2, H, W) and labels.dtype == torch.int64


# --------------------------------------------------------------------------- errors
def test_missing_split_folder_names_it(tmp_path):
    expected = re.escape(os.path.join(str(tmp_path), "leftImg8bit", "val"))
    with pytest.raises(FileNotFoundError, match=expected):
        CityscapesSegmentation(tmp_path, split="val")


def test_no_images_names_searched_folder(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "train" / "aachen" / "notes.txt").write_text("x")
    searched = os.path.join(str(tmp_path), "leftImg8bit", "train")
    expected = r"no \*_leftImg8bit\.png images found under " + re.escape(searched)
    with pytest.raises(FileNotFoundError, match=expected):
        CityscapesSegmentation(tmp_path)


def test_image_without_label_names_image(tmp_path):
    write_sample(tmp_path, "train", "aachen", 0)
    write_sample(tmp_path, "train", "aachen", 1, kind=None)
    with pytest.raises(FileNotFoundError, match=r"aachen_000001_000019_leftImg8bit\.png has no label file.*"
                                                r"aachen_000001_000019_gtFine_labelTrainIds\.png"):
        CityscapesSegmentation(tmp_path)


def test_label_values_outside_train_ids_listed(tmp_path):
    label = np.zeros((H, W), dtype=np.uint8)
    label[0, :3] = [19, 200, 255]
    _, gt = write_sample(tmp_path, "train", "aachen", 0, label=label)
    ds = CityscapesSegmentation(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{gt}: label values [19, 200] are outside the train ids 0..18")):
        ds[0]
    label[0, :3] = [4, 5, 255]
    write_sample(tmp_path, "train", "aachen", 0, label=label)
    with pytest.raises(ValueError, match=r"label values \[5\] are outside the train ids 0..4"):
        CityscapesSegmentation(tmp_path, num_classes=5)[0]


def test_image_label_size_mismatch_gives_both_sizes(tmp_path):
    img, gt = write_sample(tmp_path, "train", "aachen", 0, image_size=(H, W + 2))
    ds = CityscapesSegmentation(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"image {img} is {H}x{W + 2} (HxW), label {gt} is {H}x{W}")):
        ds[0]


def test_colour_label_png_rejected(tmp_path):
    _, gt = write_sample(tmp_path, "train", "aachen", 0)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(gt)
    with pytest.raises(ValueError, match=re.escape(f"{gt}: a label png must have one channel") + ".*'RGB'"):
        CityscapesSegmentation(tmp_path)[0]


def test_bad_on_bad_image_value(city_root):
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        CityscapesSegmentation(city_root, on_bad_image="drop")


def test_corrupt_image_error_names_path(city_root):
    ds = CityscapesSegmentation(city_root)
    with open(ds.images[1], "r+b") as f:
        f.truncate(40)
    with pytest.raises(BadImageError, match=re.escape(ds.images[1])):
        ds[1]


def test_corrupt_image_skip_is_deterministic_and_counted(city_root, caplog):
    caplog.set_level(logging.INFO, logger="acamkd.data")
    ds = CityscapesSegmentation(city_root, on_bad_image="skip")
    with open(ds.images[1], "wb") as f:
        f.write(b"garbage")
    expected = ds[2]
    for _ in range(2):
        image, label = ds[1]
        torch.testing.assert_close(image, expected[0])
        torch.testing.assert_close(label, expected[1])
    assert list(ds.skipped) == [ds.images[1]]
    assert sum("skipping unreadable" in r.getMessage() for r in caplog.records) == 1


def test_corrupt_label_error_and_skip(city_root):
    ds = CityscapesSegmentation(city_root)
    with open(ds.label_files[2], "wb") as f:
        f.write(b"\x89PNG broken")
    with pytest.raises(BadImageError, match=re.escape(ds.label_files[2]) + ": cannot decode label png"):
        ds[2]
    skipping = CityscapesSegmentation(city_root, on_bad_image="skip")
    torch.testing.assert_close(skipping[2][1], skipping[0][1])  # wraps around to the first
    assert ds.label_files[2] in skipping.skipped[ds.images[2]]
