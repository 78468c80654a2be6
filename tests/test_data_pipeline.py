"""The built-in dataset goes through the real loaders, transforms, collate and metrics:
the path the demo takes, on data the project generates (no network)."""
import pytest
import torch
from torch.utils.data import DataLoader

from acamkd.data import (
    CityscapesSegmentation,
    CocoDetection,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeKeepRatio,
    detection_collate,
    segmentation_collate,
)
from acamkd.data.synthetic import make_shapes
from acamkd.evaluation import SegMetric, coco_map, evaluate_detections


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=6, val=3, size=(96, 128), seed=3)


def test_coco_layout_loads_and_round_trips_through_evaluation(shapes):
    root = shapes["paths"]["coco_root"]
    train = CocoDetection(root, "train", transforms=Compose([ResizeKeepRatio(64, 100), RandomHorizontalFlip()]))
    val = CocoDetection(root, "val")
    assert len(train) == 6 and len(val) == 3
    assert train.num_classes == shapes["num_classes"] + 1  # labels 1..K, 0 background
    assert [train.label_to_cat_id[label] for label in range(1, train.num_classes)] == sorted(shapes["category_ids"])
    images, targets = next(iter(DataLoader(train, batch_size=3, collate_fn=detection_collate)))
    assert len(images) == 3 and all(img.shape[0] == 3 and max(img.shape[1:]) <= 100 for img in images)
    for img, target in zip(images, targets):
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= img.shape[2] + 1e-4).all() and (boxes[:, 3] <= img.shape[1] + 1e-4).all()
    # Ground truth as predictions: the whole chain (labels -> category ids -> COCOeval) is exact
    # for AP. Crowd regions are kept out of training targets and ignored by COCOeval alike.
    predictions = [{"boxes": val[i][1]["boxes"], "labels": val[i][1]["labels"],
                    "scores": torch.ones(len(val[i][1]["labels"]))} for i in range(len(val))]
    stats = evaluate_detections(val.ann_file, predictions, val.image_ids, val.label_to_cat_id)
    assert stats["AP"] == pytest.approx(1.0)
    assert coco_map(val.ann_file, [])["AP"] in (0.0, -1.0)


def test_cityscapes_layout_loads_and_scores(shapes):
    root = shapes["paths"]["cityscapes_root"]
    num_classes = shapes["num_classes"] + 1  # background + shape classes
    train = CityscapesSegmentation(root, "train", num_classes=num_classes,
                                   transforms=Compose([RandomCrop(64, 64), RandomHorizontalFlip()]))
    val = CityscapesSegmentation(root, "val", num_classes=num_classes)
    assert len(train) == 6 and len(val) == 3
    images, labels = next(iter(DataLoader(train, batch_size=2, collate_fn=segmentation_collate)))
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
    valid = labels[labels != 255]
    assert valid.numel() > 0 and valid.min() >= 0 and valid.max() < num_classes
    metric = SegMetric(num_classes)
    for i in range(len(val)):
        _, label = val[i]
        metric.update(torch.where(label == 255, torch.zeros_like(label), label)[None], label[None])
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(1.0) and result["aAcc"] == pytest.approx(1.0)


def test_the_two_layouts_hold_the_same_scenes(shapes):
    coco = CocoDetection(shapes["paths"]["coco_root"], "val")
    city = CityscapesSegmentation(shapes["paths"]["cityscapes_root"], "val", num_classes=shapes["num_classes"] + 1)
    coco_images = sorted(coco[i][0].sum().item() for i in range(len(coco)))
    city_images = sorted(city[i][0].sum().item() for i in range(len(city)))
    # JPEG vs PNG of one rendering: the same mean colour to well under one grey level.
    for a, b in zip(coco_images, city_images):
        assert abs(a - b) / (3 * 96 * 128) < 2 / 255
