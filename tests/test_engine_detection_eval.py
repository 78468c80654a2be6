"""Evaluation maps boxes from the resized model input back to the original image frame."""
import torch
from torch.utils.data import DataLoader

from _detection_helpers import GroundTruthInInputFrame

from acamkd.config import load_config
from acamkd.data.synthetic import make_shapes
from acamkd.engine.detection import DetectionTask
from acamkd.engine.distributed import DistInfo




def test_predictions_in_a_resized_frame_score_perfectly_after_mapping_back(tmp_path):
    make_shapes(tmp_path / "shapes", train=2, val=4, size=(96, 128), seed=1)
    cfg = load_config("configs/demo/shapes_det_student.yaml",
                      [f"data.root={tmp_path / 'shapes'}", "data.shapes.train=2", "data.shapes.val=4",
                       "data.shapes.size=[96,128]", "data.shapes.seed=1", "data.min_size=48", "data.max_size=64"])
    task = DetectionTask(cfg, DistInfo())
    _, val = task.datasets()
    image, target = val[0]
    assert image.shape[-2:] == (48, 64)  # the model sees half-size images
    loader = DataLoader(val, batch_size=2, collate_fn=task.collate)
    model = GroundTruthInInputFrame()
    model.targets = [batch[1] for batch in loader]
    metrics = task.evaluate(model, loader, val)
    assert metrics["AP"] > 0.99  # wrong scaling (boxes left at half size) would score about 0
