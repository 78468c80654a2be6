"""The built-in ``shapes`` dataset: both layouts, valid COCO, boxes that are the visible pixels,
determinism, difficulty, the cache and the refusals. Small images keep it fast."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from acamkd.data import synthetic as S

# pycocotools' own decode trips a numpy 2 deprecation inside annToMask: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = (96, 128)
SMALL = dict(train=6, val=3, size=SIZE, seed=0, difficulty="normal")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, S.make_shapes(out, workers=1, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def _label_path(out: Path, split: str, image: dict) -> Path:
    city_stem = image["cityscapes_stem"]
    return out / "cityscapes" / "gtFine" / split / f"{city_stem}_gtFine_labelTrainIds.png"


# --------------------------------------------------------------------------------- layout
def test_both_layouts_written(dataset):
    out, summary = dataset
    assert not summary["cached"]
    for split, n in (("train", 6), ("val", 3)):
        coco_dir = out / "coco" / f"{split}2017"
        jpgs = sorted(coco_dir.glob("*.jpg"))
        assert len(jpgs) == n and all(len(p.stem) == 12 and p.stem.isdigit() for p in jpgs)
        assert (out / "coco" / "annotations" / f"instances_{split}2017.json").is_file()
        images = sorted((out / "cityscapes" / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        labels = sorted((out / "cityscapes" / "gtFine" / split).glob("*/*_gtFine_labelTrainIds.png"))
        assert len(images) == len(labels) == n
        for img, lab in zip(images, labels):
            city = img.parent.name
            stem = img.name[: -len("_leftImg8bit.png")]
            city_, seq, frame = stem.split("_")
            assert city_ == city and len(seq) == 6 and len(frame) == 6
            assert lab.name == f"{stem}_gtFine_labelTrainIds.png" and lab.parent.name == city
            im, lb = Image.open(img), Image.open(lab)
            assert im.mode == "RGB" and lb.mode == "L" and im.size == lb.size == (SIZE[1], SIZE[0])
    assert set(S.CITIES["train"]).isdisjoint(S.CITIES["val"])  # Cityscapes splits by city


def test_meta_records_classes_and_params(dataset):
    out, summary = dataset
    meta = json.loads((out / S.META_NAME).read_text())
    assert meta["params"] == {"train": 6, "val": 3, "size": list(SIZE), "seed": 0, "difficulty": "normal"}
    assert meta["version"] == S.GENERATOR_VERSION
    assert meta["class_names"] == [c.name for c in S.CLASSES] == summary["class_names"]
    assert meta["num_classes"] == len(S.CLASSES) >= 6
    assert {int(k): v for k, v in meta["train_id_to_category_id"].items()} == {
        i + 1: c.category_id for i, c in enumerate(S.CLASSES)}
    assert meta["ignore_index"] == 255 and meta["background_train_id"] == 0
    assert str(out) not in (out / S.META_NAME).read_text()  # relocatable, and byte-identical across dirs


def test_coco_json_is_valid_with_non_contiguous_ids(dataset):
    out, _ = dataset
    for split, n in (("train", 6), ("val", 3)):
        path = out / "coco" / "annotations" / f"instances_{split}2017.json"
        raw = json.loads(path.read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()
        coco = COCO(str(path))
        cat_ids = sorted(coco.getCatIds())
        assert cat_ids == [c.category_id for c in S.CLASSES]
        assert cat_ids != list(range(1, len(cat_ids) + 1)), "ids must be non-contiguous"
        assert len(coco.getImgIds()) == n
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(out / "coco" / f"{split}2017" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            assert img["file_name"] == f"{img['id']:012d}.jpg"
        anns = coco.loadAnns(coco.getAnnIds())
        assert len({a["id"] for a in anns}) == len(anns)
        for a in anns:
            assert a["category_id"] in cat_ids and a["iscrowd"] in (0, 1) and a["area"] > 0
            assert all(isinstance(v, float) for v in a["bbox"])
    train_ids = set(COCO(str(out / "coco/annotations/instances_train2017.json")).getImgIds())
    val_ids = set(COCO(str(out / "coco/annotations/instances_val2017.json")).getImgIds())
    assert train_ids.isdisjoint(val_ids)


def test_boxes_are_tight_visible_pixels_of_the_label_png(dataset):
    """Every box is inside the image, equals the tight box of its mask, and the masks of each
    class are exactly that class's pixels in the Cityscapes label (255 exactly for crowds)."""
    out, _ = dataset
    meta = json.loads((out / S.META_NAME).read_text())
    to_train = {int(k): v for k, v in meta["category_id_to_train_id"].items()}
    checked = 0
    for split in ("train", "val"):
        coco = COCO(str(out / "coco" / "annotations" / f"instances_{split}2017.json"))
        for img in coco.loadImgs(coco.getImgIds()):
            label = np.asarray(Image.open(_label_path(out, split, img)))
            H, W = label.shape
            union = {t: np.zeros_like(label, bool) for t in list(to_train.values()) + [255]}
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= W and y + h <= H
                m = coco.annToMask(a).astype(bool)
                assert a["area"] == m.sum()
                assert a["bbox"] == _tight_box(m)
                value = 255 if a["iscrowd"] else to_train[a["category_id"]]
                assert (label[m] == value).all()
                # Tightness against the label png itself: the class's pixels inside the box
                # touch all four sides.
                inside = label[int(y):int(y + h), int(x):int(x + w)] == value
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                union[value] |= m
                checked += 1
            for value, m in union.items():
                np.testing.assert_array_equal(label == value, m, err_msg=f"{img['file_name']} train id {value}")
    assert checked > 10


@pytest.mark.parametrize("difficulty", ["easy", "normal", "hard"])
def test_visible_masks_follow_z_order(difficulty):
    """Recompute what is visible from the layers (each full mask, bottom to top) and compare."""
    checked_occluded = 0
    for index in range(12):
        scene = S.render_scene(3, "train", index, SIZE, difficulty)
        H, W = SIZE
        full = []
        for layer in scene.layers:
            m = np.zeros((H, W), bool)
            h, w = layer.mask.shape
            m[layer.y0:layer.y0 + h, layer.x0:layer.x0 + w] = layer.mask
            full.append(m)
        covered_above = [np.zeros((H, W), bool) for _ in full]
        acc = np.zeros((H, W), bool)
        for k in range(len(full) - 1, -1, -1):
            covered_above[k] = acc.copy()
            acc |= full[k]
        annotated = {inst.layer for inst in scene.instances}
        assert annotated == {k for k, layer in enumerate(scene.layers) if layer.kind != "distractor"}
        for inst in scene.instances:
            visible = full[inst.layer] & ~covered_above[inst.layer]
            np.testing.assert_array_equal(inst.mask, visible)
            assert list(inst.bbox) == _tight_box(visible) and inst.area == visible.sum()
            assert inst.area >= S.DIFFICULTIES[difficulty].min_visible * full[inst.layer].sum() - 1e-9
            checked_occluded += int(inst.area < full[inst.layer].sum())
        expected = np.zeros((H, W), np.uint8)
        for k, layer in enumerate(scene.layers):  # paint bottom to top
            value = 0 if layer.kind == "distractor" else 255 if layer.kind == "crowd" else layer.class_index + 1
            expected[full[k]] = value
        np.testing.assert_array_equal(scene.label, expected)
    if difficulty != "easy":
        assert checked_occluded > 0, "occlusion never happened: the test would not catch z-order bugs"


def test_jpeg_and_png_hold_the_same_scene(dataset):
    out, _ = dataset
    coco = json.loads((out / "coco/annotations/instances_val2017.json").read_text())
    for img in coco["images"]:
        jpg = np.asarray(Image.open(out / "coco/val2017" / img["file_name"]), np.float32)
        png = np.asarray(Image.open(out / "cityscapes/leftImg8bit/val" / f"{img['cityscapes_stem']}_leftImg8bit.png"),
                         np.float32)
        assert np.abs(jpg - png).mean() < 6.0  # only JPEG loss between them
    scene = S.render_scene(0, "val", 0, SIZE, "normal")
    np.testing.assert_array_equal(np.asarray(Image.open(
        out / "cityscapes/leftImg8bit/val" / f"{coco['images'][0]['cityscapes_stem']}_leftImg8bit.png")), scene.image)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_any_workers_other_seed_differs(tmp_path, dataset):
    out, _ = dataset
    again = tmp_path / "again"
    S.make_shapes(again, workers=2, **SMALL)  # other worker count: still the same bytes
    a, b = _files(out), _files(again)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    other = tmp_path / "other"
    S.make_shapes(other, workers=1, **{**SMALL, "seed": 1})
    c = _files(other)
    differing = [k for k in a if k != S.META_NAME and a[k] != c.get(k)]
    assert len(differing) > 20


def test_scenes_depend_on_split_and_index():
    a = S.render_scene(0, "train", 0, SIZE)
    assert not np.array_equal(a.image, S.render_scene(0, "val", 0, SIZE).image)
    assert not np.array_equal(a.image, S.render_scene(0, "train", 1, SIZE).image)
    np.testing.assert_array_equal(a.image, S.render_scene(0, "train", 0, SIZE).image)


# ----------------------------------------------------------------------------- statistics
def _stats(difficulty: str, n: int = 40) -> dict[str, float]:
    scenes = [S.render_scene(7, "train", i, SIZE, difficulty) for i in range(n)]
    objects = [sum(not i.iscrowd for i in s.instances) for s in scenes]
    return {"objects": float(np.mean(objects)), "distractors": float(np.mean([s.distractors for s in scenes])),
            "noise": float(np.mean([np.abs(np.diff(s.image.astype(np.float32), axis=1)).mean() for s in scenes]))}


def test_difficulty_changes_statistics():
    easy, normal, hard = _stats("easy"), _stats("normal"), _stats("hard")
    assert easy["objects"] < normal["objects"] < hard["objects"]
    assert easy["distractors"] < normal["distractors"] < hard["distractors"]
    assert easy["noise"] < hard["noise"]  # clutter + pixel noise: rougher images


def test_normal_has_small_medium_large_objects_empty_images_and_crowds():
    areas, empty, crowds, classes = [], 0, 0, set()
    for i in range(40):
        scene = S.render_scene(0, "train", i, S.DEFAULT_SIZE, "normal")
        areas += [inst.area for inst in scene.instances if not inst.iscrowd]
        classes |= {inst.class_index for inst in scene.instances}
        empty += not scene.instances
        crowds += sum(inst.iscrowd for inst in scene.instances)
    areas = np.array(areas)
    assert (areas < 32 ** 2).sum() >= 10 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    assert classes == set(range(len(S.CLASSES)))
    for i in range(40, 200):  # rarer events: look at more, smaller scenes
        if empty and crowds:
            break
        scene = S.render_scene(0, "train", i, SIZE, "normal")
        empty += not scene.instances
        crowds += sum(inst.iscrowd for inst in scene.instances)
    assert empty > 0 and crowds > 0


def test_summary_counts_match_json(dataset):
    out, summary = dataset
    coco = json.loads((out / "coco/annotations/instances_train2017.json").read_text())
    c = summary["counts"]["train"]
    assert c["images"] == 6
    assert c["objects"] == sum(not a["iscrowd"] for a in coco["annotations"])
    assert c["crowd"] == sum(a["iscrowd"] for a in coco["annotations"])


# ------------------------------------------------------------------------- cache, refusal
def test_cache_hit_returns_without_rewriting(dataset):
    out, first = dataset
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = S.make_shapes(out, **SMALL)
    assert again["cached"] and again["counts"] == first["counts"] and again["paths"] == first["paths"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_different_params_refused_then_overwritten(tmp_path):
    out = tmp_path / "d"
    S.make_shapes(out, train=3, val=2, size=SIZE, seed=0, workers=1)
    with pytest.raises(FileExistsError, match=r"train: 3 there, 2 asked.*overwrite"):
        S.make_shapes(out, train=2, val=2, size=SIZE, seed=0, workers=1)
    with pytest.raises(FileExistsError, match="difficulty"):
        S.make_shapes(out, train=3, val=2, size=SIZE, seed=0, difficulty="hard", workers=1)
    summary = S.make_shapes(out, train=2, val=2, size=SIZE, seed=0, workers=1, overwrite=True)
    assert not summary["cached"]
    assert len(list((out / "coco/train2017").glob("*.jpg"))) == 2  # no stale third image
    assert len(list((out / "cityscapes/gtFine/train").glob("*/*.png"))) == 2
    assert json.loads((out / S.META_NAME).read_text())["params"]["train"] == 2


def test_incomplete_cache_is_regenerated(tmp_path):
    out = tmp_path / "d"
    S.make_shapes(out, train=2, val=1, size=SIZE, workers=1)
    victim = next((out / "coco/train2017").glob("*.jpg"))
    victim.unlink()
    summary = S.make_shapes(out, train=2, val=1, size=SIZE, workers=1)
    assert not summary["cached"] and victim.is_file()


def test_foreign_dataset_is_not_touched(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    precious = tmp_path / "coco" / "train2017" / "real.jpg"
    precious.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        S.make_shapes(tmp_path, train=1, val=1, size=SIZE)
    assert precious.read_bytes() == b"not ours"


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=(32, 128)), "size=32x128 is out of range"),
    (dict(size=(96,)), "size must be"),
    (dict(size=(96.0, 128)), "size must be"),
    (dict(train=-1), "train must be"),
    (dict(val=-3), "val must be"),
    (dict(train=0, val=0), "nothing to generate"),
    (dict(difficulty="medium"), "difficulty must be one of"),
    (dict(seed=-1), "seed must be"),
    (dict(workers=0), "workers must be"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.make_shapes(tmp_path / "x", **{**dict(train=1, val=1, size=SIZE), **kwargs})
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------- pieces
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_rle_matches_pycocotools(h, w, seed, density):
    m = np.random.default_rng(seed).random((h, w)) < density
    ours = S.rle_encode(m)
    theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert ours["size"] == list(theirs["size"]) and ours["counts"] == theirs["counts"].decode()


def test_rle_of_a_large_scene_mask_matches_pycocotools():
    scene = S.render_scene(0, "train", 2, S.DEFAULT_SIZE, "hard")
    for inst in scene.instances:
        theirs = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
        assert S.rle_encode(inst.mask)["counts"] == theirs["counts"].decode()


def test_docstring_quotes_the_real_difficulty_table():
    assert S.difficulty_table() in S.__doc__
    for name in S.DIFFICULTIES:
        assert name in S.difficulty_table().splitlines()[1]
    for c in S.CLASSES:
        assert f"{c.name:<9}  {c.category_id:<11}" in S.__doc__  # the class table lists its ids


# ------------------------------------------------------------------------------------ CLI
def test_cli_main_makes_then_hits_cache(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train", "2", "--val", "1", "--size", "96x128", "--seed", "4",
            "--difficulty", "easy", "--json"]
    assert S.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["params"] == {"train": 2, "val": 1, "size": [96, 128], "seed": 4, "difficulty": "easy"}
    assert S.main(argv[:-1]) == 0
    assert "cache hit" in capsys.readouterr().out
    assert S.main(["--out", str(out), "--train", "3", "--val", "1", "--size", "96x128"]) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--size", "10x10"], "out of range"),
    (["--size", "big"], "HEIGHTxWIDTH"),
    (["--difficulty", "brutal"], "invalid choice"),
    (["--train", "-2"], "train must be"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        S.main(["--out", str(tmp_path / "o"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert S.build_parser().prog == "acamkd make-data shapes"
