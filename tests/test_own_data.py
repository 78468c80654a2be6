"""Your own data (issue 15): any number of classes in the Cityscapes layout (``data.num_classes``,
``data.class_names``, ``<root>/classes.txt``, ``data.ignore_index``), ACAM-KD's M following the
class count, a subset of a COCO file's categories (``data.categories``), class names in the
export metadata and in ``acamkd eval``'s per-class table, and the named errors."""
import json
import os
import re

import numpy as np
import pytest
import torch
from _cli_helpers import acamkd
from _detection_helpers import GroundTruthInInputFrame
from PIL import Image
from torch.utils.data import DataLoader

from acamkd.config import ConfigError, load_config
from acamkd.data import CocoDetection
from acamkd.data.classes import read_class_names, segmentation_class_names
from acamkd.data.synthetic import make_shapes
from acamkd.engine import run
from acamkd.engine.detection import DetectionTask
from acamkd.engine.distributed import DistInfo
from acamkd.engine.segmentation import SegmentationTask
from acamkd.evaluation import per_class_table, predictions_to_coco_results

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")
ELEVEN = ["road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "tree", "grass", "sky"]
H, W = 64, 80


def write_eleven_class_set(root, train=4, val=2):
    """A Cityscapes-layout folder of ``H x W`` images whose labels use train ids 0..10 (each in
    every image: vertical stripes) and 255 (a band at the top), with ``classes.txt`` beside it."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        img_dir, gt_dir = root / "leftImg8bit" / split / "town", root / "gtFine" / split / "town"
        img_dir.mkdir(parents=True), gt_dir.mkdir(parents=True)
        for k in range(count):
            label = ((np.arange(W)[None, :] // 8 + k) % 11).repeat(H, 0).astype(np.uint8)  # (H, W) ids 0..10
            label[:4] = 255
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            image[..., 0] = label * 20  # a learnable cue
            stem = f"town_{k:06d}_000019"
            Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(label, mode="L").save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
    (root / "classes.txt").write_text("# one name per train id\n" + "\n".join(ELEVEN) + "\n")
    return root


def tiny(root, out):
    return ["data.dataset=cityscapes", f"data.root={root}", "data.crop=[48,64]", "data.batch_size=2",
            "data.workers=0", "train.optimizer=adamw", "train.lr=1e-3", "train.iterations=2", "train.epochs=null",
            "train.warmup_iters=1", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=2",
            "eval.batch_size=2", f"train.output_dir={out}"]


# ---------------------------------------------------------------------------------- classes
def test_class_names_come_from_config_then_file_then_table(tmp_path):
    table = ["a", "b", "c"]
    assert segmentation_class_names(None, None, tmp_path, table) == table
    assert segmentation_class_names(3, None, tmp_path, table) == table
    assert segmentation_class_names(4, None, tmp_path, table) == ["class_0", "class_1", "class_2", "class_3"]
    (tmp_path / "classes.txt").write_text("sky\n\n# comment\n  road  \n")
    assert read_class_names(tmp_path / "classes.txt") == ["sky", "road"]
    assert segmentation_class_names(None, None, tmp_path, table) == ["sky", "road"]
    assert segmentation_class_names(None, ["x"], tmp_path, table) == ["x"]  # the config wins over the file
    with pytest.raises(ValueError, match=re.escape(f"data.num_classes=3 but {tmp_path / 'classes.txt'} names 2")):
        segmentation_class_names(3, None, tmp_path, table)
    with pytest.raises(ValueError, match="data.num_classes=2 but data.class_names has 1 names"):
        segmentation_class_names(2, ["x"], tmp_path, table)
    (tmp_path / "classes.txt").write_text("sky\nroad\nsky\n")
    with pytest.raises(ValueError, match=r"classes.txt:3: class name 'sky' repeats line 1"):
        read_class_names(tmp_path / "classes.txt")


def test_config_rules_name_the_key(tmp_path):
    seg, det = os.path.join(DEMO, "shapes_seg_student.yaml"), os.path.join(DEMO, "shapes_det_student.yaml")
    cases = [
        (seg, ["data.num_classes=3", "data.class_names=[a,b]"], r"data.class_names: has 2 names but "
                                                                 r"data.num_classes is 3"),
        (seg, ["data.class_names=[a,b,a]"], r"data.class_names: repeats 'a'"),
        (seg, ["data.num_classes=11", "student.num_classes=9"], r"student.num_classes: 9 but the data has 11 "
                                                                r"classes \(data.num_classes\): set "
                                                                r"student.num_classes=11"),
        (seg, ["data.num_classes=11", "data.ignore_index=10"], r"data.ignore_index: 10 is not a label outside "
                                                               r"the train ids 0..10"),
        (seg, ["data.categories=[1]"], r"data.categories: is for detection"),
        (det, ["data.num_classes=3"], r"data.num_classes: is for segmentation; .*data.categories"),
        (det, ["data.categories=[]"], r"data.categories: is empty"),
        (det, ["data.categories=[circle, circle]"], r"data.categories: lists circle more than once"),
    ]
    for path, overrides, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            load_config(path, [f"data.root={tmp_path}", *overrides])
    assert load_config(det, ["data.categories=[1, square, 7]"]).data.categories == [1, "square", 7]


def test_acam_masks_follow_the_class_count_unless_set(tmp_path):
    acam = os.path.join(DEMO, "shapes_seg_acam.yaml")
    unset = "method.options={alpha: 1.0}"  # the demo config sets num_masks: 9; this drops it

    def masks(*overrides, path=acam):
        return load_config(path, [f"data.root={tmp_path / 'none'}", unset, *overrides]).method.options["num_masks"]

    assert masks() == 9  # shapes: background + 8 shapes
    assert masks("data.dataset=cityscapes") == 19  # no classes file: Cityscapes' table
    assert masks("data.dataset=cityscapes", "data.num_classes=11") == 11
    assert masks("data.class_names=[a,b,c]") == 3
    write_eleven_class_set(tmp_path / "city", train=1, val=1)
    assert masks("data.dataset=cityscapes", f"data.root={tmp_path / 'city'}") == 11  # from classes.txt
    assert masks("data.num_classes=11", "method.options={num_masks: 4}") == 4  # set: kept
    assert masks("data.num_classes=11", "student.taps=[decoder]", "teacher.taps=[decoder]") == 6  # not logits
    det = load_config(os.path.join(DEMO, "shapes_det_acam.yaml"), [unset]).method.options["num_masks"]
    assert det == 6  # detection: ACAMOptions' default


def test_per_class_table_lists_names_then_the_summary():
    table = per_class_table({"mIoU": 0.5, "aAcc": 0.9, "IoU.road": 0.75, "IoU.traffic light": 0.25}).splitlines()
    assert table[0].split() == ["class", "IoU"]
    assert [line.split("  ")[0].strip() for line in table[2:4]] == ["road", "traffic light"]
    assert table[2].endswith("75.00") and table[3].endswith("25.00") and table[-1].split() == ["mIoU", "50.00"]
    assert per_class_table({"AP": 0.1, "AP.circle": 0.2}).splitlines()[2].split() == ["circle", "20.00"]
    assert per_class_table({"AP": 0.1}) == ""


# ---------------------------------------------------------------------------------- segmentation errors
def test_mismatch_and_out_of_range_labels_are_named_errors(tmp_path):
    root = write_eleven_class_set(tmp_path / "city", train=2, val=1)
    cfg = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"),
                      [*tiny(root, tmp_path / "out"), "student.num_classes=9"])
    with pytest.raises(ValueError, match=r"student.num_classes=9 but the dataset has 11 classes .*"
                                         r"set data.num_classes=9 .*or a classes.txt"):
        run.prepare(cfg, "train")
    cfg = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"), tiny(root, tmp_path / "out"))
    train, _ = SegmentationTask(cfg, DistInfo()).datasets()
    assert train.num_classes == 11 and train.class_names == ELEVEN
    bad = train.label_files[1]
    label = np.array(Image.open(bad))
    label[10, :3] = [11, 12, 254]
    Image.fromarray(label).save(bad)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: label values [11, 12, 254] are outside the train ids "
                                                   f"0..10 and 255 (ignore)") + ".*data.num_classes"):
        train[1]
    (root / "classes.txt").write_text("\n".join(ELEVEN[:10]))
    cfg = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"), [*tiny(root, tmp_path / "o"),
                                                                      "data.num_classes=11"])
    with pytest.raises(ValueError, match=r"data.num_classes=11 but .*classes.txt names 10 classes"):
        SegmentationTask(cfg, DistInfo()).datasets()


# ---------------------------------------------------------------------------------- segmentation end to end
@pytest.mark.slow
def test_eleven_classes_train_distil_eval_export(tmp_path):
    """Teacher and student at 11 classes (from classes.txt), M = 11, per-class IoU by name in the
    metrics and in ``acamkd eval``'s table, class names in the export's metadata."""
    root = write_eleven_class_set(tmp_path / "city")
    teacher_out, student_out = tmp_path / "teacher", tmp_path / "student"
    teacher_cfg = load_config(os.path.join(DEMO, "shapes_seg_teacher.yaml"),
                              [*tiny(root, teacher_out), "student.backbone=resnet18"])
    run.train(teacher_cfg)
    student_args = [*tiny(root, student_out), "student.arch=pspnet", "student.backbone=resnet18"]
    cfg = load_config(os.path.join(DEMO, "shapes_seg_acam.yaml"),
                      [*student_args, "teacher.backbone=resnet18", f"teacher.checkpoint={teacher_out / 'last.pt'}",
                       "method.options={alpha: 1.0, lam: 1.0}"])
    assert cfg.method.options["num_masks"] == 11
    result = run.distill(cfg)
    for who in ("teacher", "student"):
        ious = {k[4:] for k in result[who] if k.startswith("IoU.")}
        assert ious and ious <= set(ELEVEN), (who, ious)
    state = torch.load(student_out / "last.pt", weights_only=True)
    assert state["student"]["classifier.1.bias"].shape == (11,)  # PSPNet's classifier: 11 logits

    eval_args = [os.path.join(DEMO, "shapes_seg_student.yaml"), *student_args]
    proc = acamkd("eval", *eval_args, "--checkpoint", str(student_out / "last.pt"))
    metrics = json.loads(proc.stdout)
    assert metrics["mIoU"] == pytest.approx(result["student"]["mIoU"])
    rows = {line.split("  ")[0].strip() for line in proc.stderr.splitlines() if line and not line.startswith("-")}
    assert {k[4:] for k in metrics if k.startswith("IoU.")} | {"mIoU"} <= rows  # the table names the classes

    export = tmp_path / "student.safetensors"
    cfg = load_config(*eval_args[:1], eval_args[1:])
    run.export_student(cfg, str(student_out / "last.pt"), str(export))
    from safetensors import safe_open

    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == ELEVEN and meta["num_classes"] == "11"
    assert meta["ignore_index"] == "255" and meta["task"] == "segmentation"


# ---------------------------------------------------------------------------------- detection subset


def _det_cfg(root, *extra):
    return load_config(os.path.join(DEMO, "shapes_det_student.yaml"),
                       [f"data.root={root}", "data.shapes.train=4", "data.shapes.val=4", "data.shapes.size=[96,128]",
                        "data.shapes.seed=1", "data.min_size=64", "data.max_size=96", "data.batch_size=2",
                        "data.workers=0", *extra])


def test_a_subset_of_categories_maps_labels_to_the_files_ids(tmp_path):
    root = tmp_path / "shapes"
    make_shapes(root, train=4, val=4, size=(96, 128), seed=1)
    ann = root / "coco" / "annotations" / "instances_val2017.json"
    full = CocoDetection(root / "coco", "val")
    subset = CocoDetection(root / "coco", "val", categories=["star", 2, "hexagon"])  # ids 5, 2, 11
    assert subset.cat_ids == [2, 5, 11] and subset.label_to_cat_id == {1: 2, 2: 5, 3: 11}
    assert subset.class_names == ["__background__", "square", "star", "hexagon"] and subset.num_classes == 4
    kept = [a for a in json.loads(ann.read_text())["annotations"] if a["category_id"] in (2, 5, 11)]
    assert sum(len(subset.target(i)["labels"]) for i in range(len(subset))) + subset.num_crowd_skipped <= len(kept)
    assert subset.num_other_category == len(json.loads(ann.read_text())["annotations"]) - len(kept)
    assert {c["id"] for c in subset.coco_gt()["categories"]} == {2, 5, 11}
    assert {a["category_id"] for a in subset.coco_gt()["annotations"]} <= {2, 5, 11}
    assert len(subset) == len(full)  # images without a chosen object stay, as negatives
    results = predictions_to_coco_results([{"boxes": torch.tensor([[0.0, 0, 4, 4]] * 3), "scores": torch.ones(3),
                                            "labels": torch.tensor([1, 2, 3])}], [subset.image_ids[0]],
                                          subset.label_to_cat_id)
    assert [r["category_id"] for r in results] == [2, 5, 11]
    with pytest.raises(ValueError, match=r"categories\[0\]='hexagn' .*no category named 'hexagn'; did you mean "
                                         r"'hexagon'"):
        CocoDetection(root / "coco", "val", categories=["hexagn"])
    with pytest.raises(ValueError, match=r"categories\[1\]=3 .*has no category id 3; its ids are 1=circle, 2=square"):
        CocoDetection(root / "coco", "val", categories=[1, 3])


def test_three_categories_train_and_evaluate_with_their_ids(tmp_path):
    root = tmp_path / "shapes"
    chosen = ["data.categories=[circle, 4, ellipse]"]  # ids 1, 4, 13
    cfg = _det_cfg(root, *chosen, "student.backbone=resnet18", "train.iterations=2", "train.epochs=null",
                   "train.steps=[1]", "train.warmup_iters=1", "train.val_every=0", "train.checkpoint_every=1",
                   "train.optimizer=adamw", "train.lr=1e-4", f"train.output_dir={tmp_path / 'out'}")
    trainer = run.prepare(cfg, "train")
    assert trainer.train_set.label_to_cat_id == {1: 1, 2: 4, 3: 13}
    final = trainer.fit()
    assert {k for k in final if k.startswith("AP.")} <= {"AP.circle", "AP.triangle", "AP.ellipse"}
    export = tmp_path / "student.safetensors"
    run.export_student(cfg, str(tmp_path / "out" / "last.pt"), str(export))
    from safetensors import safe_open

    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == ["circle", "triangle", "ellipse"]
    assert json.loads(meta["category_ids"]) == [1, 4, 13] and meta["num_classes"] == "3"

    with pytest.raises(ValueError, match=r"student.num_classes=8 but the data has the 3 categories of "
                                         r"data.categories=\['circle', 4, 'ellipse'\]"):
        run.prepare(_det_cfg(root, *chosen, "student.num_classes=8", f"train.output_dir={tmp_path / 'x'}"), "train")
    task = DetectionTask(_det_cfg(root, *chosen), DistInfo())
    val = task.val_dataset()
    loader = DataLoader(val, batch_size=2, collate_fn=task.collate)
    oracle = GroundTruthInInputFrame()
    oracle.targets = [batch[1] for batch in loader]
    metrics = task.evaluate(oracle, loader, val)  # wrong label -> id mapping would score ~0
    assert metrics["AP"] > 0.99
    per_class = {k: v for k, v in metrics.items() if k.startswith("AP.")}
    assert set(per_class) <= {"AP.circle", "AP.triangle", "AP.ellipse"} and per_class
    assert all(v > 0.99 for v in per_class.values())
