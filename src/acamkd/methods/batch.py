"""What a distillation method may know about the batch besides the features: :class:`DistillBatch`.

The task builds it (``Task.distill_batch``) from the same tensors the models saw, so every
coordinate is in the frame of the input the tapped features were computed from:

* detection: images are resized by the data pipeline, then the detector's transform normalises
  and pads the batch (bottom/right) to a multiple of its ``size_divisible``; ``boxes`` are in
  pixels of that input (unpadded region), ``input_size`` is the padded ``(H, W)`` of the tensor
  the FPN ran on, so a level of stride ``s`` has a grid of ``ceil(H / s) x ceil(W / s)``;
* segmentation: images are cropped/padded to one size by the pipeline and never padded again,
  ``label_map`` is ``(B, H, W)`` at input size with ``ignore_index`` for unlabelled pixels.

Methods that need none of it (ACAM-KD) ignore the argument; methods built on ground-truth boxes
(FGD's foreground masks) read ``boxes_at_stride(s)`` for a level of stride ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DistillBatch"]


@dataclass
class DistillBatch:
    """Per-batch facts for methods, in the coordinates of the input the features came from.

    Attributes:
        input_size: ``(H, W)`` in pixels of the (padded) input tensor the models ran on.
        image_sizes: per image, ``(h, w)`` in pixels of its content before batch padding
            (``h <= H``, ``w <= W``; content sits at the top-left).
        boxes: detection only: per image a ``(N_i, 4)`` float tensor of ground-truth boxes,
            ``x1, y1, x2, y2`` in input pixels; ``None`` for segmentation.
        labels: detection only: per image a ``(N_i,)`` int64 tensor of contiguous class labels
            (``1..K``, 0 being background); ``None`` for segmentation.
        label_map: segmentation only: ``(B, H, W)`` int64 train ids at input size, pixels equal to
            ``ignore_index`` unlabelled; ``None`` for detection.
        ignore_index: the label of unlabelled pixels in ``label_map``.
    """

    input_size: tuple[int, int]
    image_sizes: list[tuple[int, int]]
    boxes: list[Tensor] | None = None
    labels: list[Tensor] | None = None
    label_map: Tensor | None = None
    ignore_index: int = 255
    extras: dict[str, object] = field(default_factory=dict)  # task-specific facts a method may read

    def __post_init__(self) -> None:
        H, W = (int(v) for v in self.input_size)
        self.input_size = (H, W)
        self.image_sizes = [(int(h), int(w)) for h, w in self.image_sizes]
        for i, (h, w) in enumerate(self.image_sizes):
            if not (0 < h <= H and 0 < w <= W):
                raise ValueError(f"DistillBatch: image {i} has size {(h, w)}, outside the input size {(H, W)}")
        if self.boxes is not None:
            if len(self.boxes) != len(self.image_sizes):
                raise ValueError(f"DistillBatch: {len(self.boxes)} box lists for {len(self.image_sizes)} images")
            for i, b in enumerate(self.boxes):
                if b.dim() != 2 or b.shape[-1] != 4:
                    raise ValueError(f"DistillBatch: boxes[{i}] must be (N, 4) xyxy, got {tuple(b.shape)}")
        if self.labels is not None and self.boxes is not None:
            for i, (b, lab) in enumerate(zip(self.boxes, self.labels)):
                if lab.shape[0] != b.shape[0]:
                    raise ValueError(f"DistillBatch: labels[{i}] has {lab.shape[0]} entries for {b.shape[0]} boxes")
        if self.label_map is not None:
            if self.label_map.dim() != 3 or tuple(self.label_map.shape[-2:]) != (H, W):
                raise ValueError(f"DistillBatch: label_map must be (B, {H}, {W}), got {tuple(self.label_map.shape)}")
            if self.label_map.shape[0] != len(self.image_sizes):
                raise ValueError(f"DistillBatch: label_map has {self.label_map.shape[0]} images, "
                                 f"image_sizes {len(self.image_sizes)}")

    @property
    def batch_size(self) -> int:
        return len(self.image_sizes)

    def boxes_at_stride(self, stride: int) -> list[Tensor]:
        """Each image's boxes in the cells of a feature level of ``stride`` pixels: ``box / stride``.

        Cell ``i`` of a stride-``s`` level covers input pixels ``[i s, (i + 1) s)`` (convolutions of
        stride 2 round the grid up: ``ceil(H / s)`` cells, the last one partly padding), so this is
        exact at every level, including P6/P7 whose grid does not divide the padded input.

        Raises:
            ValueError: no boxes (a segmentation batch), or ``stride`` not a positive number.
        """
        if self.boxes is None:
            raise ValueError("DistillBatch.boxes_at_stride: this batch carries no boxes (not a detection batch)")
        if not stride > 0:
            raise ValueError(f"DistillBatch.boxes_at_stride: stride must be positive, got {stride!r}")
        return [b / stride for b in self.boxes]
