"""Segmentation through the engine on tiny built-in data: the loss, the data recipe, the
evaluation (whole image, sliding windows, every image counted once), bad input, and train ->
distil -> eval -> export -> SIGKILL + resume through the CLI, as for detection."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cli_helpers import acamkd, sigkill_after_step
from PIL import Image

from acamkd.config import load_config
from acamkd.engine.distributed import DistInfo
from acamkd.engine.run import load_student, prepare
from acamkd.engine.segmentation import SegmentationTask, segmentation_loss
from acamkd.engine.task import real_items as _real_items
from acamkd.engine.sampling import ResumableSampler

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


def tiny(root, out, iterations=4):
    return [f"data.root={root}", "data.shapes.train=8", "data.shapes.val=3", "data.shapes.size=[64,80]",
            "data.crop=[48,64]", "data.batch_size=2", "data.workers=0", "train.optimizer=adamw", "train.lr=1e-3",
            f"train.iterations={iterations}", "train.warmup_iters=1", "train.log_every=1", "train.val_every=0",
            "train.checkpoint_every=2", "eval.batch_size=2", f"train.output_dir={out}"]




@pytest.fixture(scope="module")
def teacher(module_tmp_dir):
    """A 2-step DeepLabV3-R18 teacher."""
    base = module_tmp_dir("seg")
    root, out = base / "shapes", base / "teacher"
    acamkd("train", f"{DEMO}/shapes_seg_teacher.yaml", *tiny(root, out, iterations=2), "student.backbone=resnet18")
    return base, root, out / "last.pt"


def distill_args(root, ckpt, out, iterations=4, student="pspnet"):
    return ["distill", f"{DEMO}/shapes_seg_acam.yaml", *tiny(root, out, iterations), "teacher.backbone=resnet18",
            f"teacher.checkpoint={ckpt}", f"student.arch={student}", "student.backbone=resnet18"]


# ---------------------------------------------------------------------------------- the loss
def test_loss_is_cross_entropy_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6, 7))
    labels[0, :2] = 255
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, labels), expected)


def test_loss_of_a_fully_ignored_batch_is_zero_not_nan():
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 6, 7), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(logits, torch.zeros(2, 6, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------- data + models
def _cfg(tmp_path, *extra, name="shapes_seg_student.yaml"):
    return load_config(os.path.join(DEMO, name), [*tiny(tmp_path / "shapes", tmp_path / "out"), *extra])


def test_crop_larger_than_the_image_pads_with_ignore(tmp_path):
    cfg = _cfg(tmp_path, "data.crop=[100,120]", "data.scale_range=[1.0,1.0]", "data.flip_prob=0")
    train, val = SegmentationTask(cfg, DistInfo()).datasets()
    image, label = train[0]
    assert image.shape == (3, 100, 120) and label.shape == (100, 120)
    assert (label[64:] == 255).all() and (label[:, 80:] == 255).all()  # padded rows and columns are ignored
    assert (label[:64, :80] != 255).any()
    assert (image[:, 64:] == 0).all()
    raw = val[0][1]
    assert raw.shape == (64, 80) and train.num_classes == 9 and train.class_names[0] == "background"
    # Validation images are normalised (ImageNet statistics): segmenters do not normalise inside.
    assert val[0][0].min() < 0


def test_label_map_with_unknown_ids_names_the_file(tmp_path):
    cfg = _cfg(tmp_path)
    train, _ = SegmentationTask(cfg, DistInfo()).datasets()
    bad = train.label_files[0]
    arr = np.array(Image.open(bad))
    arr[0, 0] = 42  # not a train id of a 9-class dataset, not 255
    Image.fromarray(arr).save(bad)
    with pytest.raises(ValueError, match=os.path.basename(bad)):
        train[0]


def test_class_count_mismatch_is_a_clear_error(tmp_path, teacher):
    _, _, ckpt = teacher
    cfg = _cfg(tmp_path, "student.num_classes=5")
    with pytest.raises(ValueError, match="student.num_classes=5 but the dataset has 9 classes"):
        prepare(cfg, "train")
    task = SegmentationTask(cfg, DistInfo())
    from acamkd.models.segmentation import build_segmenter

    with pytest.raises(ValueError, match="teacher logits have 19 classes, student logits 9"):
        task.check_pair(build_segmenter("deeplabv3", "resnet18", 9), build_segmenter("deeplabv3", "resnet18", 19))
    # A teacher checkpoint trained for other classes fails its strict load, naming the mismatched tensors.
    other = load_config(os.path.join(DEMO, "shapes_seg_acam.yaml"),
                        [*tiny(tmp_path / "shapes", tmp_path / "o"), "teacher.backbone=resnet18",
                         f"teacher.checkpoint={ckpt}", "teacher.arch=pspnet"])
    with pytest.raises(ValueError, match="pspnet-resnet18"):
        prepare(other, "distill")


def test_teacher_computes_only_the_stride8_logits(tmp_path, teacher):
    _, _, ckpt = teacher
    cfg = load_config(os.path.join(DEMO, "shapes_seg_acam.yaml"),
                      [*tiny(tmp_path / "shapes", tmp_path / "o"), "teacher.backbone=resnet18",
                       f"teacher.checkpoint={ckpt}"])
    trainer = prepare(cfg, "distill")
    calls = []
    trainer.teacher.register_forward_hook(lambda *a: calls.append("forward"))  # the upsampling forward
    feats = trainer.task.teacher_forward(trainer.teacher, trainer.step_fn.teacher_taps, torch.randn(2, 3, 48, 64))
    assert list(feats) == ["logits"] and feats["logits"].shape == (2, 9, 6, 8) and calls == []
    assert trainer.method.level("logits").num_masks == 9


# ---------------------------------------------------------------------------------- evaluation
def test_every_val_image_is_counted_once_across_ranks():
    for length, world in ((5, 2), (7, 3), (4, 4), (3, 4)):
        loaders = []
        for rank in range(world):
            sampler = ResumableSampler(length, shuffle=False, rank=rank, world_size=world)
            loaders.append(type("L", (), {"sampler": sampler})())
            real = _real_items(loaders[-1])
            assert sorted(set(sampler.indices()[:real])) == sorted(sampler.indices()[:real])
        seen = [i for loader in loaders for i in loader.sampler.indices()[:_real_items(loader)]]
        assert sorted(seen) == list(range(length)), (length, world)


def test_sliding_window_evaluation_equals_whole_image_when_the_image_fits(tmp_path, teacher):
    _, _, ckpt = teacher
    base = [*tiny(tmp_path / "shapes", tmp_path / "o"), "student.backbone=resnet18"]  # the teacher fixture's model
    whole = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"), base)
    slide = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"),
                        [*base, "eval.sliding_window=true", "eval.window=[64,80]", "eval.stride=[32,40]"])
    results = []
    for cfg in (whole, slide):
        task, model, val_set = load_student(cfg, str(ckpt))
        loader = torch.utils.data.DataLoader(val_set, batch_size=2, collate_fn=task.collate)
        results.append(task.evaluate(model, loader, val_set))
    assert results[0] == results[1] and 0 <= results[0]["mIoU"] <= 1
    assert {"mIoU", "aAcc", "mAcc", "IoU.background"} <= set(results[0])


# ---------------------------------------------------------------------------------- end to end
def test_distill_eval_export_through_the_cli(teacher, tmp_path):
    _, root, ckpt = teacher
    out = tmp_path / "acam"
    acamkd(*distill_args(root, ckpt, out, iterations=2))
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 2 and 0 <= final["mIoU"] <= 1
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_keys = set(logged[0])
    assert {"task.ce", "task.aux_ce", "distill.logits.spatial", "distill.logits.channel", "distill.logits.diversity",
            "stats.logits.spatial_mask_mean"} <= train_keys, train_keys

    student_args = [f"{DEMO}/shapes_seg_student.yaml", *tiny(root, out)[:-1], "student.arch=pspnet",
                    "student.backbone=resnet18"]
    proc = acamkd("eval", *student_args, "--checkpoint", str(out / "last.pt"))
    assert json.loads(proc.stdout)["mIoU"] == pytest.approx(final["mIoU"])

    export = tmp_path / "student.safetensors"
    acamkd("export", *student_args, "--checkpoint", str(out / "last.pt"), "--out", str(export))
    from safetensors.torch import load_file

    from acamkd.models.segmentation import build_segmenter

    cfg = load_config(student_args[0], student_args[1:])
    _, reference, _ = load_student(cfg, str(out / "last.pt"))
    fresh = build_segmenter("pspnet", "resnet18", 9)
    fresh.load_state_dict(load_file(export), strict=True)
    images = torch.randn(2, 3, 64, 80)
    reference.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(reference(images), fresh(images))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(teacher):
    base, root, ckpt = teacher
    straight, killed = base / "straight", base / "killed"
    acamkd(*distill_args(root, ckpt, straight, iterations=6))
    sigkill_after_step(distill_args(root, ckpt, killed, iterations=6), killed / "metrics.jsonl", step=3)
    state = torch.load(killed / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 6 and 0 < state["batches_done"] < 4  # mid-epoch (4 batches per epoch)

    acamkd(*distill_args(root, ckpt, killed, iterations=6), "--resume")
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("student", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert json.loads((straight / "final_metrics.json").read_text()) == json.loads(
        (killed / "final_metrics.json").read_text())
