"""Shared detection test doubles (not a test module)."""
from __future__ import annotations

import torch
from torch import nn


class GroundTruthInInputFrame(nn.Module):
    """Predicts the (resized) targets it is handed through ``self.targets``: a perfect model."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def forward(self, images):
        return [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
                for t in self.targets.pop(0)]


def two_images_and_targets(second_labels: tuple[int, int] = (1, 8)):
    """Two images of different sizes (96x128, 90x117) and their targets: one box on the first
    (label 3), two on the second (``second_labels``), xyxy in pixels."""
    images = [torch.rand(3, 96, 128), torch.rand(3, 90, 117)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 20.0, 70.0, 80.0], [50.0, 5.0, 110.0, 40.0]]),
                "labels": torch.tensor(list(second_labels))}]
    return images, targets
