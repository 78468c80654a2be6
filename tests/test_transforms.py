"""Paired transforms keep targets consistent with the image; collate functions; RNG determinism."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from acamkd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    ResizeKeepRatio,
    detection_collate,
    segmentation_collate,
)


def det_sample(h=30, w=40):
    """An image that is bright exactly inside its two boxes, and the matching target."""
    boxes = torch.tensor([[2.0, 3.0, 12.0, 8.0], [20.0, 10.0, 36.0, 28.0]])
    image = torch.zeros(3, h, w)
    for x1, y1, x2, y2 in boxes.int().tolist():
        image[:, y1:y2, x1:x2] = 1.0
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "area": torch.tensor([50.0, 288.0]),
              "iscrowd": torch.zeros(2, dtype=torch.int64), "image_id": 7, "orig_size": torch.tensor([h, w])}
    return image, target


def seg_sample(h=6, w=10):
    image = torch.rand(3, h, w)
    label = torch.arange(h * w).reshape(h, w) % 19
    return image, label


def _box_means(image, boxes):
    return [image[:, y1:y2, x1:x2].mean().item() for x1, y1, x2, y2 in boxes.round().int().tolist()]


# --------------------------------------------------------------------------- flip
def test_flip_moves_boxes_with_the_pixels():
    image, target = det_sample()
    out, t = RandomHorizontalFlip(p=1.0)(image, target)
    torch.testing.assert_close(t["boxes"], torch.tensor([[28.0, 3, 38, 8], [4.0, 10, 20, 28]]))
    assert _box_means(out, t["boxes"]) == [1.0, 1.0]
    assert out.sum() == image.sum()
    assert t["labels"] is target["labels"] and t["image_id"] == 7
    assert target["boxes"][0, 0] == 2.0  # input target not modified


def test_flip_twice_is_identity_for_both_target_kinds():
    flip = RandomHorizontalFlip(p=1.0)
    image, target = det_sample()
    out, t = flip(*flip(image, target))
    torch.testing.assert_close(out, image)
    torch.testing.assert_close(t["boxes"], target["boxes"])
    image, label = seg_sample()
    out, lab = flip(*flip(image, label))
    torch.testing.assert_close(out, image)
    assert torch.equal(lab, label)
    out, lab = flip(image, label)
    assert torch.equal(lab, label.flip(-1)) and torch.equal(out, image.flip(-1))


def test_flip_p0_and_none_target():
    image, target = det_sample()
    out, t = RandomHorizontalFlip(p=0.0)(image, target)
    assert out is image and t is target
    out, t = RandomHorizontalFlip(p=1.0)(image, None)
    assert t is None and torch.equal(out, image.flip(-1))


def test_flip_empty_boxes_and_masks():
    image = torch.rand(3, 4, 5)
    masks = torch.zeros(1, 4, 5, dtype=torch.uint8)
    masks[0, :, 0] = 1
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": masks}
    _, t = RandomHorizontalFlip(p=1.0)(image, target)
    assert t["boxes"].shape == (0, 4)
    assert t["masks"][0, :, -1].all() and t["masks"].sum() == 4


def test_random_transforms_are_deterministic_given_the_seed():
    pipeline = Compose([RandomScale(0.5, 2.0), RandomCrop(8, 8), RandomHorizontalFlip()])
    image, label = seg_sample(12, 16)
    torch.manual_seed(123)
    a = [pipeline(image, label) for _ in range(5)]
    torch.manual_seed(123)
    b = [pipeline(image, label) for _ in range(5)]
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert len({tuple(la.flatten().tolist()) for _, la in a}) > 1  # and actually random


def test_flip_rate_matches_p():
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(p=0.3)
    image = torch.arange(2.0).reshape(1, 1, 2).expand(3, 1, 2)
    flipped = sum(bool(flip(image, None)[0][0, 0, 0] == 1) for _ in range(2000))
    assert 500 < flipped < 700


# --------------------------------------------------------------------------- resize
@pytest.mark.parametrize("hw,expected", [
    ((480, 640), (800, 1067)),   # short side rule
    ((100, 1000), (133, 1333)),  # long side capped by max_size
    ((1333, 800), (1333, 800)),  # already there: unchanged
    ((30, 40), (800, 1067)),     # upscaling
])
def test_resize_keep_ratio_rule(hw, expected):
    assert ResizeKeepRatio(800, 1333).output_size(*hw, 800) == expected


def test_resize_keep_ratio_scales_boxes_and_area():
    image, target = det_sample(30, 40)
    out, t = ResizeKeepRatio(min_size=60, max_size=1000)(image, target)
    assert out.shape == (3, 60, 80)
    torch.testing.assert_close(t["boxes"], target["boxes"] * 2)
    torch.testing.assert_close(t["area"], target["area"] * 4)
    assert t["orig_size"].tolist() == [30, 40]  # the original size stays for mapping predictions back
    inset = t["boxes"] + torch.tensor([1.0, 1.0, -1.0, -1.0])  # bilinear blurs the edges by half a pixel
    assert _box_means(out, inset) == [1.0, 1.0]
    # the bright mass moved with the boxes
    assert (out.sum() / 3).item() == pytest.approx(t["area"].sum().item(), rel=1e-3)


def test_resize_keep_ratio_unchanged_size_is_a_no_op():
    image, target = det_sample(30, 40)
    out, t = ResizeKeepRatio(30, 1000)(image, target)
    assert out is image and t is target


def test_resize_keep_ratio_multiscale_is_drawn_from_the_list():
    image, _ = det_sample(30, 40)
    torch.manual_seed(0)
    heights = {ResizeKeepRatio((20, 40, 60), 1000)(image, None)[0].shape[1] for _ in range(30)}
    assert heights == {20, 40, 60}


def test_resize_label_is_nearest_and_boxes_use_realised_ratios():
    image, label = seg_sample(6, 10)
    out, lab = Resize(9, 15)(image, label)
    assert out.shape == (3, 9, 15) and lab.shape == (9, 15) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())
    image, target = det_sample(30, 40)
    _, t = Resize(45, 50)(image, target)
    torch.testing.assert_close(t["boxes"], target["boxes"] * torch.tensor([1.25, 1.5, 1.25, 1.5]))


def test_resize_masks_and_empty_masks():
    image = torch.rand(3, 4, 4)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 4, dtype=torch.uint8)}
    _, t = Resize(8, 6)(image, target)
    assert t["masks"].shape == (0, 8, 6) and t["masks"].dtype == torch.uint8


# --------------------------------------------------------------------------- scale and crop
def test_random_scale_range_and_label_values():
    image, label = seg_sample(20, 30)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(20):
        out, lab = RandomScale(0.5, 2.0)(image, label)
        assert out.shape[1:] == lab.shape
        assert 10 <= lab.shape[0] <= 40 and 15 <= lab.shape[1] <= 60
        assert set(lab.unique().tolist()) <= set(label.unique().tolist())
        sizes.add(tuple(lab.shape))
    assert len(sizes) > 5


def test_random_crop_pads_smaller_images_with_zero_and_ignore():
    image, label = seg_sample(6, 10)
    torch.manual_seed(0)
    out, lab = RandomCrop(8, 12, ignore_index=255)(image, label)
    assert out.shape == (3, 8, 12) and lab.shape == (8, 12)
    assert torch.equal(out[:, :6, :10], image) and torch.equal(lab[:6, :10], label)  # padding bottom/right
    assert (out[:, 6:] == 0).all() and (out[:, :, 10:] == 0).all()
    assert (lab[6:] == 255).all() and (lab[:, 10:] == 255).all()


def test_random_crop_is_a_window_of_the_input():
    image, label = seg_sample(12, 16)
    torch.manual_seed(1)
    for _ in range(10):
        out, lab = RandomCrop(5, 7)(image, label)
        # find the window: label is arange % 19 so compare against every offset
        hits = [(t, l) for t in range(8) for l in range(10)
                if torch.equal(image[:, t:t + 5, l:l + 7], out)]
        assert len(hits) == 1
        t, l = hits[0]
        assert torch.equal(label[t:t + 5, l:l + 7], lab)


def test_random_crop_pads_only_the_short_side():
    image, label = seg_sample(6, 30)
    out, lab = RandomCrop(8, 8)(image, label)
    assert out.shape == (3, 8, 8) and (lab[6:] == 255).all() and (lab[:6] != 255).all()


def test_random_crop_detection_clips_and_drops_boxes():
    image, target = det_sample(30, 40)
    torch.manual_seed(0)
    for _ in range(20):
        out, t = RandomCrop(15, 15)(image, target)
        assert out.shape == (3, 15, 15)
        b = t["boxes"]
        n = b.shape[0]
        assert t["labels"].shape == (n,) and t["area"].shape == (n,) and t["iscrowd"].shape == (n,)
        assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= 15).all() and (b[:, 1::2] <= 15).all()
        assert ((b[:, 2] - b[:, 0]) > 1e-3).all() and ((b[:, 3] - b[:, 1]) > 1e-3).all()
        assert all(m == 1.0 for m in _box_means(out, b))  # still exactly on the bright pixels
        assert t["image_id"] == 7


@given(st.lists(st.tuples(st.floats(0, 39), st.floats(0, 29), st.floats(0.01, 40), st.floats(0.01, 30)),
                min_size=0, max_size=6),
       st.integers(1, 50), st.integers(1, 50), st.booleans())
def test_geometry_keeps_boxes_inside_the_image(raw, ch, cw, flip_first):
    boxes = torch.tensor([[x, y, min(x + w, 40.0), min(y + h, 30.0)] for x, y, w, h in raw]).reshape(-1, 4)
    target = {"boxes": boxes, "labels": torch.ones(len(raw), dtype=torch.int64)}
    image = torch.rand(3, 30, 40)
    steps = [RandomHorizontalFlip(1.0), RandomScale(0.5, 2.0), RandomCrop(ch, cw)]
    if not flip_first:
        steps = steps[1:] + steps[:1]
    out, t = Compose(steps)(image, target)
    h, w = out.shape[1:]
    b = t["boxes"]
    assert out.shape == (3, ch, cw) and b.shape[0] == t["labels"].shape[0] <= len(raw)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= w + 1e-4).all() and (b[:, 3] <= h + 1e-4).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


# --------------------------------------------------------------------------- normalize, compose
def test_normalize_values_and_errors():
    image = torch.rand(3, 4, 5)
    out, t = Normalize()(image, "untouched")
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (image - mean) / std)
    assert t == "untouched"
    with pytest.raises(ValueError, match="image has 1 channels, mean/std have 3"):
        Normalize()(torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(std=(1.0, 0.0, 1.0))


def test_input_checks_name_the_transform():
    with pytest.raises(TypeError, match="RandomCrop: image must be floating point"):
        RandomCrop(2, 2)(torch.zeros(3, 4, 4, dtype=torch.uint8), None)
    with pytest.raises(TypeError, match=r"Resize: image must be a \(C, H, W\) tensor"):
        Resize(2, 2)(torch.zeros(4, 4), None)
    with pytest.raises(ValueError, match=r"RandomHorizontalFlip: label map has shape \(4, 5\), image is \(4, 4\)"):
        RandomHorizontalFlip(1.0)(torch.zeros(3, 4, 4), torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="RandomCrop: height must be an integer >= 1"):
        RandomCrop(0, 3)
    with pytest.raises(ValueError, match="ResizeKeepRatio: min_size"):
        ResizeKeepRatio(min_size=())
    with pytest.raises(ValueError, match="RandomScale: need 0 < min_scale <= max_scale"):
        RandomScale(2.0, 1.0)
    with pytest.raises(ValueError, match=r"RandomHorizontalFlip: p must be in \[0, 1\]"):
        RandomHorizontalFlip(1.5)


def test_compose_chains_in_order():
    image, target = det_sample(30, 40)
    pipeline = Compose([ResizeKeepRatio(60, 1000), RandomHorizontalFlip(1.0), Normalize()])
    out, t = pipeline(image, target)
    assert out.shape == (3, 60, 80)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([56.0, 6, 76, 16]))
    assert "ResizeKeepRatio(min_size=60" in repr(pipeline)


# --------------------------------------------------------------------------- collate
def test_detection_collate_keeps_lists_of_variable_size():
    batch = [det_sample(30, 40), det_sample(20, 25)]
    images, targets = detection_collate(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    assert [tuple(i.shape) for i in images] == [(3, 30, 40), (3, 20, 25)]
    assert targets[0] is batch[0][1]
    with pytest.raises(ValueError, match="detection_collate: empty batch"):
        detection_collate([])
    with pytest.raises(TypeError, match=r"detection_collate: batch\[0\] must be an \(image, target\) pair"):
        detection_collate([torch.zeros(3, 2, 2)])


def test_segmentation_collate_stacks_and_names_mismatched_sizes():
    images, labels = segmentation_collate([seg_sample(6, 10), seg_sample(6, 10)])
    assert images.shape == (2, 3, 6, 10) and labels.shape == (2, 6, 10) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match=r"must share a size, got \[0\] \(3, 6, 10\), \[1\] \(3, 7, 10\)"):
        segmentation_collate([seg_sample(6, 10), seg_sample(7, 10)])
    image, _ = seg_sample(6, 10)
    with pytest.raises(ValueError, match=r"batch\[0\] has image \(3, 6, 10\) and label \(6, 9\)"):
        segmentation_collate([(image, torch.zeros(6, 9, dtype=torch.int64))])
