"""Semantic-segmentation metrics (mIoU, pixel accuracy) from one accumulated confusion matrix.

Every metric is a function of the ``(K, K)`` confusion matrix (rows: target class, columns:
predicted class), so updates only add counts: one ``bincount`` per batch on the inputs'
device, in int64 (a 2048x1024 Cityscapes val set has ~1e9 pixels, past int32), and a
distributed evaluation sums the matrices once at the end (``all_reduce``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SegMetric"]

_SHOW = 10  # how many bad values an error message lists


def _bad_values(x: Tensor, bad: Tensor) -> str:
    """The distinct values of ``x`` where ``bad`` holds, at most ``_SHOW``, for an error message."""
    vals = torch.unique(x[bad]).tolist()
    more = f" ... ({len(vals)} distinct)" if len(vals) > _SHOW else ""
    return f"{vals[:_SHOW]}{more}"


def _nanmean(x: list[float]) -> float:
    vals = [v for v in x if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class SegMetric:
    """Accumulates a confusion matrix over ``update(pred, target)`` calls; ``compute()`` reads it.

    ``pred``: integer labels ``(B, H, W)`` / ``(H, W)``, or floating logits ``(B, K, H, W)`` /
    ``(K, H, W)`` (argmax over classes; upsample stride-8 logits to the target size first).
    ``target``: integer labels of the same spatial shape, ``ignore_index`` for unlabelled pixels.
    Labels outside ``[0, K)`` raise (pred: everywhere; target: unless ``ignore_index``).
    The matrix lives on ``device`` if given, else on the device of the first ``update``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SegMetric: num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegMetric: ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                "pick a value outside [0, num_classes)"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        self.confusion: Tensor | None = None  # (K, K) int64, rows target, cols pred
        if self.device is not None:
            self.reset()

    def reset(self) -> None:
        """Zero the counts (keeps the device of the matrix, if one was chosen)."""
        if self.confusion is not None:
            self.confusion.zero_()
        elif self.device is not None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def _labels(self, pred: Tensor, target: Tensor) -> Tensor:
        """Checked integer labels from ``pred``, same shape as ``target``."""
        K = self.num_classes
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1:
                raise ValueError(
                    f"SegMetric.update: floating pred is read as logits (B, K, H, W) for a (B, H, W) target "
                    f"(or (K, H, W) for (H, W)); got pred {tuple(pred.shape)}, target {tuple(target.shape)}"
                )
            class_dim = pred.dim() - 3  # (K, H, W): 0, (B, K, H, W): 1
            if pred.shape[class_dim] != K:
                raise ValueError(
                    f"SegMetric.update: logits pred {tuple(pred.shape)} have {pred.shape[class_dim]} classes "
                    f"in dim {class_dim}, expected num_classes K={K}"
                )
            spatial = pred.shape[:class_dim] + pred.shape[class_dim + 1:]
            if spatial != target.shape:
                raise ValueError(
                    f"SegMetric.update: logits pred {tuple(pred.shape)} do not match target "
                    f"{tuple(target.shape)}; upsample the logits to the target size (F.interpolate) first"
                )
            return pred.argmax(dim=class_dim)
        if pred.dtype == torch.bool or pred.is_complex():
            raise TypeError(f"SegMetric.update: pred must be integer labels or float logits, got {pred.dtype}")
        if pred.shape != target.shape:
            raise ValueError(
                f"SegMetric.update: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the "
                "same shape (labels (B, H, W) or (H, W)), or pred must be logits (B, K, H, W)"
            )
        bad = (pred < 0) | (pred >= K)
        if bool(bad.any()):
            raise ValueError(f"SegMetric.update: pred has values outside [0, {K}): {_bad_values(pred, bad)}")
        return pred

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch to the counts."""
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError(
                f"SegMetric.update: pred and target must be tensors, got {type(pred).__name__}, {type(target).__name__}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"SegMetric.update: target must be integer labels, got {target.dtype}")
        if target.dim() not in (2, 3):
            raise ValueError(f"SegMetric.update: target must be (B, H, W) or (H, W), got {tuple(target.shape)}")
        if self.confusion is None:
            self.device = target.device
            self.reset()
        dev = self.confusion.device
        pred, target = pred.to(dev), target.to(dev)
        labels = self._labels(pred, target).long()  # (B, H, W) or (H, W)
        target = target.long()

        K = self.num_classes
        ignored = target == self.ignore_index
        valid = (target >= 0) & (target < K)
        bad = ~(valid | ignored)
        if bool(bad.any()):
            raise ValueError(
                f"SegMetric.update: target has values outside [0, {K}) that are not ignore_index="
                f"{self.ignore_index}: {_bad_values(target, bad)}"
            )
        # Ignored pixels go to an extra bin K*K that is dropped: fixed-size, no boolean gather.
        index = torch.where(valid, target * K + labels, K * K)  # (B, H, W)
        counts = torch.bincount(index.reshape(-1), minlength=K * K + 1)  # (K*K + 1,) int64
        self.confusion += counts[: K * K].view(K, K)

    def all_reduce(self) -> "SegMetric":
        """Sum the counts over all processes (torch.distributed); a no-op without a process group.

        Every rank must call it. A rank that saw no batch contributes zeros.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.confusion is None:
            if self.device is None:
                nccl = dist.get_backend() == "nccl"
                self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            self.reset()
        dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)
        return self

    reduce_ = all_reduce

    def compute(self) -> dict[str, float | list[float]]:
        """``mIoU``, ``aAcc``, ``mAcc`` (floats in 0..1) and per-class ``IoU``, ``Acc`` (lists).

        IoU of a class absent from both pred and target (zero union) is NaN and left out of
        ``mIoU``; Acc of a class absent from target is NaN and left out of ``mAcc``.
        """
        if self.confusion is None:
            raise RuntimeError("SegMetric.compute: no update yet (call update(pred, target) first)")
        cm = self.confusion.detach().to("cpu", torch.float64)  # (K, K)
        tp = cm.diagonal()  # (K,)
        gt_count = cm.sum(dim=1)  # (K,) pixels of each target class
        union = gt_count + cm.sum(dim=0) - tp  # (K,)
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).tolist()
        acc = torch.where(gt_count > 0, tp / gt_count.clamp(min=1), torch.full_like(tp, float("nan"))).tolist()
        total = float(cm.sum())
        return {
            "mIoU": _nanmean(iou),
            "aAcc": float(tp.sum()) / total if total > 0 else float("nan"),
            "mAcc": _nanmean(acc),
            "IoU": iou,
            "Acc": acc,
        }

    def __repr__(self) -> str:
        dev = None if self.confusion is None else self.confusion.device
        return f"SegMetric(num_classes={self.num_classes}, ignore_index={self.ignore_index}, device={dev})"
