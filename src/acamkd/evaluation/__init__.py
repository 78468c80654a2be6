"""Evaluation: COCO box mAP (faster-coco-eval) for detectors, mIoU for segmenters.

``coco_map(gt_json, results)`` scores a COCO results list; ``evaluate_detections`` does the
same from torchvision detector outputs. ``SegMetric`` accumulates a confusion matrix over
batches (and processes) and reports mIoU / pixel accuracy; ``sliding_window_logits`` predicts
large images window by window. ``per_class_table`` prints the per-class scores by class name.
"""
from acamkd.evaluation.coco import STAT_KEYS, coco_map, evaluate_detections, predictions_to_coco_results
from acamkd.evaluation.per_class import per_class_table
from acamkd.evaluation.segmentation import SegMetric
from acamkd.evaluation.sliding_window import sliding_window_logits, window_starts

__all__ = ["STAT_KEYS", "coco_map", "evaluate_detections", "predictions_to_coco_results", "SegMetric",
           "per_class_table", "sliding_window_logits", "window_starts"]
