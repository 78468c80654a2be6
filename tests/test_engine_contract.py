"""The engine's seams: the Task contract, the methods' DistillBatch and the one training step.

* ``DistillBatch`` is in the frame of the features: a detector's FPN grid is the padded input
  size over the stride, and the boxes mapped onto it land where the pixels are;
* ``TrainingStep`` with gradient accumulation equals a plain hand-written loop;
* a task written from the ``Task`` contract alone (a toy regression task) trains and distils;
* the engine distils with a method it does not know by name (the toy method of ``_toy_method.py``).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from acamkd.config import load_config
from acamkd.engine.detection import DetectionTask
from acamkd.engine.distributed import DistInfo
from acamkd.engine.segmentation import SegmentationTask
from acamkd.engine.step import NonFiniteLoss, StudentAndMethod, TrainingStep
from acamkd.engine.task import Task
from acamkd.methods import DistillBatch, build
from acamkd.models import FeatureTaps

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo")


# ------------------------------------------------------------------------------ DistillBatch
def test_detection_distill_batch_is_in_the_frame_of_the_fpn():
    cfg = load_config(os.path.join(DEMO, "shapes_det_student.yaml"), ["student.backbone=resnet18"])
    task = DetectionTask(cfg, DistInfo())
    images = [torch.rand(3, 60, 70), torch.rand(3, 64, 50)]
    boxes = [torch.tensor([[8.0, 16.0, 40.0, 48.0]]), torch.tensor([[0.0, 0.0, 50.0, 64.0], [10.0, 20.0, 30.0, 40.0]])]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    facts = task.distill_batch(images, targets)
    # the detectors' transform pads the batch to a multiple of 32: 64 x 70 -> 64 x 96
    assert facts.input_size == (64, 96) and facts.image_sizes == [(60, 70), (64, 50)]
    assert facts.label_map is None and [len(lab) for lab in facts.labels] == [1, 2]
    model = task.build_model(cfg.student, 3, "student")
    feats = task.teacher_forward(model.eval(), None, images)  # the registry's cheap pass
    grids = {name: tuple(f.shape[-2:]) for name, f in feats.items()}
    assert grids["p3"] == (8, 12) and grids["p4"] == (4, 6) and grids["p5"] == (2, 3)
    on_p3 = facts.boxes_at_stride(8)
    assert torch.equal(on_p3[0], torch.tensor([[1.0, 2.0, 5.0, 6.0]]))  # x / 8, y / 8
    assert torch.equal(on_p3[1][0], torch.tensor([0.0, 0.0, 6.25, 8.0]))
    # P7 (stride 128) has a 1x1 grid on a 64x96 input: the cell covers 128 pixels, so boxes scale by 1/128
    # (not by grid / input size, which would be 1/64 and 1/96)
    assert grids["p7"] == (1, 1)
    assert torch.equal(facts.boxes_at_stride(128)[0], torch.tensor([[8.0, 16.0, 40.0, 48.0]]) / 128)


def test_segmentation_distill_batch_carries_the_label_map():
    cfg = load_config(os.path.join(DEMO, "shapes_seg_student.yaml"))
    task = SegmentationTask(cfg, DistInfo())
    images, labels = torch.randn(2, 3, 48, 64), torch.randint(0, 9, (2, 48, 64))
    facts = task.distill_batch(images, labels)
    assert facts.input_size == (48, 64) and facts.image_sizes == [(48, 64)] * 2
    assert facts.label_map is labels and facts.ignore_index == 255 and facts.boxes is None
    with pytest.raises(ValueError, match="no boxes"):
        facts.boxes_at_stride(8)


def test_distill_batch_refuses_inconsistent_facts():
    with pytest.raises(ValueError, match="image 1 has size"):
        DistillBatch(input_size=(32, 32), image_sizes=[(32, 32), (40, 10)])
    with pytest.raises(ValueError, match="labels\\[0\\] has 2 entries for 1 boxes"):
        DistillBatch(input_size=(32, 32), image_sizes=[(32, 32)], boxes=[torch.zeros(1, 4)],
                     labels=[torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="label_map must be"):
        DistillBatch(input_size=(32, 32), image_sizes=[(32, 32)], label_map=torch.zeros(1, 16, 16))


# ------------------------------------------------------------------------------ a toy task
class Net(nn.Module):
    """(B, 3, H, W) -> body features (B, C, H/2, W/2) -> one value per image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean((1, 2, 3))


class RegressionTask(Task):
    """A task written from the contract alone: regress one number per random image."""

    name = "regression"

    @staticmethod
    def collate(items):
        return torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])

    def datasets(self):
        return self.val_dataset(), self.val_dataset()

    def val_dataset(self):
        g = torch.Generator().manual_seed(1)
        return [(torch.rand(3, 16, 16, generator=g), torch.rand((), generator=g)) for _ in range(8)]

    @staticmethod
    def model_classes(dataset):
        return 1

    def build_model(self, model_cfg, num_classes, role):
        return Net(8 if role == "teacher" else 4)

    def default_taps(self, model):
        return {"body": "body"}, {}

    def default_tap_channels(self, model):
        return {"body": model.body[0].out_channels}

    def make_taps(self, model, role):
        return FeatureTaps(model, *self.default_taps(model))

    def teacher_taps(self, teacher):
        return self.make_taps(teacher, "teacher")

    def student_forward(self, student, taps, images, targets):
        return {"mse": (student(images) - targets).square().mean()}, taps.features()

    @staticmethod
    def to_device(batch, device):
        return batch[0].to(device), batch[1].to(device)

    @staticmethod
    def batch_size(batch):
        return batch[0].shape[0]

    def distill_batch(self, images, targets):
        B, _, H, W = images.shape
        return DistillBatch(input_size=(H, W), image_sizes=[(H, W)] * B)

    def random_batch(self, batch_size, size, num_classes, generator):
        return torch.rand(batch_size, 3, *size, generator=generator), torch.rand(batch_size, generator=generator)

    def evaluate(self, model, loader, dataset):
        with torch.no_grad():
            errors = [(model(x) - y).abs() for x, y in (self.collate([item]) for item in dataset)]
        return {"mae": float(torch.cat(errors).mean())}


def _toy_run(method_name: str = "toy_l1"):
    task = RegressionTask(cfg=None, info=DistInfo())
    torch.manual_seed(0)
    student, teacher = task.build_model(None, 1, "student"), task.build_model(None, 1, "teacher").eval()
    method = build(method_name, teacher_channels={"body": 8}, student_channels={"body": 4})
    return task, student, teacher, method


def test_training_step_with_accumulation_equals_a_plain_loop():
    task, student, teacher, method = _toy_run()
    ref_student, ref_method = copy.deepcopy(student), copy.deepcopy(method)
    trained = StudentAndMethod(student, method, task, task.make_taps(student, "student"))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    step = TrainingStep(task, trained, teacher, task.teacher_taps(teacher), optimizer, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    micro = [task.random_batch(2, (16, 16), 1, g) for _ in range(3)]
    losses = step(micro)  # one optimizer step over three micro-batches, each loss / 3

    # the same by hand, nothing of the engine but the modules
    ref_params = [*ref_student.parameters(), *ref_method.parameters()]
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    s_taps, t_taps = FeatureTaps(ref_student, ["body"]), FeatureTaps(teacher, ["body"])
    for images, targets in micro:
        with torch.no_grad():
            teacher(images)
        task_loss = (ref_student(images) - targets).square().mean()
        distill = ref_method(t_taps.features(), s_taps.features())
        last = task_loss + sum(distill.values())
        (last / 3).backward()
    ref_opt.step()
    for got, want in zip(trained.parameters(), ref_params):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(losses) == {"task.mse", "distill.body.l1", "loss"}
    torch.testing.assert_close(losses["loss"], last.detach())
    assert all(p.grad is None for p in trained.parameters())  # zeroed for the next step


def test_methods_receive_the_tasks_distill_batch():
    task, student, teacher, method = _toy_run()
    seen = []
    method.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs.get("batch")), with_kwargs=True)
    trained = StudentAndMethod(student, method, task, task.make_taps(student, "student"))
    step = TrainingStep(task, trained, teacher, task.teacher_taps(teacher),
                        torch.optim.SGD(trained.parameters(), lr=0.1), device=torch.device("cpu"))
    step([task.random_batch(3, (16, 20), 1, torch.Generator().manual_seed(0))])
    assert len(seen) == 1 and isinstance(seen[0], DistillBatch)
    assert seen[0].input_size == (16, 20) and seen[0].batch_size == 3


def test_a_non_finite_loss_stops_before_any_update():
    task, student, teacher, method = _toy_run()
    trained = StudentAndMethod(student, method, task, task.make_taps(student, "student"))
    before = copy.deepcopy(trained.state_dict())
    step = TrainingStep(task, trained, teacher, task.teacher_taps(teacher),
                        torch.optim.SGD(trained.parameters(), lr=0.1), device=torch.device("cpu"))
    images, targets = task.random_batch(2, (16, 16), 1, torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteLoss, match="task.mse"):
        step([(images, targets.fill_(float("nan")))])
    after = trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_without_a_method_runs_the_task_losses_only():
    task, student, _, _ = _toy_run()
    trained = StudentAndMethod(student, None, task, task.make_taps(student, "student"))
    step = TrainingStep(task, trained, None, None, torch.optim.SGD(trained.parameters(), lr=0.1),
                        device=torch.device("cpu"))
    losses = step([task.random_batch(2, (16, 16), 1, torch.Generator().manual_seed(0))])
    assert set(losses) == {"task.mse", "loss"}


# ------------------------------------------------------------------------------ the engine, end to end
@pytest.mark.slow
def test_the_engine_distils_with_a_method_it_does_not_know_by_name(tmp_path):
    """The toy method (tests/_toy_method.py, registered by conftest) through prepare -> fit."""
    from acamkd.engine.run import prepare

    common = [f"data.root={tmp_path / 'shapes'}", "data.shapes.train=4", "data.shapes.val=2",
              "data.shapes.size=[64,64]", "data.min_size=64", "data.max_size=64", "data.batch_size=2",
              "data.workers=0", "train.epochs=null", "train.iterations=2", "train.steps=[1]", "train.warmup_iters=1",
              "train.log_every=1", "train.val_every=0", "train.checkpoint_every=0"]
    teacher_cfg = load_config(os.path.join(DEMO, "shapes_det_teacher.yaml"),
                              [*common, "student.backbone=resnet18", f"train.output_dir={tmp_path / 't'}"])
    from acamkd.engine.run import train

    train(teacher_cfg)
    cfg = load_config(os.path.join(DEMO, "shapes_det_acam.yaml"),
                      [*common, "teacher.backbone=resnet18", f"teacher.checkpoint={tmp_path / 't' / 'last.pt'}",
                       "method.name=toy_l1", "method.options={weight: 0.5}", f"train.output_dir={tmp_path / 's'}"])
    trainer = prepare(cfg, "distill")
    assert type(trainer.method).__name__ == "ToyL1" and trainer.method.options.weight == 0.5
    trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "s" / "metrics.jsonl")]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert {f"distill.p{k}.l1" for k in range(3, 8)} <= set(train_records[0])
    state = torch.load(tmp_path / "s" / "last.pt", weights_only=True)
    assert any(k.startswith("levels.p3.") for k in state["method"])  # the method's modules are checkpointed
